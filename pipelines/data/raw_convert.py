"""Convert OFA TSV files or WebDataset tars into one canonical corpus, in parallel on Ray; resumable, and able to
add files to a corpus.

    convert_raw(RawSource("ofa-tsv", split="train", layout="vqa"), "s3://b/vqa_tsv/", "s3://b/corpus/")

Parts. The driver lists the input files (`pipelines.data.readers.files.input_files`, sorted) and cuts them into
parts: a file each, and a TSV file larger than `range_mb` into byte ranges aligned to line starts, so one 40 GB
file converts on every CPU the cluster gives it. One Ray task per part k reads it with the readers and writes
its rows with a `pipelines.data.shards.ShardWriter` into its own directory of the output corpus, `part-<k>/`:
shard names never collide, and a task retried after a crash clears its directory and starts again. Row ids are
the readers' (the TSV id column, the WebDataset key, or the file's name below the input directory + the line's
index in it: the ranges of a file are numbered from the lines counted before them, one small task per range),
so they do not depend on the partition, on which worker read a part, nor on how many ran at once.

Merge. When every part is done the driver merges them into `<output>/manifest.json`, written last as for any
corpus: every shard (paths `part-<k>/<split>-<task>-<n>.parquet`), rows per split and task, and the fingerprint,
the sum of the parts' fingerprints mod 2**256, which is what one ShardWriter fed every row computes
(`shards.fingerprint_of`). Its `conversion` entry keeps what was read and rejected: files, parts, records, rows
ok, bad rows by reason with example ids.

Resume. The conversion first writes its plan (`conversion-plan.json`: source, options, the input files with
their sizes and times) and every part, when finished, its result (`_done.json`, after its ids' hashes
`_ids.u64`). A conversion that fails or is killed keeps its finished parts: the same command again converts
only the others, and ends with the corpus a clean run writes (same rows, ids and fingerprint). An output holding
another conversion's plan is refused, naming what differs. A conversion that cannot succeed as it stands
(duplicate ids) removes its parts.

Append. With `append`, the parts are added after those of the corpus at the output, and the new manifest lists
both (its fingerprint is the sum of both; `conversion.appended_to` keeps the earlier one).

Ids must be unique in a corpus. Within a part its ShardWriter checks them as it writes (16-byte hashes); across
parts, and against the corpus appended to, the driver checks them at the end (`_check_ids_across_parts`). A
duplicate id is an error that names the id and where it occurs: it is not a bad row, since either copy could be
the right one.
"""

import dataclasses
import hashlib
import json
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
from pipelines.data.shards import FINGERPRINT_MOD, MANIFEST_NAME, Manifest, ShardWriter, read_manifest
from pipelines.progress import Progress
from pipelines.storage import S3Options

logger = logging.getLogger(__name__)

_FINGERPRINT_PREFIX = "sum-sha256:"  # shards.fingerprint_of's format
PLAN_FILE = "conversion-plan.json"  # what a conversion in progress converts: a rerun resumes it if it is the same
DONE_FILE = "_done.json"  # in a part directory: the part finished (its result, written last)
IDS_FILE = "_ids.u64"  # in a part directory: the 8-byte hashes of its row ids (the cross-part id check)
RANGE_MB = 256.0  # a TSV file larger than this is read in ranges of this size by as many tasks
IN_FLIGHT_WAIT_S = 600.0  # a failed conversion waits this long for the parts still running


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

    @property
    def splittable(self) -> bool:
        """Whether one file can be read in byte ranges by several tasks (TSV lines: yes; tar members: no)."""
        return self.kind == "ofa-tsv"

    def read(self, file: InputFile, s3: S3Options | None, at: "_Range | None" = None) -> Iterator[dict | BadRow]:
        if self.kind == "ofa-tsv":
            ranged = {} if at is None else {"byte_range": (at.start, at.end), "first_line": at.first_line,
                                            "first_index": at.first_index}
            return ofa_tsv.read_ofa_tsv_file(file, self.layout, split=self.split, s3=s3, dataset=self.dataset,
                                             **ranged)
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
class _Range:
    """Bytes [start, end) of a file: the lines that start there (`ofa_tsv._read_lines`); the first of them is
    line `first_line` of the file and, when not blank, its `first_index`-th non-blank line."""

    start: int
    end: int
    first_line: int = 1
    first_index: int = 0


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
    at: _Range | None = None  # None: the whole file

    @property
    def where(self) -> str:
        """The file, and the byte range when it is one part of several (for messages)."""
        where = storage.redact(self.file.uri)
        return where if self.at is None else f"{where} bytes {self.at.start}-{self.at.end}"


@dataclass
class _PartResult:
    index: int
    file: str  # where it read (`_PartJob.where`)
    records: int  # input records read (rows + bad rows)
    stats: RowStats  # rows written by task, bad rows by reason and task with example ids
    bad_rows: list[BadRow]  # the first `list_bad` in full
    manifest: Manifest  # shard paths relative to the part directory
    id_hashes: np.ndarray  # uint64, one per row written
    seconds: float

    def save(self, part_uri: str, s3: S3Options | None) -> None:
        """Mark the part finished: its ids (`IDS_FILE`), then its result (`DONE_FILE`, written last)."""
        storage.write_bytes(storage.join(part_uri, IDS_FILE), self.id_hashes.astype("<u8").tobytes(), s3=s3)
        done = {"index": self.index, "file": self.file, "records": self.records, "stats": self.stats.to_dict(),
                "bad_rows": [dataclasses.asdict(b) for b in self.bad_rows], "manifest": self.manifest.to_json(),
                "seconds": self.seconds}
        storage.write_bytes(storage.join(part_uri, DONE_FILE), json.dumps(done).encode(), s3=s3)

    @classmethod
    def load(cls, part_uri: str, s3: S3Options | None) -> "_PartResult | None":
        """The result a finished part saved; None when the part did not finish (or is not there)."""
        try:
            done = json.loads(storage.read_bytes(storage.join(part_uri, DONE_FILE), s3))
            ids = storage.read_bytes(storage.join(part_uri, IDS_FILE), s3)
        except FileNotFoundError:
            return None
        return cls(done["index"], done["file"], done["records"], RowStats.from_dict(done["stats"]),
                   [BadRow(**b) for b in done["bad_rows"]], Manifest.from_json(done["manifest"]),
                   np.frombuffer(ids, dtype="<u8").copy(), done["seconds"])


def part_dir(index: int) -> str:
    """The directory (relative to the corpus) holding the shards of part `index` (a file, or a byte range
    of one)."""
    return f"part-{index:05d}"


def _id_hash(row_id: str) -> bytes:
    return hashlib.blake2b(row_id.encode(), digest_size=8).digest()


def _convert_part(job: _PartJob) -> _PartResult:
    """Ray task body: read one input file (or byte range of one), write its rows under part-<k>/ and mark the
    part finished (`_PartResult.save`); raises ValueError (duplicate id in the part) or OSError (output not
    writable). Bad input never raises."""
    t0 = time.monotonic()
    part_uri = storage.join(job.output, part_dir(job.index))
    delete_dir(part_uri, job.s3)  # this task owns the directory: a retry after a crash starts afresh
    task = job.source.row_task
    records, stats, bad_rows, hashes = 0, RowStats(), [], []
    writer = ShardWriter(part_uri, shard_bytes=job.shard_bytes, row_group_rows=job.row_group_rows, s3=job.s3,
                         created_by="pipelines.data.raw_convert")
    with writer:
        for item in job.source.read(job.file, job.s3, job.at):
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
            except ValueError as exc:  # a duplicate id within this part
                raise ValueError(f"{job.where}: {exc}") from None
            stats.add_ok(item["task"])
            hashes.append(_id_hash(item["id"]))
    manifest = writer.close()
    storage.delete_file(storage.join(part_uri, MANIFEST_NAME), s3=job.s3)  # the merged manifest lists the part
    id_hashes = np.frombuffer(b"".join(hashes), dtype="<u8").copy()
    result = _PartResult(job.index, job.where, records, stats, bad_rows, manifest, id_hashes,
                         time.monotonic() - t0)
    result.save(part_uri, job.s3)
    return result


def _count_range(file: InputFile, at: _Range, s3: S3Options | None) -> tuple[int, int]:
    """Ray task body: (lines, non-blank lines) starting in `at`, for the numbering of the ranges after it."""
    return ofa_tsv.count_lines(file.uri, s3, (at.start, at.end))


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


# --- the output: a new corpus, an unfinished conversion to resume, or a corpus to append to -----------------


def _entries(output: str, s3: S3Options | None) -> list[pafs.FileInfo]:
    try:
        fs, path = storage.resolve(output, s3)
        return fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot write output {storage.redact(output)}: {storage.redact(str(exc))}") from exc


def _part_index(name: str) -> int | None:
    """k for a directory named part-<k>, else None."""
    if name.startswith("part-") and name[5:].isdigit():
        return int(name[5:])
    return None


@dataclass
class _Output:
    """What a conversion finds at its output: the corpus it appends to (None: a new corpus), the index of its
    first part, and the parts an earlier run of the same conversion finished (index -> result)."""

    base: Manifest | None
    first: int
    finished: dict[int, _PartResult]


def _open_output(output: str, s3: S3Options | None, plan: dict[str, Any], append: bool) -> _Output:
    """Check `output` against this conversion (see `convert_raw`) and find what an earlier run of it finished;
    writes the plan file when the conversion starts afresh. OutputError for an output this conversion must not
    touch."""
    where = storage.redact(output)
    entries = {i.base_name: i for i in _entries(output, s3)}
    base = None
    if MANIFEST_NAME in entries:
        if not append:
            raise OutputError(f"cannot write output {where}: it already holds a corpus (manifest.json); write to a "
                              f"new location, delete it first, or add files to it with --append")
        base = read_manifest(output, s3)
    elif append:
        raise OutputError(f"cannot append to {where}: it holds no corpus (no manifest.json)")
    plan = {**plan, "append_to": base.fingerprint if base is not None else None}
    ours = {k for k in (_part_index(n) for n in entries) if k is not None}
    if base is not None:
        theirs = {_part_index(s["path"].split("/", 1)[0]) for s in base.shards}
        theirs.discard(None)
        first = max(theirs, default=-1) + 1
        ours = {k for k in ours if k >= first}
    else:
        first = 0
        stray = sorted(n for n in entries if n.endswith(".parquet"))
        if stray:
            raise OutputError(f"cannot write output {where}: it already holds a corpus ({stray[0]}); write to a "
                              f"new location or delete it first")
    plan_uri = storage.join(output, PLAN_FILE)
    if PLAN_FILE in entries:
        found = json.loads(storage.read_bytes(plan_uri, s3))
        if found != plan:
            changed = sorted(k for k in set(found) | set(plan) if found.get(k) != plan.get(k))
            raise OutputError(f"cannot write output {where}: it holds an unfinished conversion of other input or "
                              f"options (differing: {', '.join(changed)}); rerun that command to finish it, or "
                              f"delete {PLAN_FILE} and the part-* directories after the corpus's own")
        finished = {}
        for k in sorted(ours):
            result = _PartResult.load(storage.join(output, part_dir(k)), s3)
            if result is not None:
                finished[k] = result
        logger.info("%s: resuming: %d part(s) of the earlier run are finished and kept", where, len(finished))
        return _Output(base, first, finished)
    if ours:
        raise OutputError(f"cannot write output {where}: it already holds a corpus ({part_dir(min(ours))}); write "
                          f"to a new location or delete it first")
    storage.write_bytes(plan_uri, json.dumps(plan, sort_keys=True).encode(), s3=s3)
    return _Output(base, first, {})


def _remove_new_parts(output: str, s3: S3Options | None, first: int) -> None:
    """Delete the parts from `first` on and the plan file (a conversion that cannot succeed as it stands)."""
    try:
        fs, path = storage.resolve(output, s3)
        for info in _entries(output, s3):
            k = _part_index(info.base_name)
            if info.type == pafs.FileType.Directory and k is not None and k >= first:
                fs.delete_dir(info.path)
        storage.delete_file(storage.join(output, PLAN_FILE), s3)
    except (OSError, OutputError) as exc:
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


# --- the parts: a file each, or byte ranges of a large TSV file ---------------------------------------------


def _file_infos(files: Sequence[InputFile], s3: S3Options | None) -> list[pafs.FileInfo]:
    out = []
    for f in files:
        fs, path = storage.resolve(f.uri, s3)
        try:
            out.append(fs.get_file_info(path))
        except OSError as exc:
            raise OSError(f"cannot stat {storage.redact(f.uri)}: {storage.redact(str(exc))}") from exc
    return out


def _ranges(source: RawSource, files: Sequence[InputFile], infos: Sequence[pafs.FileInfo], range_bytes: int,
            s3: S3Options | None, num_cpus: float) -> list[list[_Range | None]]:
    """Per file: [None] (read whole), or its byte ranges numbered from the lines counted before each (one Ray
    task per range but the last counts its lines)."""
    import ray

    spans: list[list[tuple[int, int]]] = []
    for info in infos:
        size = info.size or 0
        if source.splittable and size > range_bytes:
            spans.append([(a, min(a + range_bytes, size)) for a in range(0, size, range_bytes)])
        else:
            spans.append([])
    count = ray.remote(_count_range).options(num_cpus=num_cpus, max_retries=2, name="raw_convert.count")
    refs = {(i, r): count.remote(files[i], _Range(*span), s3)
            for i, file_spans in enumerate(spans) for r, span in enumerate(file_spans[:-1])}
    try:
        counts = dict(zip(refs, ray.get(list(refs.values())), strict=True))
    except ray.exceptions.RayTaskError as exc:
        raise _task_error(exc) from None
    out: list[list[_Range | None]] = []
    for i, file_spans in enumerate(spans):
        if not file_spans:
            out.append([None])
            continue
        line, index, ranges = 1, 0, []
        for r, (start, end) in enumerate(file_spans):
            ranges.append(_Range(start, end, line, index))
            if r < len(file_spans) - 1:
                lines, non_blank = counts[(i, r)]
                line, index = line + lines, index + non_blank
        out.append(ranges)
    return out


def _run_parts(jobs: list[_PartJob], finished: dict[int, _PartResult], *, limit: int | None, concurrency: int,
               num_cpus: float, progress: Progress) -> list[_PartResult]:
    """Run one task per job not `finished` yet, at most `concurrency` at once. With a `limit`, parts go one at a
    time in order, each reading what is left of the limit, so the rows kept are the same whatever the
    parallelism (and after a resume)."""
    import ray

    remote = ray.remote(_convert_part).options(num_cpus=num_cpus, max_retries=2, name="raw_convert.part")
    results = [finished[j.index] for j in jobs if j.index in finished]
    pending, in_flight = [j for j in jobs if j.index not in finished], []
    left = None if limit is None else limit - sum(r.records for r in results)
    ok, bad = sum(r.stats.ok for r in results), sum(r.stats.bad for r in results)
    if left is not None and left <= 0:
        pending = []
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
        # The parts in flight are left to finish, not cancelled: a cancel that crosses a task's completion aborts
        # this driver in Ray 2.60 (task_manager "Tried to complete task that was not pending", seen in the
        # duplicate-id test), and a part that finishes is kept for a resume. Bounded: past it, Ray stops them
        # with this driver.
        if in_flight:
            ray.wait(in_flight, num_returns=len(in_flight), timeout=IN_FLIGHT_WAIT_S)
        raise
    return sorted(results, key=lambda r: r.index)


# --- ids unique across parts, and the merged manifest -------------------------------------------------------


@dataclass(frozen=True)
class _IdGroup:
    """The ids of one part (or of one directory of the corpus appended to): where they came from, the shards
    holding them, and their 8-byte hashes."""

    where: str
    shard_uris: tuple[str, ...]
    hashes: np.ndarray


def _part_ids(results: Sequence[_PartResult], output: str) -> list[_IdGroup]:
    return [_IdGroup(r.file, tuple(storage.join(output, part_dir(r.index), s["path"]) for s in r.manifest.shards),
                     r.id_hashes) for r in results]


def _base_ids(base: Manifest, output: str, s3: S3Options | None) -> list[_IdGroup]:
    """The ids of the corpus appended to, one group per part directory (its saved hashes when it has them,
    else its shards' id column) or per shard outside one."""
    groups: dict[str, list[str]] = {}
    for shard in base.shards:
        top = shard["path"].split("/", 1)[0]
        groups.setdefault(top if "/" in shard["path"] else shard["path"], []).append(shard["path"])
    out = []
    for top, paths in groups.items():
        uris = tuple(storage.join(output, p) for p in paths)
        try:
            hashes = np.frombuffer(storage.read_bytes(storage.join(output, top, IDS_FILE), s3), dtype="<u8").copy()
        except FileNotFoundError:
            ids = [i for u in uris for i in _read_ids(u, s3)]
            hashes = np.frombuffer(b"".join(_id_hash(i) for i in ids), dtype="<u8").copy()
        out.append(_IdGroup(f"{storage.redact(output)}/{top} (the corpus appended to)", uris, hashes))
    return out


def _read_ids(shard_uri: str, s3: S3Options | None) -> list[str]:
    fs, path = storage.resolve(shard_uri, s3)
    return pq.read_table(path, columns=["id"], filesystem=fs).column("id").to_pylist()


def _check_ids_across_parts(groups: Sequence[_IdGroup], s3: S3Options | None) -> None:
    """ValueError naming the ids that occur in more than one part.

    Equal hashes in two groups are confirmed by reading the ids of those groups' shards, so the check is exact.
    It holds 8 bytes per row at the driver (80 MB for 10^7 rows). Layouts without an id column cannot clash
    across files: their ids hold the file's name.
    """
    sizes = [len(g.hashes) for g in groups]
    if sum(sizes) < 2:
        return
    hashes = np.concatenate([g.hashes for g in groups])
    owners = np.repeat(np.arange(len(groups)), sizes)
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    if not same.size:
        return
    suspect_hashes = {int(h) for h in ordered[same]}
    suspects = {int(owners[order[i]]) for i in same} | {int(owners[order[i + 1]]) for i in same}
    places: dict[str, list[str]] = {}
    for k in sorted(suspects):
        for shard_uri in groups[k].shard_uris:
            for row_id in _read_ids(shard_uri, s3):
                if int.from_bytes(_id_hash(row_id), "little") in suspect_hashes:
                    places.setdefault(row_id, []).append(groups[k].where)
    dups = {i: f for i, f in places.items() if len(f) > 1}
    if dups:
        shown = "; ".join(f"{i!r} in {' and '.join(f)}" for i, f in sorted(dups.items())[:3])
        raise ValueError(f"{len(dups)} row id(s) occur more than once in the input, e.g. {shown}; ids must be "
                         "unique in a corpus (convert the files separately, or give each its own --dataset)")


def _merge(results: Sequence[_PartResult], conversion: dict[str, Any], base: Manifest | None) -> Manifest:
    """The corpus's manifest: `base`'s shards (when appending) and every part's."""
    shards = list(base.shards) if base is not None else []
    for r in results:
        shards += [{**s, "path": f"{part_dir(r.index)}/{s['path']}"} for s in r.manifest.shards]
    total = 0
    for fp in [r.manifest.fingerprint for r in results] + ([base.fingerprint] if base is not None else []):
        if not fp.startswith(_FINGERPRINT_PREFIX):
            raise AssertionError(f"unexpected fingerprint format {fp!r}")
        total = (total + int(fp[len(_FINGERPRINT_PREFIX):], 16)) % FINGERPRINT_MOD
    counts: dict[str, dict[str, int]] = {}
    for s in shards:
        by_task = counts.setdefault(s["split"], {})
        by_task[s["task"]] = by_task.get(s["task"], 0) + s["num_rows"]
    if base is not None:
        conversion = {**conversion, "appended_to": {"fingerprint": base.fingerprint, "num_rows": base.num_rows,
                                                    "conversion": base.conversion}}
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
    range_mb: float = RANGE_MB,
    append: bool = False,
) -> dict[str, Any]:
    """Convert the file or every matching file under `input_uri` into a canonical corpus at `output`, on the Ray
    cluster this process is connected to (`ray.init` first); returns the summary.

    Parts: one Ray task per file, and a TSV file over `range_mb` is read in ranges of that size aligned to line
    starts, one task each, so one large file converts on every CPU the cluster gives it. A part's rows and ids
    do not depend on the partition: the ranges of a file are numbered from the lines counted before them.

    Resume: the conversion writes its plan (source, options, input files with sizes and times) to
    `conversion-plan.json` first, and each part marks itself finished. A run that fails or is killed keeps its
    finished parts; the same command again converts only the rest, and ends with the corpus a clean run writes
    (same rows, ids and fingerprint). Another conversion into that output is refused, naming what differs.
    A conversion that cannot succeed as it stands (duplicate ids) removes its parts.

    append: add the input's rows to the corpus at `output` (new parts after its own); an id the corpus
    already holds is refused like any duplicate.

    limit: at most this many input records (rows + bad rows) in all, the first ones in file order.
    concurrency: tasks at once (None: twice the cluster's CPUs / num_cpus). num_cpus: CPUs per task.
    list_bad: also return the first `list_bad` bad rows in full (id, reason, detail, source).
    Summary: {source, split, layout|task, input, output, files, parts, records, rows_ok, rows_bad: {reason: n},
    bad_examples: {reason: [ids]}, bad_by_task, counts: {split: {task: n}}, num_shards, fingerprint,
    seconds, rows_per_s, resumed_parts} (+ bad_rows). Raises ValueError / FileNotFoundError for bad options or
    input and for duplicate ids, OutputError when the output cannot be written.
    """
    import ray

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    if shard_mb <= 0 or num_cpus <= 0 or range_mb <= 0 or (concurrency is not None and concurrency < 1):
        raise ValueError(f"shard_mb, range_mb and num_cpus must be positive and concurrency >= 1, got {shard_mb}, "
                         f"{range_mb}, {num_cpus}, {concurrency}")
    t0 = time.monotonic()
    input_uri, output = _absolute(input_uri), _absolute(output)
    files = input_files(input_uri, source.suffixes, s3)
    infos = _file_infos(files, s3)
    range_bytes, shard_bytes = max(1, int(range_mb * 2**20)), int(shard_mb * 2**20)
    plan = {"source": source.describe(), "input": storage.redact(input_uri), "range_bytes": range_bytes,
            "shard_bytes": shard_bytes, "row_group_rows": row_group_rows, "limit": limit,
            "files": [[f.name, i.size, i.mtime_ns] for f, i in zip(files, infos, strict=True)]}
    out = _open_output(output, s3, plan, append)
    if concurrency is None:
        concurrency = max(1, int(2 * ray.cluster_resources().get("CPU", 1) // num_cpus))
    try:
        ranges = _ranges(source, files, infos, range_bytes, s3, num_cpus)
        jobs = [_PartJob(out.first + k, f, output, source, s3, shard_bytes, row_group_rows, limit, list_bad, at)
                for k, (f, at) in enumerate((f, at) for f, file_ranges in zip(files, ranges, strict=True)
                                            for at in file_ranges)]
        split = len(jobs) > len(files)
        logger.info("%s: converting %d file(s)%s under %s into %s, %d task(s) at once", source.kind, len(files),
                    f" in {len(jobs)} parts" if split else "", storage.redact(input_uri), storage.redact(output),
                    concurrency)
        progress = Progress(source.kind, len(jobs), log_every_s, unit="parts" if split else "files",
                            extra_rates={"rows ok": "rows"}, logger=logger)
        results = _run_parts(jobs, out.finished, limit=limit, concurrency=concurrency, num_cpus=num_cpus,
                             progress=progress)
        by_index = {j.index: j for j in jobs}
        groups = _part_ids(results, output) + (_base_ids(out.base, output, s3) if out.base is not None else [])
        _check_ids_across_parts(groups, s3)
        stats, records = RowStats(), sum(r.records for r in results)
        for r in results:
            stats.merge(r.stats)
        bad_rows = [b for r in results for b in r.bad_rows][:list_bad]
        conversion = {**source.describe(), "input": storage.redact(input_uri), "files": len(files),
                      "parts": len(jobs), "files_read": len({by_index[r.index].file.uri for r in results}),
                      "records": records, "rows_ok": stats.ok, "rows_bad": dict(sorted(stats.bad_by_reason.items())),
                      "bad_examples": dict(sorted(stats.examples.items()))}
        manifest = _merge(results, conversion, out.base)
        storage.write_bytes(storage.join(output, MANIFEST_NAME), manifest.to_json().encode(), s3=s3)
        storage.delete_file(storage.join(output, PLAN_FILE), s3)
    except ValueError:
        _remove_new_parts(output, s3, out.first)
        raise
    except BaseException as exc:
        logger.warning("%s: conversion stopped (%s); its finished parts are kept: rerun the same command to "
                       "resume", storage.redact(output), type(exc).__name__)
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
        "resumed_parts": len(out.finished),
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

