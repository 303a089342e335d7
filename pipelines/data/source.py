"""Stage 1 of the Ray Data ingest (`pipelines.data.dataset`): canonical shards -> numbered source rows.

No preprocessing happens here: reading only parses Parquet (the reason codes it shares with the model
come from `ofa_model.errors`, through `pipelines.data.schema`).

`plan_shards` fixes an epoch from the manifest alone: which shards, in which order (a seeded permutation
when shuffling), and the position `seq` of every row (shard k's rows start at the sum of the row counts
of the shards before it). `ShardSource` reads the shards of a plan in that order, one block per row
group, with columns `SOURCE_SCHEMA`: the canonical fields (boxes as variable lists) plus seq, span (rows a
row stands for), error and detail. Reading never raises for bad data:

* a shard that cannot be opened or read (after `retries` extra attempts on I/O errors; none for a shard that
  is not there, such as one deleted after the plan was made) becomes one marker row per unread range, error
  "unreadable_shard", span = its rows, detail = its URI and the error;
* a row group with a column of the wrong type (text stored as int64, say) becomes one "bad_type" marker
  per row, ids kept;
* rows in `skip` (already consumed before a resume) are dropped before anything is decoded.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from ofa_model.errors import BAD_TYPE, UNREADABLE_SHARD
from pipelines import storage
from pipelines.data.schema import SCHEMA
from pipelines.data.shards import Manifest
from pipelines.storage import S3Options

logger = logging.getLogger(__name__)

# Shard rows as read: SCHEMA, every field nullable, boxes as variable lists (no fixed-size-list casts, so
# a wrong-length box reaches the task code and is counted as bad_box rather than failing a row group).
_VARIABLE = {"box": pa.list_(pa.float32()), "object_boxes": pa.list_(pa.list_(pa.float32()))}
READ_SCHEMA = pa.schema([pa.field(f.name, _VARIABLE.get(f.name, f.type), nullable=True) for f in SCHEMA])
# Columns the source adds: position in the epoch, rows covered (markers can cover a whole shard), and a
# read-stage failure (reason, detail) for marker rows.
_SOURCE_EXTRA = [("seq", pa.int64()), ("span", pa.int64()), ("error", pa.string()), ("detail", pa.string())]
SOURCE_SCHEMA = pa.schema(list(READ_SCHEMA) + [pa.field(n, t) for n, t in _SOURCE_EXTRA])


class SeqSet:
    """A set of row positions (`seq`) kept as sorted, disjoint, non-adjacent half-open intervals."""

    def __init__(self, intervals: Iterable[Sequence[int]] = ()) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        for start, stop in intervals:
            self.add(int(start), int(stop))

    def add(self, start: int, stop: int) -> None:
        """Add [start, stop)."""
        if stop <= start:
            return
        if self._stops and start >= self._stops[-1]:  # the common case: appending in order
            if start == self._stops[-1]:
                self._stops[-1] = stop
            else:
                self._starts.append(start)
                self._stops.append(stop)
            return
        lo = bisect.bisect_left(self._stops, start)  # first interval that ends at or after start
        hi = bisect.bisect_right(self._starts, stop)  # intervals [lo, hi) touch [start, stop]
        if lo < hi:
            start = min(start, self._starts[lo])
            stop = max(stop, self._stops[hi - 1])
        self._starts[lo:hi] = [start]
        self._stops[lo:hi] = [stop]

    def update(self, other: SeqSet) -> None:
        for start, stop in other.intervals():
            self.add(start, stop)

    def __contains__(self, seq: int) -> bool:
        i = bisect.bisect_right(self._starts, seq) - 1
        return i >= 0 and seq < self._stops[i]

    def __len__(self) -> int:
        """Number of positions in the set."""
        return sum(b - a for a, b in zip(self._starts, self._stops, strict=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SeqSet) and self.intervals() == other.intervals()

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._stops, strict=True))

    def clip(self, start: int, stop: int) -> SeqSet:
        """The part of the set inside [start, stop)."""
        lo = bisect.bisect_right(self._stops, start)
        out = SeqSet()
        for a, b in zip(self._starts[lo:], self._stops[lo:], strict=True):
            if a >= stop:
                break
            out.add(max(a, start), min(b, stop))
        return out

    def mask(self, start: int, stop: int) -> np.ndarray:
        """(stop - start,) bool: True where start + i is in the set."""
        out = np.zeros(stop - start, dtype=bool)
        for a, b in self.clip(start, stop).intervals():
            out[a - start : b - start] = True
        return out

    def gaps(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The intervals of [start, stop) not in the set."""
        out, pos = [], start
        for a, b in self.clip(start, stop).intervals():
            if a > pos:
                out.append((pos, a))
            pos = b
        if pos < stop:
            out.append((pos, stop))
        return out


# =============================================================================================================
# Epoch plan


@dataclass(frozen=True)
class ShardRead:
    """One shard of an epoch: its URI, manifest task/split/rows, and the seq of its first row."""

    uri: str
    task: str
    split: str
    num_rows: int
    num_bytes: int
    first_seq: int


@dataclass(frozen=True)
class EpochInfo:
    """The small part of an EpochPlan a consumer needs: key, epoch, total rows."""

    key: str
    epoch: int
    total_rows: int


@dataclass(frozen=True)
class EpochPlan:
    """Shards of one epoch in read order; seq of row r of shard k = shards[k].first_seq + r."""

    uri: str
    epoch: int
    shards: tuple[ShardRead, ...]
    total_rows: int
    key: str

    @property
    def info(self) -> EpochInfo:
        return EpochInfo(self.key, self.epoch, self.total_rows)


def plan_shards(manifest: Manifest, uri: str, splits: Sequence[str], tasks: Sequence[str] | None, *, seed: int,
                epoch: int, shuffle: bool) -> EpochPlan:
    """The shards of `splits` and `tasks` (None: all) of the corpus at `uri`, in manifest order or, with
    `shuffle`, permuted by a generator seeded with (seed, epoch); rows numbered in that order."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    entries = manifest.select(splits, tasks)
    if not entries:
        raise ValueError(
            f"corpus {storage.redact(uri)} has no shards for splits {list(splits)} and tasks "
            f"{'all' if tasks is None else list(tasks)}; it holds {manifest.counts}"
        )
    order = list(range(len(entries)))
    if shuffle:
        order = [int(i) for i in np.random.default_rng([seed, epoch]).permutation(len(entries))]
    shards, seq = [], 0
    for i in order:
        e = entries[i]
        shards.append(ShardRead(storage.join(uri, e["path"]), e["task"], e["split"], int(e["num_rows"]),
                                int(e["num_bytes"]), seq))
        seq += int(e["num_rows"])
    h = hashlib.sha256(json.dumps([manifest.fingerprint, epoch, seed, shuffle,
                                   [(s.uri.rsplit("/", 1)[-1], s.num_rows) for s in shards]]).encode())
    return EpochPlan(uri, epoch, tuple(shards), seq, h.hexdigest()[:16])


def plan_part(total_rows: int, consumed: SeqSet, rank: int, world: int) -> SeqSet:
    """The rows of an epoch of `total_rows` rows that worker `rank` of `world` reads: the rows not `consumed`, in
    plan order, cut into `world` runs of consecutive rows whose sizes differ by at most one (the first
    remaining % world runs are one row longer). Every row not consumed is in exactly one part, so a resumed epoch
    shares out what is left evenly, whatever the world size was when the rows were consumed. Consecutive rows
    keep each worker on its own shards, but for the shards at the runs' edges."""
    for name, value, low in (("world", world, 1), ("rank", rank, 0), ("total_rows", total_rows, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"plan_part: {name} must be an int >= {low}, got {value!r}")
    if rank >= world:
        raise ValueError(f"plan_part: rank {rank} is not a worker of a world of {world}")
    left = consumed.gaps(0, total_rows)
    base, longer = divmod(sum(b - a for a, b in left), world)
    first = rank * base + min(rank, longer)  # this part's place among the rows left
    last = first + base + (1 if rank < longer else 0)
    part, pos = SeqSet(), 0  # pos: rows left before the interval (a, b)
    for a, b in left:
        part.add(a + max(0, first - pos), a + min(b - a, last - pos))
        pos += b - a
    return part


# =============================================================================================================
# Reading


class ShardSource(Datasource):
    """Reads the shards of an EpochPlan in order; broken shards and columns become marker rows (see module doc).

    skip: rows not to emit (already consumed). retries: extra attempts after an OSError (not for missing files).
    """

    def __init__(self, plan: EpochPlan, s3: S3Options | None = None, skip: SeqSet | None = None,
                 retries: int = 2) -> None:
        super().__init__()
        self._shards = plan.shards
        self._s3 = s3
        self._skip = skip or SeqSet()
        self._retries = retries

    def get_name(self) -> str:
        return "CanonicalShards"

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(s.num_bytes for s in self._shards) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        shards = [s for s in self._shards if self._skip.gaps(s.first_seq, s.first_seq + s.num_rows)]
        n = max(1, min(parallelism if parallelism > 0 else len(shards), len(shards)))
        bounds = np.linspace(0, len(shards), n + 1).round().astype(int)
        tasks = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):  # consecutive shards keep the plan order
            chunk = tuple(shards[a:b])
            if not chunk:
                continue
            skip = SeqSet()
            for s in chunk:
                skip.update(self._skip.clip(s.first_seq, s.first_seq + s.num_rows))
            rows = sum(s.num_rows for s in chunk) - len(skip)
            meta = BlockMetadata(num_rows=rows, size_bytes=sum(s.num_bytes for s in chunk), exec_stats=None,
                                 input_files=[s.uri for s in chunk])
            read = functools.partial(_read_shards, chunk, self._s3, skip.intervals(), self._retries)
            tasks.append(ReadTask(read, meta, schema=SOURCE_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks


def read_blocks(plan: EpochPlan, s3: S3Options | None = None, skip: SeqSet | None = None,
                retries: int = 2) -> Iterator[pa.Table]:
    """What `ShardSource` gives a Dataset, read in this process: one SOURCE_SCHEMA block per row group, in the
    plan's order, bad data as marker rows (module docstring), rows in `skip` dropped."""
    return _read_shards(plan.shards, s3, (skip or SeqSet()).intervals(), retries)


def _with_retries(fn: Any, retries: int, what: str) -> Any:
    for attempt in range(retries + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if attempt == retries:
                raise
            logger.info("retrying %s after %s", what, storage.redact(str(exc)))
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def _marker_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)


def _read_shards(shards: tuple[ShardRead, ...], s3: S3Options | None, skip_intervals: list, retries: int
                 ) -> Iterator[pa.Table]:
    """Read task body: one block per row group; errors become marker rows, never exceptions."""
    skip = SeqSet(skip_intervals)
    for shard in shards:
        yield from _read_shard(shard, s3, skip, retries)


def _read_shard(shard: ShardRead, s3: S3Options | None, skip: SeqSet, retries: int) -> Iterator[pa.Table]:
    end = shard.first_seq + shard.num_rows
    pos = shard.first_seq  # rows before pos were emitted (or skipped)
    name = storage.redact(shard.uri)
    try:
        fs, path = storage.resolve(shard.uri, s3)
        f = _with_retries(lambda: fs.open_input_file(path), retries, f"opening {name}")
        with f:
            parquet = pq.ParquetFile(f)
            if parquet.metadata.num_rows != shard.num_rows:
                raise ValueError(f"has {parquet.metadata.num_rows} rows, the manifest says {shard.num_rows}")
            for group in range(parquet.num_row_groups):
                n = parquet.metadata.row_group(group).num_rows
                start, stop = pos, pos + n
                if skip.gaps(start, stop):
                    table = _with_retries(lambda g=group: parquet.read_row_group(g), retries, f"reading {name}")
                    block = _conform(table, shard, start)
                    keep = ~skip.mask(start, stop)
                    if not keep.all():
                        block = block.filter(pa.array(keep))
                    if block.num_rows:
                        yield block
                pos = stop
    except (OSError, pa.ArrowException, ValueError) as exc:  # the shard cannot be read: bad data, counted
        detail = f"{name}: {type(exc).__name__}: {storage.redact(str(exc))}"
        logger.warning("unreadable shard %s", detail)
        rows = [{"id": None, "task": shard.task, "split": shard.split, "seq": a, "span": b - a,
                 "error": UNREADABLE_SHARD, "detail": detail} for a, b in skip.gaps(pos, end)]
        if rows:
            yield _marker_table(rows)


def _conform(table: pa.Table, shard: ShardRead, first_seq: int) -> pa.Table:
    """A row group as SOURCE_SCHEMA; a column of the wrong type makes every row a bad_type marker."""
    n = table.num_rows
    if "id" not in table.column_names or not pa.types.is_string(_plain(table.schema.field("id").type)):
        raise ValueError(f"no string 'id' column (columns: {table.column_names})")
    columns, problems = [], []
    for f in READ_SCHEMA:
        if f.name not in table.column_names:
            if f.name in ("task", "split"):
                problems.append(f"column {f.name!r} is missing")
            columns.append(pa.nulls(n, f.type))
            continue
        col = table.column(f.name)
        if col.type != f.type:
            if _castable(col.type, f.type):
                col = col.cast(f.type)
            else:
                problems.append(f"column {f.name!r} has type {col.type}, expected {f.type}")
                col = pa.nulls(n, f.type)
        columns.append(col)
    extra = [pa.array(np.arange(first_seq, first_seq + n), pa.int64()), pa.array(np.ones(n, np.int64))]
    if problems:
        detail = f"{storage.redact(shard.uri)}: " + "; ".join(problems)
        extra += [pa.array([BAD_TYPE] * n, pa.string()), pa.array([detail] * n, pa.string())]
        columns = [c if f.name in ("id", "split") else pa.nulls(n, f.type) for c, f in zip(columns, READ_SCHEMA,
                                                                                            strict=True)]
        columns[READ_SCHEMA.get_field_index("task")] = pa.array([shard.task] * n, pa.string())
    else:
        extra += [pa.nulls(n, pa.string()), pa.nulls(n, pa.string())]
    return pa.Table.from_arrays(columns + extra, schema=SOURCE_SCHEMA)


def _plain(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _kind(t: pa.DataType) -> Any:
    """A type's family for cast compatibility: ('list', inner kind), 'string', 'binary', 'float', 'int', ..."""
    t = _plain(t)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return ("list", _kind(t.value_type))
    for kind, test in (("string", pa.types.is_string), ("string", pa.types.is_large_string),
                       ("binary", pa.types.is_binary), ("binary", pa.types.is_large_binary),
                       ("float", pa.types.is_floating), ("int", pa.types.is_integer)):
        if test(t):
            return kind
    return str(t)


def _castable(src: pa.DataType, dst: pa.DataType) -> bool:
    """Only representation changes (dictionary, large, fixed-size lists, float width) count as compatible;
    int -> string and the like are wrong types."""
    if pa.types.is_null(src):
        return True
    return _kind(src) == _kind(dst) or (_kind(src), _kind(dst)) in {("int", "float"), (("list", "int"),
                                                                                       ("list", "float"))}
