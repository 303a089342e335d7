"""The canonical corpus format: Parquet shards of `pipelines.data.schema.SCHEMA` plus a `manifest.json`.

Layout of a corpus directory (local, file:// or s3://):

    <corpus>/manifest.json                     written last: a corpus without it is unfinished
    <corpus>/<split>-<task>-00000.parquet      one shard holds rows of one split and one task
    <corpus>/<split>-<task>-00001.parquet      ...

One split and one task per shard lets readers pick files (e.g. every `val` shard of `vqa`) from the
manifest alone, without opening Parquet footers. A shard is closed once the rows in it reach `shard_bytes`
(raw size: image bytes + text + list entries, a good proxy for images that are already compressed), and
is cut into row groups of `row_group_rows` rows, the unit Ray Data and pyarrow read at a time.

Shards are written without the Arrow schema in their metadata, so `box` (fixed_size_list<float32, 4>)
and `object_boxes` read back as variable `list<float32>` / `list<list<float32>>`: pyarrow < 26 cannot read
a nullable fixed-size list with nulls from Parquet ("Expected all lists to be of size=4 but index 1 had
size=0", apache/arrow#35692). Cast with `canonical_schema(names)` (or pass `schema=SCHEMA` to a pyarrow
dataset / Ray Data read) to get the exact SCHEMA types back; `iter_rows` does.

The manifest's fingerprint is the sha256 over the sorted (id, content digest) pairs of all rows, so it
does not depend on shard size or row order; it changes when any row does.
"""

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.data.schema import FIELDS, SCHEMA, SCHEMA_VERSION, normalize_row, row_digest
from pipelines.storage import S3Options

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")  # split / task names used in file names


@dataclass(frozen=True)
class Manifest:
    """What a corpus holds. `shards` entries: {"path" (relative to the corpus dir), "split", "task",
    "num_rows", "num_bytes", "num_row_groups"}; `counts[split][task]` = rows. `conversion`: optional, what
    made the corpus: its source, what the conversion read and rejected (`pipelines.data.raw_convert`), and for
    image codes the tokenizer that made them (`pipelines.data.image_codes.codes_record`); absent from the JSON
    when None."""

    schema_version: int
    num_rows: int
    counts: dict[str, dict[str, int]]
    shards: list[dict[str, Any]]
    fingerprint: str
    created_by: str
    created_at: str
    conversion: dict[str, Any] | None = None

    def to_json(self) -> str:
        """Pretty, key-sorted JSON text."""
        data = {
            "schema_version": self.schema_version,
            "num_rows": self.num_rows,
            "counts": self.counts,
            "shards": self.shards,
            "fingerprint": self.fingerprint,
            "created_by": self.created_by,
            "created_at": self.created_at,
        }
        if self.conversion is not None:
            data["conversion"] = self.conversion
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        """Parse and check a manifest; ValueError on a missing/unknown key or a schema version we can't read."""
        data = json.loads(text)
        expected = {"schema_version", "num_rows", "counts", "shards", "fingerprint", "created_by", "created_at"}
        if not isinstance(data, dict) or not expected <= set(data) <= expected | {"conversion"}:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"manifest keys must be {sorted(expected)} (+ optional conversion), got {got}")
        if data["schema_version"] != SCHEMA_VERSION:
            raise ValueError(
                f"manifest schema_version {data['schema_version']} is not supported (this code reads {SCHEMA_VERSION})"
            )
        shard_keys = {"path", "split", "task", "num_rows", "num_bytes", "num_row_groups"}
        for shard in data["shards"]:
            if set(shard) != shard_keys:
                raise ValueError(f"manifest shard entry keys must be {sorted(shard_keys)}, got {sorted(shard)}")
        total = sum(s["num_rows"] for s in data["shards"])
        if total != data["num_rows"]:
            raise ValueError(f"manifest num_rows {data['num_rows']} != sum of shard rows {total}")
        return cls(**data)

    def select(self, splits: Iterable[str] | None = None, tasks: Iterable[str] | None = None) -> list[dict]:
        """Shard entries of the given splits and tasks (None: all), in manifest order."""
        splits = None if splits is None else set(_as_names(splits))
        tasks = None if tasks is None else set(_as_names(tasks))
        return [
            s
            for s in self.shards
            if (splits is None or s["split"] in splits) and (tasks is None or s["task"] in tasks)
        ]


def _as_names(names: Iterable[str] | str) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


FINGERPRINT_MOD = 2**256


def row_fingerprint(row_id: str, digest: str) -> int:
    """One row's share of the corpus fingerprint: sha256 of "<id>\\t<digest>\\n" as an integer."""
    return int.from_bytes(hashlib.sha256(f"{row_id}\t{digest}\n".encode()).digest(), "big")


def fingerprint_of(pairs: Iterable[tuple[str, str]]) -> str:
    """'sum-sha256:<hex>': the sum mod 2**256 of every row's share, so it depends on the set of
    (id, content) pairs only, not on order or sharding, and is computed while streaming."""
    total = sum(row_fingerprint(i, d) for i, d in pairs) % FINGERPRINT_MOD
    return _fingerprint_text(total)


def _fingerprint_text(total: int) -> str:
    return f"sum-sha256:{total:064x}"


def canonical_schema(names: Sequence[str] | None = None) -> pa.Schema:
    """SCHEMA restricted to `names` (in that order), for casting tables read from shards."""
    return SCHEMA if names is None else pa.schema([SCHEMA.field(n) for n in names])


def row_nbytes(row: dict[str, Any]) -> int:
    """Raw size estimate of a normalised row used for shard sizing: bytes of image and text, 4 per number."""
    size = 0
    for name in FIELDS:
        value = row[name]
        if value is None:
            continue
        if isinstance(value, (bytes, str)):
            size += len(value)
        elif name in ("targets", "object_labels"):
            size += sum(len(v) for v in value) + 4 * len(value)
        elif name == "object_boxes":
            size += 16 * len(value)
        else:  # box, target_weights, codes
            size += 4 * len(value)
    return size


@dataclass
class _OpenShard:
    path: str  # relative to the corpus dir
    split: str
    task: str
    stream: Any
    writer: pq.ParquetWriter
    buffer: list[dict] = field(default_factory=list)
    raw_bytes: int = 0  # flushed + buffered row_nbytes
    num_rows: int = 0  # flushed rows
    num_row_groups: int = 0


@dataclass
class ShardWriter:
    """Streams canonical rows into Parquet shards under `uri` and writes `manifest.json` on close().

    Holds at most one row group per open (split, task) shard in memory, plus a 16-byte hash of every id
    written (the exact-in-practice duplicate-id check, ~70 B a row); the fingerprint is a running sum. Use as a context manager: leaving the block
    with an exception deletes the shards written so far and writes no manifest.
    Raises FileExistsError if `uri` already holds a manifest or Parquet files.
    """

    uri: str
    shard_bytes: int = 128 * 2**20
    row_group_rows: int = 256
    s3: S3Options | None = None
    created_by: str = "pipelines.data.shards.ShardWriter"
    _open: dict[tuple[str, str], _OpenShard] = field(default_factory=dict, init=False, repr=False)
    _next_index: dict[tuple[str, str], int] = field(default_factory=dict, init=False, repr=False)
    _id_hashes: set[bytes] = field(default_factory=set, init=False, repr=False)
    _fingerprint: int = field(default=0, init=False, repr=False)
    _done: list[dict] = field(default_factory=list, init=False, repr=False)
    _manifest: Manifest | None = field(default=None, init=False, repr=False)
    _aborted: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.shard_bytes <= 0 or self.row_group_rows <= 0:
            raise ValueError(
                f"shard_bytes and row_group_rows must be positive, got {self.shard_bytes}, {self.row_group_rows}"
            )
        fs, path = storage.resolve(self.uri, self.s3)
        try:
            existing = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
        except OSError as exc:
            raise OSError(f"cannot list {storage.redact(self.uri)}: {storage.redact(str(exc))}") from exc
        names = [i.base_name for i in existing if i.type == pafs.FileType.File]
        clash = [n for n in names if n.endswith(".parquet") or n == MANIFEST_NAME]
        if clash:
            raise FileExistsError(
                f"{storage.redact(self.uri)} already holds a corpus ({len(clash)} files, e.g. {clash[0]}); "
                "write to a new location or delete it first"
            )

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, row: dict[str, Any]) -> None:
        """Validate one row against SCHEMA and append it (ValueError naming id and field; duplicate ids)."""
        if self._manifest is not None or self._aborted:
            raise RuntimeError(f"ShardWriter for {storage.redact(self.uri)} is already closed")
        norm = normalize_row(row)
        row_id = norm["id"]
        id_hash = hashlib.blake2b(row_id.encode(), digest_size=16).digest()  # collisions ~ n^2 / 2^129
        if id_hash in self._id_hashes:
            raise ValueError(f"row {row_id!r}: duplicate id in corpus {storage.redact(self.uri)}")
        for name in ("split", "task"):
            if not _NAME_PART.match(norm[name]):
                raise ValueError(
                    f"row {row_id!r}: field {name!r} = {norm[name]!r} must match {_NAME_PART.pattern} (it names files)"
                )
        self._id_hashes.add(id_hash)
        self._fingerprint = (self._fingerprint + row_fingerprint(row_id, row_digest(norm))) % FINGERPRINT_MOD
        key = (norm["split"], norm["task"])
        shard = self._open.get(key) or self._start(key)
        shard.buffer.append(norm)
        shard.raw_bytes += row_nbytes(norm)
        if len(shard.buffer) >= self.row_group_rows:
            self._flush(shard)
        if shard.raw_bytes >= self.shard_bytes:
            self._finish(key)

    def close(self, conversion: dict[str, Any] | None = None) -> Manifest:
        """Flush and close every shard, write manifest.json (with `conversion`, plain JSON: what made the corpus,
        `Manifest.conversion`), return the manifest (idempotent: a second call returns the first's)."""
        if self._manifest is not None:
            return self._manifest
        if self._aborted:
            raise RuntimeError(f"ShardWriter for {storage.redact(self.uri)} was aborted")
        for key in list(self._open):
            self._finish(key)
        shards = sorted(self._done, key=lambda s: s["path"])
        counts: dict[str, dict[str, int]] = {}
        for s in shards:
            by_task = counts.setdefault(s["split"], {})
            by_task[s["task"]] = by_task.get(s["task"], 0) + s["num_rows"]
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            num_rows=len(self._id_hashes),
            counts={split: dict(sorted(t.items())) for split, t in sorted(counts.items())},
            shards=shards,
            fingerprint=_fingerprint_text(self._fingerprint),
            created_by=self.created_by,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            conversion=conversion,
        )
        storage.write_bytes(storage.join(self.uri, MANIFEST_NAME), manifest.to_json().encode(), s3=self.s3)
        logger.info(
            "wrote corpus %s: %d rows in %d shards", storage.redact(self.uri), manifest.num_rows, len(shards)
        )
        self._manifest = manifest
        return manifest

    def abort(self) -> None:
        """Close open shards and delete every shard written; no manifest is written."""
        if self._manifest is not None or self._aborted:
            return
        self._aborted = True
        paths = [s["path"] for s in self._done]
        for shard in self._open.values():
            paths.append(shard.path)
            try:
                shard.writer.close()
                shard.stream.close()
            except OSError as exc:  # the stream is being thrown away anyway
                logger.warning("closing aborted shard %s: %s", shard.path, storage.redact(str(exc)))
        self._open.clear()
        for path in paths:
            try:
                storage.delete_file(storage.join(self.uri, path), s3=self.s3)
            except FileNotFoundError:
                pass
        logger.warning("aborted corpus write to %s; deleted %d shards", storage.redact(self.uri), len(paths))

    def _start(self, key: tuple[str, str]) -> _OpenShard:
        split, task = key
        index = self._next_index.get(key, 0)
        self._next_index[key] = index + 1
        rel = f"{split}-{task}-{index:05d}.parquet"
        fs, path = storage.resolve(storage.join(self.uri, rel), self.s3)
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        stream = fs.open_output_stream(path)
        # store_schema=False: see the module docstring (nullable fixed-size lists, apache/arrow#35692).
        writer = pq.ParquetWriter(stream, SCHEMA, use_dictionary=["task", "split", "dataset"], store_schema=False)
        shard = _OpenShard(path=rel, split=split, task=task, stream=stream, writer=writer)
        self._open[key] = shard
        return shard

    def _flush(self, shard: _OpenShard) -> None:
        if not shard.buffer:
            return
        table = pa.Table.from_pylist(shard.buffer, schema=SCHEMA)
        shard.writer.write_table(table, row_group_size=len(shard.buffer))
        shard.num_rows += len(shard.buffer)
        shard.num_row_groups += 1
        shard.buffer = []

    def _finish(self, key: tuple[str, str]) -> None:
        shard = self._open.pop(key)
        self._flush(shard)
        shard.writer.close()
        num_bytes = shard.stream.tell()
        shard.stream.close()
        self._done.append(
            {
                "path": shard.path,
                "split": shard.split,
                "task": shard.task,
                "num_rows": shard.num_rows,
                "num_bytes": num_bytes,
                "num_row_groups": shard.num_row_groups,
            }
        )


def write_corpus(rows: Iterable[dict[str, Any]], uri: str, **kw: Any) -> Manifest:
    """Write all `rows` as a canonical corpus at `uri` (keywords as for ShardWriter); returns the manifest."""
    with ShardWriter(uri, **kw) as writer:
        for row in rows:
            writer.write(row)
    return writer.close()


def read_manifest(uri: str, s3: S3Options | None = None) -> Manifest:
    """The manifest of the corpus at `uri`; FileNotFoundError if there is none (not a corpus, or unfinished)."""
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    try:
        data = storage.read_bytes(manifest_uri, s3=s3)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {storage.redact(uri)}: not a canonical corpus, or its write did not finish"
        ) from exc
    try:
        return Manifest.from_json(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"bad manifest {storage.redact(manifest_uri)}: {exc}") from exc


def iter_rows(
    uri: str,
    s3: S3Options | None = None,
    columns: Sequence[str] | None = None,
    splits: Iterable[str] | None = None,
    tasks: Iterable[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows of a canonical corpus as dicts (only `columns` if given), shard by shard in manifest order.

    Plain pyarrow, one row group in memory at a time: for small jobs and tests, not for training input.
    """
    if columns is not None:
        unknown = sorted(set(columns) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; schema fields are {list(FIELDS)}")
        columns = list(columns)
    manifest = read_manifest(uri, s3=s3)
    for shard in manifest.select(splits, tasks):
        shard_uri = storage.join(uri, shard["path"])
        fs, path = storage.resolve(shard_uri, s3)
        try:
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                if parquet.metadata.num_rows != shard["num_rows"]:
                    raise ValueError(
                        f"{storage.redact(shard_uri)} has {parquet.metadata.num_rows} rows, "
                        f"manifest says {shard['num_rows']}"
                    )
                for group in range(parquet.num_row_groups):
                    table = parquet.read_row_group(group, columns=columns)
                    yield from table.cast(canonical_schema(table.column_names)).to_pylist()
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"shard listed in the manifest is missing: {storage.redact(shard_uri)}") from exc
