"""Convert OFA TSV files or WebDataset tars into one canonical corpus, in parallel over the input files on Ray.

    convert_raw(RawSource("ofa-tsv", split="train", layout="vqa"), "s3://b/vqa_tsv/", "s3://b/corpus/")

The driver lists the input files (`pipelines.data.readers.files.input_files`, sorted). One Ray task per file k reads
it with the readers and writes its rows with a `pipelines.data.shards.ShardWriter` into its own directory of the
output corpus, `part-<k>/`: shard names never collide, and a task retried after a crash clears its
directory and starts again. Row ids are the readers' (the TSV id column, the WebDataset key, or the
file's name below the input directory + the line's index in it), so they do not depend on which worker
read a file, nor on how many ran at once.

When every task is done the driver merges the parts into `<output>/manifest.json`, written last as for
any corpus: every shard (paths `part-<k>/<split>-<task>-<n>.parquet`), rows per split and task, and the
fingerprint, the sum of the parts' fingerprints mod 2**256, which is what one ShardWriter fed every row
computes (`shards.fingerprint_of`). Its `conversion` entry keeps what was read and rejected: files,
records, rows ok, bad rows by reason with example ids. A failed or interrupted conversion deletes its
parts and writes no manifest.

Ids must be unique in a corpus. Within a file the part's ShardWriter checks them as it writes (16-byte
hashes); across files the driver checks them at the end (`_check_ids_across_files`). A duplicate id is
an error that names the id and its files: it is not a bad row, since either copy could be the right one.
"""

import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.data.converters import OutputError
from pipelines.data.readers import ofa_tsv, webdataset
from pipelines.data.readers.files import InputFile, input_files
from pipelines.data.readers.rows import BadRow
from pipelines.data.rowstats import RowStats
from pipelines.data.schema import SCHEMA_VERSION
from pipelines.data.shards import FINGERPRINT_MOD, MANIFEST_NAME, Manifest, ShardWriter
from pipelines.progress import Progress
from pipelines.storage import S3Options

logger = logging.getLogger(__name__)

_FINGERPRINT_PREFIX = "sum-sha256:"  # shards.fingerprint_of's format


@dataclass(frozen=True)
class RawSource:
    """What the input files hold and how their rows are labelled.

    kind: "ofa-tsv" (OFA's TSV, `layout` one of ofa_tsv.LAYOUTS) or "webdataset" (tars, `task` one of
    webdataset.WDS_TASKS, `key_map` role -> member candidates as for webdataset.read_webdataset_file).
    split: the split of every row. dataset: the rows' dataset name (None: the reader's default).
    """

    kind: Literal["ofa-tsv", "webdataset"]
    split: str
    layout: str | None = None
    task: str | None = None
    dataset: str | None = None
    key_map: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "ofa-tsv":
            if self.task is not None or self.key_map:
                raise ValueError("an ofa-tsv source takes a layout, not a task or key_map")
            ofa_tsv.check_tsv_options(self.layout or "", self.split)
        elif self.kind == "webdataset":
            if self.layout is not None:
                raise ValueError("a webdataset source takes a task, not a layout")
            webdataset.webdataset_sources(self.task or "", self.split, dict(self.key_map))
        else:
            raise ValueError(f"unknown raw source kind {self.kind!r}; known: ofa-tsv, webdataset")

    @property
    def suffixes(self) -> tuple[str, ...]:
        return ofa_tsv.TSV_SUFFIXES if self.kind == "ofa-tsv" else webdataset.WDS_SUFFIXES

    @property
    def row_task(self) -> str | None:
        """The task of every row (None for pretrain_vl, whose rows carry several)."""
        return ofa_tsv.layout_task(self.layout) if self.kind == "ofa-tsv" else self.task

    def read(self, file: InputFile, s3: S3Options | None) -> Iterator[dict | BadRow]:
        if self.kind == "ofa-tsv":
            return ofa_tsv.read_ofa_tsv_file(file, self.layout, split=self.split, s3=s3, dataset=self.dataset)
        return webdataset.read_webdataset_file(file, task=self.task, split=self.split, s3=s3,
                                            key_map=dict(self.key_map), dataset=self.dataset)

    def describe(self) -> dict[str, Any]:
        """The options as JSON-able values (for summaries and the manifest)."""
        out: dict[str, Any] = {"source": self.kind, "split": self.split}
        out.update({"layout": self.layout} if self.kind == "ofa-tsv" else {"task": self.task})
        if self.dataset is not None:
            out["dataset"] = self.dataset
        if self.key_map:
            out["key_map"] = {role: list(c) for role, c in self.key_map}
        return out


# --- one input file: a Ray task ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _PartJob:
    index: int
    file: InputFile
    output: str
    source: RawSource
    s3: S3Options | None
    shard_bytes: int
    row_group_rows: int
    limit: int | None  # records (rows + bad rows) to read at most
    list_bad: int  # BadRows to return in full


@dataclass
class _PartResult:
    index: int
    file: str
    records: int  # input records read (rows + bad rows)
    stats: RowStats  # rows written by task, bad rows by reason and task with example ids
    bad_rows: list[BadRow]  # the first `list_bad` in full
    manifest: Manifest  # shard paths relative to the part directory
    id_hashes: np.ndarray  # uint64, one per row written
    seconds: float


def part_dir(index: int) -> str:
    """The directory (relative to the corpus) holding the shards of input file `index`."""
    return f"part-{index:05d}"


def _id_hash(row_id: str) -> bytes:
    return hashlib.blake2b(row_id.encode(), digest_size=8).digest()


def _convert_part(job: _PartJob) -> _PartResult:
    """Ray task body: read one input file, write its rows under part-<k>/; raises ValueError (duplicate id
    in the file) or OSError (output not writable). Bad input never raises."""
    t0 = time.monotonic()
    part_uri = storage.join(job.output, part_dir(job.index))
    delete_dir(part_uri, job.s3)  # this task owns the directory: a retry after a crash starts afresh
    task = job.source.row_task
    records, stats, bad_rows, hashes = 0, RowStats(), [], []
    writer = ShardWriter(part_uri, shard_bytes=job.shard_bytes, row_group_rows=job.row_group_rows, s3=job.s3,
                         created_by="pipelines.data.raw_convert")
    with writer:
        for item in job.source.read(job.file, job.s3):
            if job.limit is not None and records >= job.limit:
                break
            records += 1
            if isinstance(item, BadRow):
                stats.add_bad(item.reason, item.id or item.source, task)
                if len(bad_rows) < job.list_bad:
                    bad_rows.append(item)
                continue
            try:
                writer.write(item)
            except ValueError as exc:  # a duplicate id within this file
                raise ValueError(f"{storage.redact(job.file.uri)}: {exc}") from None
            stats.add_ok(item["task"])
            hashes.append(_id_hash(item["id"]))
    manifest = writer.close()
    storage.delete_file(storage.join(part_uri, MANIFEST_NAME), s3=job.s3)  # the merged manifest lists the part
    if not manifest.shards:
        delete_dir(part_uri, job.s3)
    id_hashes = np.frombuffer(b"".join(hashes), dtype="<u8").copy()
    return _PartResult(job.index, job.file.uri, records, stats, bad_rows, manifest, id_hashes,
                       time.monotonic() - t0)


def delete_dir(uri: str, s3: S3Options | None = None) -> None:
    """Delete the directory (S3: every object under the prefix) at `uri`, if there is one."""
    fs, path = storage.resolve(uri, s3)
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
    except FileNotFoundError:
        pass


# --- the driver -----------------------------------------------------------------------------------------


def _absolute(uri: str) -> str:
    """A local path made absolute here: Ray workers do not share the driver's working directory."""
    fs, path = storage.resolve(uri)  # raises for an unsupported scheme
    return path if isinstance(fs, pafs.LocalFileSystem) and "://" not in uri else uri


def _check_output(output: str, s3: S3Options | None) -> None:
    """OutputError unless `output` holds no corpus: no manifest.json, no *.parquet, no part-* entry."""
    try:
        fs, path = storage.resolve(output, s3)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot write output {storage.redact(output)}: {storage.redact(str(exc))}") from exc
    clash = sorted(i.base_name for i in infos
                   if i.base_name == MANIFEST_NAME or i.base_name.endswith(".parquet") or i.base_name.startswith("part-"))
    if clash:
        raise OutputError(f"cannot write output {storage.redact(output)}: it already holds a corpus ({len(clash)} "
                          f"entries, e.g. {clash[0]}); write to a new location or delete it first")


def _remove_parts(output: str, s3: S3Options | None) -> None:
    try:
        fs, path = storage.resolve(output, s3)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
        for info in infos:
            if info.type == pafs.FileType.Directory and info.base_name.startswith("part-"):
                fs.delete_dir(info.path)
    except OSError as exc:
        logger.warning("could not remove the parts of failed conversion %s: %s", storage.redact(output),
                       storage.redact(str(exc)))


def _task_error(exc: Exception) -> Exception:
    """A task's input/output error as the driver raises it (one line, no remote traceback)."""
    import ray

    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
    if isinstance(cause, ValueError):
        return ValueError(str(cause))
    if isinstance(cause, OSError):
        return OutputError(f"cannot write output: {storage.redact(str(cause))}")
    return exc


def _run_parts(jobs: list[_PartJob], *, limit: int | None, concurrency: int, num_cpus: float,
               progress: Progress) -> list[_PartResult]:
    """Run one task per job, at most `concurrency` at once. With a `limit`, files go one at a time in order,
    each reading what is left of the limit, so the rows kept are the same whatever the parallelism."""
    import ray

    remote = ray.remote(_convert_part).options(num_cpus=num_cpus, max_retries=2, name="raw_convert.part")
    results: list[_PartResult] = []
    pending, in_flight = list(jobs), []
    left, ok, bad = limit, 0, 0
    try:
        while pending or in_flight:
            while pending and len(in_flight) < (1 if limit is not None else concurrency):
                job = pending.pop(0)
                if left is not None:
                    job = replace(job, limit=left)
                in_flight.append(remote.remote(job))
            done, in_flight = ray.wait(in_flight, num_returns=1)
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                raise _task_error(exc) from None
            results.append(result)
            ok, bad = ok + result.stats.ok, bad + result.stats.bad
            progress.update(len(results), extra={"rows ok": ok, "bad": bad}, force=len(results) == len(jobs))
            if left is not None:
                left -= result.records
                if left <= 0:
                    pending = []
    except BaseException:
        for ref in in_flight:
            ray.cancel(ref)
        for ref in in_flight:
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 -- cancelled or failed; its ShardWriter cleaned up after itself
                pass
        raise
    return sorted(results, key=lambda r: r.index)


def _check_ids_across_files(results: Sequence[_PartResult], output: str, s3: S3Options | None) -> None:
    """ValueError naming the ids that occur in more than one input file.

    Every part returned an 8-byte hash per id; equal hashes in two parts are confirmed by reading the ids
    of those parts' shards, so the check is exact. It holds 8 bytes per row at the driver (80 MB for 10^7
    rows). Layouts without an id column cannot clash across files: their ids hold the file's name.
    """
    sizes = [len(r.id_hashes) for r in results]
    if sum(sizes) < 2:
        return
    hashes = np.concatenate([r.id_hashes for r in results])
    owners = np.repeat(np.arange(len(results)), sizes)
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    if not same.size:
        return
    suspect_hashes = {int(h) for h in ordered[same]}
    suspects = {int(owners[order[i]]) for i in same} | {int(owners[order[i + 1]]) for i in same}
    files_of: dict[str, list[str]] = {}
    for k in sorted(suspects):
        result = results[k]
        for shard in result.manifest.shards:
            shard_uri = storage.join(output, part_dir(result.index), shard["path"])
            fs, path = storage.resolve(shard_uri, s3)
            for row_id in pq.read_table(path, columns=["id"], filesystem=fs).column("id").to_pylist():
                if int.from_bytes(_id_hash(row_id), "little") in suspect_hashes:
                    files_of.setdefault(row_id, []).append(storage.redact(result.file))
    dups = {i: f for i, f in files_of.items() if len(f) > 1}
    if dups:
        shown = "; ".join(f"{i!r} in {' and '.join(f)}" for i, f in sorted(dups.items())[:3])
        raise ValueError(f"{len(dups)} row id(s) occur in more than one input file, e.g. {shown}; ids must be unique "
                         "in a corpus (convert the files separately, or give each its own --dataset)")


def _merge(results: Sequence[_PartResult], conversion: dict[str, Any]) -> Manifest:
    shards, counts, total = [], {}, 0
    for r in results:
        for s in r.manifest.shards:
            shards.append({**s, "path": f"{part_dir(r.index)}/{s['path']}"})
            by_task = counts.setdefault(s["split"], {})
            by_task[s["task"]] = by_task.get(s["task"], 0) + s["num_rows"]
        fp = r.manifest.fingerprint
        if not fp.startswith(_FINGERPRINT_PREFIX):
            raise AssertionError(f"unexpected fingerprint format {fp!r}")
        total = (total + int(fp[len(_FINGERPRINT_PREFIX):], 16)) % FINGERPRINT_MOD
    return Manifest(
        schema_version=SCHEMA_VERSION,
        num_rows=sum(s["num_rows"] for s in shards),
        counts={split: dict(sorted(t.items())) for split, t in sorted(counts.items())},
        shards=sorted(shards, key=lambda s: s["path"]),
        fingerprint=f"{_FINGERPRINT_PREFIX}{total:064x}",
        created_by=f"pipelines.data.raw_convert({conversion['source']})",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        conversion=conversion,
    )


def convert_raw(
    source: RawSource,
    input_uri: str,
    output: str,
    *,
    s3: S3Options | None = None,
    limit: int | None = None,
    shard_mb: float = 128,
    row_group_rows: int = 256,
    concurrency: int | None = None,
    num_cpus: float = 1.0,
    log_every_s: float = 10.0,
    list_bad: int = 0,
) -> dict[str, Any]:
    """Convert the file or every matching file under `input_uri` into a canonical corpus at `output`,
    one Ray task per file on the Ray cluster this process is connected to (`ray.init` first); returns the
    summary.

    limit: at most this many input records (rows + bad rows) in all, the first ones in file order.
    concurrency: tasks at once (None: twice the cluster's CPUs / num_cpus). num_cpus: CPUs per task.
    list_bad: also return the first `list_bad` bad rows in full (id, reason, detail, source).
    Summary: {source, split, layout|task, input, output, files, records, rows_ok, rows_bad: {reason: n},
    bad_examples: {reason: [ids]}, bad_by_task, counts: {split: {task: n}}, num_shards, fingerprint,
    seconds, rows_per_s} (+ bad_rows). Raises ValueError / FileNotFoundError for bad options or input
    and for duplicate ids, OutputError when the output cannot be written; nothing is left behind then.
    """
    import ray

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    if shard_mb <= 0 or num_cpus <= 0 or (concurrency is not None and concurrency < 1):
        raise ValueError(f"shard_mb and num_cpus must be positive and concurrency >= 1, got {shard_mb}, "
                         f"{num_cpus}, {concurrency}")
    t0 = time.monotonic()
    input_uri, output = _absolute(input_uri), _absolute(output)
    files = input_files(input_uri, source.suffixes, s3)
    _check_output(output, s3)
    if concurrency is None:
        concurrency = max(1, int(2 * ray.cluster_resources().get("CPU", 1) // num_cpus))
    jobs = [_PartJob(k, f, output, source, s3, int(shard_mb * 2**20), row_group_rows, limit, list_bad)
            for k, f in enumerate(files)]
    logger.info("%s: converting %d file(s) under %s into %s, %d task(s) at once", source.kind, len(files),
                storage.redact(input_uri), storage.redact(output), concurrency)
    try:
        progress = Progress(source.kind, len(files), log_every_s, unit="files", extra_rates={"rows ok": "rows"},
                            logger=logger)
        results = _run_parts(jobs, limit=limit, concurrency=concurrency, num_cpus=num_cpus, progress=progress)
        _check_ids_across_files(results, output, s3)
        stats, records = RowStats(), sum(r.records for r in results)
        for r in results:
            stats.merge(r.stats)
        bad_rows = [b for r in results for b in r.bad_rows][:list_bad]
        conversion = {**source.describe(), "input": storage.redact(input_uri), "files": len(files),
                      "files_read": len(results), "records": records, "rows_ok": stats.ok,
                      "rows_bad": dict(sorted(stats.bad_by_reason.items())),
                      "bad_examples": dict(sorted(stats.examples.items()))}
        manifest = _merge(results, conversion)
        storage.write_bytes(storage.join(output, MANIFEST_NAME), manifest.to_json().encode(), s3=s3)
    except BaseException as exc:
        _remove_parts(output, s3)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write output {storage.redact(output)}: {storage.redact(str(exc))}") from exc
        raise
    seconds = time.monotonic() - t0
    summary = {
        **conversion,
        "output": storage.redact(output),
        "bad_by_task": dict(sorted(stats.bad_by_task.items())),
        "counts": manifest.counts,
        "num_shards": len(manifest.shards),
        "fingerprint": manifest.fingerprint,
        "seconds": round(seconds, 3),
        "rows_per_s": round(stats.ok / max(seconds, 1e-9), 1),
    }
    if list_bad:
        summary["bad_rows"] = [{"id": b.id, "reason": b.reason, "detail": b.detail, "source": b.source}
                               for b in bad_rows]
    logger.info("%s: done, %d rows ok, %d bad (%s) in %.1f s", source.kind, stats.ok, stats.bad,
                ", ".join(f"{r} {n}" for r, n in sorted(stats.bad_by_reason.items())) or "none", seconds)
    return summary


def key_map_option(values: Sequence[str] | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """["text=json:expr", "box=json:bbox,json:box"] -> RawSource.key_map; ValueError for a malformed entry."""
    out = []
    for value in values or ():
        role, sep, cands = value.partition("=")
        names = tuple(c.strip() for c in cands.split(",") if c.strip())
        if not sep or not role.strip() or not names:
            raise ValueError(f"--key-map takes ROLE=CANDIDATE[,CANDIDATE...], e.g. text=json:expr; got {value!r}")
        out.append((role.strip(), names))
    return tuple(out)

