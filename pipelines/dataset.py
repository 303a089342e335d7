"""Ray Data ingest: a canonical corpus (`pipelines.shards`) -> model-ready rows -> training batches.

    plan = plan_epoch(cfg, split="train", train=True, epoch=e)      # shard order + row numbering, manifest only
    ds = build_dataset(cfg, vocab, split="train", train=True, epoch=e)  # lazy, streaming ray.data.Dataset
    for batch in iter_train_batches(ds.iterator(), vocab, cfg.batch_size, info=plan.info):  # collate() dicts
        ...

Stages, all streaming (nothing holds more than a few blocks per operator):

1. `pipelines.source.ShardSource` (a `ray.data.Datasource`): the shards of the epoch's plan in order (a
   seeded permutation of the manifest's shards when training with `shuffle_files`). Every input row gets
   `seq`, its position in that order, so a row is named the same way in every run of the same (corpus,
   selection, seed, epoch). Unreadable shards and wrongly typed columns become marker rows
   ("unreadable_shard" with the shard URI, "bad_type" with the ids); rows consumed before a resume are
   dropped there, before any image is decoded.
2. `map_batches(_Preprocess)` on an actor pool: each actor builds the vocabulary once and runs the shared
   `ofa_model.tasks.build_example` per row. Output columns (`output_schema()`): id, task, seq, span, ok,
   reason, detail, source / prev_output / target (int32 token lists), image (flattened (3, S, S), null for
   text-only rows), image_width / image_height, target_weight, code_mask, image_blank, image_norm.
   With image_dtype "uint8" (the default) the image is the resized uint8 pixels (a quarter of float32's
   object-store traffic), `image_norm` holds the PreprocessConfig's mean and std and `image_blank` says
   whether image infilling blanks the centre; the consumer normalises (`normalize_pixels`, `blank_centre`),
   giving bit for bit the float32 image of `build_example`. With "float32" / "float16" the actors ship the
   normalised (and blanked) image and image_norm is null.
   A row whose preprocessing raises (TaskInputError, ImageError, ValueError, TypeError) comes out with
   ok=False and a reason from `REASONS`; nothing is dropped inside Ray, so counts stay exact.
3. `BatchIterator` (the consumer: driver, Ray Train worker, evaluator): takes marker rows out of the stream
   and counts them (`RowStats`, by reason and task, with example ids, logged), rebuilds samples for the good
   rows (normalising uint8 images) and yields exactly what `ofa_model.preprocess.collate` returns. It fails with `BadDataError` when the
   bad fraction exceeds `bad_row_threshold` at the end of the epoch (or early, once `early_check_rows` rows
   were seen, at `early_factor` times the threshold), and logs progress (rows, rate, ETA).

Resume within an epoch: every consumed row's `seq` (good rows delivered in a batch, bad rows counted) is
kept in a `SeqSet` of intervals; `BatchIterator.resume_state()` returns it with the counts as a
`ResumeState`. Pass it back to `build_dataset(resume=...)` (the source skips those rows) and/or to the
iterator (it skips them too, so a dataset built before the state was known also works). The row numbering
does not depend on execution order, so this is exact with parallel reads, `preserve_order=False`, local
shuffling and `streaming_split` workers alike; states of several workers combine with `ResumeState.merge`.
With `preserve_order=True` and a seeded local shuffle, the same config and epoch give the same id order.

One Dataset is one epoch: `epoch` seeds the shard order (and per-row augmentation). A Dataset iterated
again (e.g. by Ray Train in a later epoch) repeats that shard order; the iterator's local shuffle seed
(`seed + epoch`) still changes the row order within the shuffle buffer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from ofa_model.config import check_keys
from ofa_model.preprocess import (
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    NotAnImageError,
    PreprocessConfig,
    TruncatedImageError,
    blank_centre,
    collate,
    normalize_pixels,
)
from ofa_model.errors import BAD_ROW
from ofa_model.tasks import (
    TASKS,
    TaskInputError,
    TaskSpec,
    build_example,
)
from pipelines import storage
from pipelines.schema import (
    BAD_BOX,
    BAD_IMAGE,
    BAD_TYPE,
    EMPTY_TEXT,
    MISSING_FIELD,
    UNKNOWN_LABEL,
    UNREADABLE_SHARD,
)
from pipelines.shards import Manifest, read_manifest
from pipelines.source import SOURCE_SCHEMA, EpochInfo, EpochPlan, SeqSet, ShardSource, plan_shards
from pipelines.storage import S3Options

__all__ = [
    "REASONS", "SOURCE_SCHEMA", "BadDataError", "BatchIterator", "DataConfig", "EpochInfo", "EpochPlan",
    "ResumeState", "RowStats", "SampleStream", "SeqSet", "build_dataset", "classify", "epoch_batches",
    "inspect", "iter_train_batches", "iterator_options", "output_schema", "plan_epoch", "preprocess_row",
]  # fmt: skip

logger = logging.getLogger(__name__)

# --- bad-row reasons at the preprocessing stage ------------------------------------------------------------
# The shared codes of pipelines.schema, plus the ones only decoding/preprocessing can find; ofa_model's errors
# carry their code (`reason`), so it is named here, not restated.
IMAGE_TOO_LARGE = ImageTooLargeError.reason  # payload bytes or header pixels over the PreprocessConfig limits
EMPTY_IMAGE = EmptyImageError.reason  # a zero-byte image payload
NOT_AN_IMAGE = NotAnImageError.reason  # bytes that are not a supported image format
TRUNCATED_IMAGE = TruncatedImageError.reason  # a recognised image that is cut short or corrupt
UNKNOWN_TASK = "unknown_task"  # a row whose task is not a known TaskSpec
REASONS = (
    BAD_IMAGE, IMAGE_TOO_LARGE, EMPTY_IMAGE, NOT_AN_IMAGE, TRUNCATED_IMAGE, MISSING_FIELD, EMPTY_TEXT, BAD_BOX,
    UNKNOWN_LABEL, BAD_TYPE, UNKNOWN_TASK, UNREADABLE_SHARD, BAD_ROW,
)  # fmt: skip

# image_dtype -> (numpy dtype, Arrow type) of the shipped image; "uint8" ships pixels, normalised by the consumer
IMAGE_DTYPES = {"uint8": (np.uint8, pa.uint8()), "float32": (np.float32, pa.float32()),
                "float16": (np.float16, pa.float16())}


def output_schema(image_dtype: str = "uint8") -> pa.Schema:
    """Columns of the rows `build_dataset` yields (image: flattened (3, S, S) in `image_dtype`; image_norm:
    mean (3) then std (3) for uint8 images, else null; image_blank: blank the centre after normalising)."""
    tokens = pa.list_(pa.int32())
    return pa.schema([
        ("id", pa.string()), ("task", pa.string()), ("seq", pa.int64()), ("span", pa.int64()),
        ("ok", pa.bool_()), ("reason", pa.string()), ("detail", pa.string()),
        ("source", tokens), ("prev_output", tokens), ("target", tokens),
        ("image", pa.large_list(IMAGE_DTYPES[image_dtype][1])),
        ("image_width", pa.int32()), ("image_height", pa.int32()),
        ("target_weight", pa.float32()), ("code_mask", pa.bool_()),
        ("image_blank", pa.bool_()), ("image_norm", pa.list_(pa.float32())),
    ])  # fmt: skip


# =============================================================================================================
# Config


@dataclass(frozen=True)
class DataConfig:
    """How a corpus becomes training batches. Validated on construction; `from_dict` rejects unknown keys.

    uri: corpus directory (local, file:// or s3://). splits / tasks: what `build_dataset` reads by default
    (tasks None: every task in the manifest). batch_size: rows per training batch. seed: shard order,
    local shuffle and per-row augmentation. shuffle_files: permute shards per epoch when training.
    local_shuffle_buffer: rows in the consumer's shuffle buffer (0: off). preserve_order: deterministic
    block order (same seed -> same id order) at some throughput cost. bad_row_threshold: max bad fraction
    of an epoch; early_check_rows / early_factor: fail early once that many rows were seen and the bad
    fraction is early_factor times the threshold. image_dtype: what the actors ship per image: "uint8" resized
    pixels (normalised by the consumer; 1/4 of float32's bytes), "float32" or "float16" normalised tensors.
    num_actors: (min, max) preprocessing actors; actor_num_cpus: CPUs each; rows_per_map_batch: rows per
    preprocessing call; rows_per_read_block: rows per block handed from reading to preprocessing (the unit
    of work of an actor). read_num_cpus: CPUs per read task; read_concurrency: most read tasks at once
    (None: Ray decides); read_retries: extra attempts on I/O errors.
    max_object_store_bytes: cap on this dataset's object-store use (None: Ray's default). prefetch_batches:
    batches fetched ahead by the consumer. progress_every_s: seconds between progress log lines.
    log_bad_rows: bad rows logged at WARNING per reason (the rest at DEBUG). s3: endpoint / region overrides.
    """

    uri: str
    splits: tuple[str, ...] = ("train",)
    tasks: tuple[str, ...] | None = None
    batch_size: int = 32
    seed: int = 0
    shuffle_files: bool = True
    local_shuffle_buffer: int = 0
    preserve_order: bool = True
    bad_row_threshold: float = 0.01
    early_check_rows: int = 1000
    early_factor: float = 3.0
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    image_dtype: str = "uint8"
    num_actors: tuple[int, int] = (1, 4)
    actor_num_cpus: float = 1.0
    rows_per_map_batch: int = 16
    rows_per_read_block: int = 256
    read_num_cpus: float = 0.5
    read_concurrency: int | None = None
    read_retries: int = 2
    max_object_store_bytes: int | None = None
    prefetch_batches: int = 1
    progress_every_s: float = 30.0
    log_bad_rows: int = 20
    s3: S3Options | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri:
            raise ValueError(f"DataConfig.uri must be a non-empty string, got {self.uri!r}")
        for name in ("splits", "tasks"):
            value = getattr(self, name)
            if value is None and name == "tasks":
                continue
            if isinstance(value, str) or not isinstance(value, (tuple, list)) or not value:
                raise ValueError(f"DataConfig.{name} must be a non-empty list of names, got {value!r}")
            if not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"DataConfig.{name} must hold non-empty strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("batch_size", "rows_per_map_batch", "rows_per_read_block", "early_check_rows",
                     "prefetch_batches"):
            _check_int(self, name, minimum=1)
        for name in ("seed", "local_shuffle_buffer", "read_retries", "log_bad_rows"):
            _check_int(self, name, minimum=0)
        for name in ("shuffle_files", "preserve_order"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DataConfig.{name} must be true or false, got {getattr(self, name)!r}")
        _check_number(self, "bad_row_threshold", 0.0, 1.0)
        _check_number(self, "early_factor", 1.0, math.inf)
        _check_number(self, "actor_num_cpus", 0.0, math.inf, open_low=True)
        _check_number(self, "read_num_cpus", 0.0, math.inf, open_low=True)
        _check_number(self, "progress_every_s", 0.0, math.inf, open_low=True)
        if self.image_dtype not in IMAGE_DTYPES:
            raise ValueError(f"DataConfig.image_dtype must be one of {list(IMAGE_DTYPES)}, got {self.image_dtype!r}")
        actors = self.num_actors
        if (not isinstance(actors, (tuple, list)) or len(actors) != 2
                or not all(isinstance(a, int) and not isinstance(a, bool) for a in actors)
                or not 1 <= actors[0] <= actors[1]):
            raise ValueError(f"DataConfig.num_actors must be (min, max) with 1 <= min <= max, got {actors!r}")
        object.__setattr__(self, "num_actors", tuple(actors))
        for name in ("max_object_store_bytes", "read_concurrency"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1)
        if not isinstance(self.preprocess, PreprocessConfig):
            raise ValueError(f"DataConfig.preprocess must be a PreprocessConfig, got {type(self.preprocess).__name__}")
        if self.s3 is not None and not isinstance(self.s3, S3Options):
            raise ValueError(f"DataConfig.s3 must be S3Options or None, got {type(self.s3).__name__}")

    def replace(self, **changes: Any) -> DataConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly dict; `from_dict(to_dict())` round-trips."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["splits"] = list(self.splits)
        out["tasks"] = None if self.tasks is None else list(self.tasks)
        out["num_actors"] = list(self.num_actors)
        out["preprocess"] = self.preprocess.to_dict()
        out["s3"] = None if self.s3 is None else dataclasses.asdict(self.s3)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Build from a parsed YAML/JSON mapping; unknown keys (here, in `preprocess` or `s3`) raise ValueError."""
        check_keys(cls, d)
        kw = dict(d)
        if isinstance(kw.get("preprocess"), Mapping):
            kw["preprocess"] = PreprocessConfig.from_dict(dict(kw["preprocess"]))
        if isinstance(kw.get("s3"), Mapping):
            check_keys(S3Options, kw["s3"], "DataConfig.s3")
            kw["s3"] = S3Options(**kw["s3"])
        return cls(**kw)


def _check_int(cfg: Any, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{type(cfg).__name__}.{name} must be an int >= {minimum}, got {value!r}")


def _check_number(cfg: Any, name: str, low: float, high: float, open_low: bool = False) -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or value > high or value < low or (open_low and value == low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ValueError(f"{type(cfg).__name__}.{name} must be a number in {bound}, got {value!r}")


# =============================================================================================================
# Row numbering, counts and resume state


@dataclass
class RowStats:
    """Counts of one consumer (or, merged, of several): good rows by task, bad rows by reason and by task,
    and up to `max_examples` example ids (shard URIs for unreadable shards) per reason."""

    ok: int = 0
    ok_by_task: dict[str, int] = field(default_factory=dict)
    bad_by_reason: dict[str, int] = field(default_factory=dict)
    bad_by_task: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    @property
    def bad(self) -> int:
        return sum(self.bad_by_reason.values())

    @property
    def rows(self) -> int:
        return self.ok + self.bad

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.rows if self.rows else 0.0

    def add_ok(self, task: str, n: int = 1) -> None:
        self.ok += n
        self.ok_by_task[task] = self.ok_by_task.get(task, 0) + n

    def add_bad(self, reason: str, example: str | None, task: str | None, n: int = 1) -> None:
        self.bad_by_reason[reason] = self.bad_by_reason.get(reason, 0) + n
        key = task or "?"
        self.bad_by_task[key] = self.bad_by_task.get(key, 0) + n
        examples = self.examples.setdefault(reason, [])
        if example is not None and len(examples) < self.max_examples and example not in examples:
            examples.append(example)

    def merge(self, other: RowStats) -> None:
        """Add `other`'s counts (rows of disjoint shares of one epoch, e.g. two streaming_split workers)."""
        self.ok += other.ok
        for mine, theirs in ((self.ok_by_task, other.ok_by_task), (self.bad_by_reason, other.bad_by_reason),
                             (self.bad_by_task, other.bad_by_task)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n
        for reason, ids in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(i for i in ids if i not in mine and len(mine) < self.max_examples)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "bad": self.bad, "ok_by_task": dict(sorted(self.ok_by_task.items())),
                "bad_by_reason": dict(sorted(self.bad_by_reason.items())),
                "bad_by_task": dict(sorted(self.bad_by_task.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RowStats:
        return cls(ok=int(d["ok"]), ok_by_task=dict(d["ok_by_task"]), bad_by_reason=dict(d["bad_by_reason"]),
                   bad_by_task=dict(d["bad_by_task"]), examples={k: list(v) for k, v in d["examples"].items()})

    def describe(self) -> str:
        """One line: counts by reason with example ids."""
        parts = [f"{r} {n} (e.g. {', '.join(self.examples.get(r, [])[:3]) or '-'})"
                 for r, n in sorted(self.bad_by_reason.items(), key=lambda kv: -kv[1])]
        return "; ".join(parts) or "none"


class BadDataError(RuntimeError):
    """Too many rows of an epoch could not be used; `stats` holds the counts, `threshold` the limit."""

    def __init__(self, stats: RowStats, threshold: float, early: bool = False) -> None:
        self.stats = stats
        self.threshold = threshold
        when = f"after the first {stats.rows} rows" if early else "at the end of the epoch"
        super().__init__(
            f"{stats.bad} of {stats.rows} rows ({stats.bad_fraction:.2%}) were bad {when}, over "
            f"bad_row_threshold={threshold:.2%}; by reason: {stats.describe()}. Fix or drop those rows "
            "(python -m jobs.inspect_data lists them) or raise bad_row_threshold."
        )


@dataclass(frozen=True)
class ResumeState:
    """Where an epoch stands: rows consumed (as `seq` positions) and the counts so far. JSON-friendly via
    to_dict/from_dict, for checkpoints. `plan_key` ties it to one EpochPlan (corpus, selection, seed, epoch)."""

    epoch: int
    plan_key: str | None
    consumed: tuple[tuple[int, int], ...]
    stats: dict[str, Any]

    @property
    def rows_consumed(self) -> int:
        return sum(b - a for a, b in self.consumed)

    def seqs(self) -> SeqSet:
        return SeqSet(self.consumed)

    def row_stats(self) -> RowStats:
        return RowStats.from_dict(self.stats)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "plan_key": self.plan_key, "consumed": [list(iv) for iv in self.consumed],
                "stats": self.stats}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ResumeState:
        return cls(epoch=int(d["epoch"]), plan_key=d["plan_key"],
                   consumed=tuple((int(a), int(b)) for a, b in d["consumed"]), stats=dict(d["stats"]))

    @staticmethod
    def merge(states: Sequence[ResumeState]) -> ResumeState:
        """One state from the states of workers that consumed disjoint shares of the same epoch."""
        if not states:
            raise ValueError("ResumeState.merge needs at least one state")
        keys = {(s.epoch, s.plan_key) for s in states}
        if len(keys) != 1:
            raise ValueError(f"cannot merge resume states of different epochs/plans: {sorted(keys, key=str)}")
        seqs, stats = SeqSet(), RowStats()
        for s in states:
            seqs.update(s.seqs())
            stats.merge(s.row_stats())
        return ResumeState(states[0].epoch, states[0].plan_key, tuple(seqs.intervals()), stats.to_dict())

    def check(self, info: EpochInfo) -> None:
        """ValueError unless this state belongs to the epoch `info` describes."""
        if self.epoch != info.epoch or (self.plan_key is not None and self.plan_key != info.key):
            raise ValueError(
                f"resume state is for epoch {self.epoch} (plan {self.plan_key}), but this is epoch {info.epoch} "
                f"(plan {info.key}): the corpus, its selection or the seed changed"
            )


# =============================================================================================================
# Epoch plan


def _as_tuple(names: str | Sequence[str] | None) -> tuple[str, ...] | None:
    return None if names is None else ((names,) if isinstance(names, str) else tuple(names))


def plan_epoch(cfg: DataConfig, *, split: str | Sequence[str] | None = None, train: bool, epoch: int = 0,
               manifest: Manifest | None = None) -> EpochPlan:
    """The shard order and row numbering of one epoch, from the manifest alone (no shard is opened).

    Shards of `split` (default cfg.splits) and cfg.tasks, in manifest order, permuted with seed
    (cfg.seed, epoch) when `train` and cfg.shuffle_files. Raises ValueError when nothing matches.
    """
    manifest = manifest or read_manifest(cfg.uri, s3=cfg.s3)
    return plan_shards(manifest, cfg.uri, _as_tuple(split) or cfg.splits, cfg.tasks, seed=cfg.seed, epoch=epoch,
                       shuffle=train and cfg.shuffle_files)


# =============================================================================================================
# Stage 2: preprocessing on an actor pool


def classify(exc: BaseException) -> str:
    """The bad-row reason of an exception raised while preprocessing a row: the `reason` code that
    ofa_model's TaskInputError and ImageError carry; bad_type for a TypeError; bad_row otherwise."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason in REASONS:
        return reason
    return BAD_TYPE if isinstance(exc, TypeError) else BAD_ROW


def preprocess_row(spec: TaskSpec, row: Mapping[str, Any], vocab: Any, pcfg: PreprocessConfig, *, train: bool,
                   rng: np.random.Generator | None,
                   pixels: str = "float") -> tuple[dict | None, str | None, str | None]:
    """(sample, None, None) or (None, reason, detail): `build_example` with bad input classified, never raised."""
    try:
        return build_example(spec, row, vocab, pcfg, train=train, rng=rng, pixels=pixels), None, None
    except (TaskInputError, ImageError, ValueError, TypeError) as exc:
        return None, classify(exc), f"{type(exc).__name__}: {exc}"


class _Preprocess:
    """map_batches UDF (one instance per actor): source rows (pyarrow) -> OUTPUT rows (pyarrow)."""

    def __init__(self, vocab: Any, pcfg: PreprocessConfig, specs: Mapping[str, TaskSpec], train: bool, seed: int,
                 epoch: int, image_dtype: str) -> None:
        self.vocab = vocab  # unpickling a Vocabulary rebuilds it: once per actor
        self.pcfg = pcfg
        self.specs = dict(specs)
        self.train = train
        self.seed = seed
        self.epoch = epoch
        self.np_dtype = IMAGE_DTYPES[image_dtype][0]
        self.pixels = "uint8" if image_dtype == "uint8" else "float"
        self.norm = list(pcfg.mean + pcfg.std) if self.pixels == "uint8" else None
        self.schema = output_schema(image_dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        cols: dict[str, list] = {name: [] for name in self.schema.names if name != "image"}
        images: list[np.ndarray | None] = []
        for row in rows:
            sample, reason, detail = self._one(row)
            ok = sample is not None
            cols["id"].append(row["id"])
            cols["task"].append(row["task"])
            cols["seq"].append(row["seq"])
            cols["span"].append(row["span"])
            cols["ok"].append(ok)
            cols["reason"].append(reason)
            cols["detail"].append(detail)
            for name in ("source", "prev_output", "target"):
                cols[name].append(sample[name] if ok else None)
            image = sample["image"] if ok else None
            images.append(None if image is None else image.numpy().astype(self.np_dtype, copy=False).reshape(-1))
            size = sample["image_size"] if ok else None
            cols["image_width"].append(None if size is None else size[0])
            cols["image_height"].append(None if size is None else size[1])
            cols["target_weight"].append(sample["target_weight"] if ok else None)
            cols["code_mask"].append(bool(sample["code_mask"]) if ok else None)
            cols["image_blank"].append(bool(sample.get("image_blank", False)) if image is not None else None)
            cols["image_norm"].append(self.norm if image is not None else None)
        arrays = {name: pa.array(values, type=self.schema.field(name).type) for name, values in cols.items()}
        arrays["image"] = _image_array(images, self.schema.field("image").type)
        return pa.Table.from_arrays([arrays[n] for n in self.schema.names], schema=self.schema)

    def _one(self, row: dict[str, Any]) -> tuple[dict | None, str | None, str | None]:
        if row["error"] is not None:  # a marker from the read stage
            return None, row["error"], row["detail"]
        spec = self.specs.get(row["task"])
        if spec is None:
            return None, UNKNOWN_TASK, f"task {row['task']!r} is not one of {sorted(self.specs)}"
        rng = np.random.default_rng([self.seed, self.epoch, row["seq"]]) if self.train else None
        return preprocess_row(spec, row, self.vocab, self.pcfg, train=self.train, rng=rng, pixels=self.pixels)


def _image_array(images: list[np.ndarray | None], type_: pa.DataType) -> pa.Array:
    """Flattened images as a large_list column; None entries become nulls."""
    present = [im for im in images if im is not None]
    lengths = [0 if im is None else im.size for im in images]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate(present) if present else np.zeros(0, dtype=type_.value_type.to_pandas_dtype())
    mask = pa.array([im is None for im in images], pa.bool_())
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type_.value_type), type=type_,
                                         mask=mask)


# =============================================================================================================
# build_dataset


def build_dataset(cfg: DataConfig, vocab: Any, *, split: str | Sequence[str] | None = None, train: bool,
                  epoch: int = 0, resume: ResumeState | None = None, specs: Mapping[str, TaskSpec] | None = None,
                  plan: EpochPlan | None = None) -> ray.data.Dataset:
    """A lazy, streaming Dataset of one epoch's preprocessed rows (columns: `output_schema`), bad rows
    included as ok=False markers. Consume it with `iter_train_batches`, which counts and drops the markers.

    split: default cfg.splits. train: shuffle shards (cfg.shuffle_files) and apply training augmentation.
    resume: skip rows an earlier run consumed. specs: task specs by name (default ofa_model.tasks.TASKS).
    plan: a precomputed `plan_epoch(...)` (then split and epoch come from it).
    """
    specs = dict(TASKS if specs is None else specs)
    plan = plan or plan_epoch(cfg, split=split, train=train, epoch=epoch)
    unknown = sorted({s.task for s in plan.shards} - set(specs))
    if unknown:
        logger.warning("corpus %s has shards of unknown tasks %s; their rows count as %s",
                       storage.redact(cfg.uri), unknown, UNKNOWN_TASK)
    if resume is not None:
        resume.check(plan.info)
    source = ShardSource(plan, s3=cfg.s3, skip=resume.seqs() if resume else None, retries=cfg.read_retries)
    pool = None if cfg.read_concurrency is None else ray.data.TaskPoolStrategy(size=cfg.read_concurrency)
    # Ray merges a read task's row groups into blocks of up to target_max_block_size of *encoded* data, which
    # preprocessing then expands ~1000x; asking for one block per rows_per_read_block rows makes Ray split
    # read outputs (SplitBlocks) so that preprocessing work is spread evenly over the actors.
    to_read = plan.total_rows - (len(resume.seqs()) if resume is not None else 0)
    blocks = max(1, math.ceil(to_read / cfg.rows_per_read_block))
    ds = ray.data.read_datasource(source, num_cpus=cfg.read_num_cpus, compute=pool, override_num_blocks=blocks)
    ctx = ds.context  # this dataset's own copy of the DataContext
    ctx.execution_options.preserve_order = cfg.preserve_order
    if cfg.max_object_store_bytes is not None:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=cfg.max_object_store_bytes)
    return ds.map_batches(
        _Preprocess,
        fn_constructor_kwargs={"vocab": vocab, "pcfg": cfg.preprocess, "specs": specs, "train": train,
                               "seed": cfg.seed, "epoch": plan.epoch, "image_dtype": cfg.image_dtype},
        batch_size=cfg.rows_per_map_batch,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.num_actors[0], max_size=cfg.num_actors[1]),
        num_cpus=cfg.actor_num_cpus,
    )


# =============================================================================================================
# Stage 3: the consumer


@dataclass
class StreamRow:
    seq: int
    id: str
    task: str
    sample: dict


class SampleStream:
    """Good samples of one DataIterator (or Dataset), in stream order; marker rows are counted as they pass.

    Rows whose seq is in `skip` (a resumed epoch) are dropped silently: they were counted before. uint8 images
    are normalised here with the mean and std they carry (image_norm), their centre blanked where image_blank.
    """

    def __init__(self, data: Any, *, fetch_rows: int = 32, local_shuffle_buffer: int = 0,
                 local_shuffle_seed: int | None = None, prefetch_batches: int = 1, skip: SeqSet | None = None,
                 stats: RowStats | None = None, consumed: SeqSet | None = None, log_bad_rows: int = 20,
                 on_bad: Any = None) -> None:
        self.data = data
        self.fetch_rows = fetch_rows
        self.local_shuffle_buffer = local_shuffle_buffer
        self.local_shuffle_seed = local_shuffle_seed
        self.prefetch_batches = prefetch_batches
        self.skip = skip or SeqSet()
        self.stats = stats if stats is not None else RowStats()
        self.consumed = consumed if consumed is not None else SeqSet()
        self.log_bad_rows = log_bad_rows
        self.on_bad = on_bad  # called after each marker row (early threshold checks)
        self._logged: dict[str, int] = {}
        self._norms: dict[tuple[float, ...], PreprocessConfig] = {}

    def __iter__(self) -> Iterator[StreamRow]:
        kwargs = {"batch_size": self.fetch_rows, "batch_format": "pyarrow", "prefetch_batches": self.prefetch_batches}
        if self.local_shuffle_buffer:
            kwargs.update(local_shuffle_buffer_size=self.local_shuffle_buffer,
                          local_shuffle_seed=self.local_shuffle_seed)
        for table in self.data.iter_batches(**kwargs):
            yield from self._rows(table)

    def _rows(self, table: pa.Table) -> Iterator[StreamRow]:
        cols = {n: table.column(n).to_pylist() for n in ("id", "task", "seq", "span", "ok", "reason", "detail")}
        images = _images(table.column("image"))
        lists = {n: table.column(n).to_pylist() for n in ("source", "prev_output", "target", "target_weight",
                                                          "code_mask", "image_width", "image_height",
                                                          "image_blank", "image_norm")}
        for i in range(table.num_rows):
            seq, span = cols["seq"][i], cols["span"][i]
            if not cols["ok"][i]:  # a marker may stand for many rows: count only those not consumed before
                for a, b in self.skip.gaps(seq, seq + span):
                    self._bad(cols["reason"][i], cols["id"][i], cols["task"][i], cols["detail"][i], b - a)
                    self.consumed.add(a, b)
                    if self.on_bad is not None:
                        self.on_bad()
                continue
            if seq in self.skip:
                continue
            width, height = lists["image_width"][i], lists["image_height"][i]
            image = images[i]
            if image is not None and image.dtype == torch.uint8:
                image = self._normalize(image, lists["image_norm"][i], lists["image_blank"][i], cols["id"][i])
            sample = {"id": cols["id"][i], "source": lists["source"][i], "prev_output": lists["prev_output"][i],
                      "target": lists["target"][i], "image": image,
                      "target_weight": lists["target_weight"][i], "code_mask": lists["code_mask"][i],
                      "image_size": None if width is None else (width, height)}
            yield StreamRow(seq, cols["id"][i], cols["task"][i], sample)

    def _normalize(self, pixels: torch.Tensor, norm: list[float] | None, blank: bool | None,
                   row_id: str | None) -> torch.Tensor:
        """uint8 (3, S, S) -> the float32 model input, as `build_example(pixels="float")` makes it."""
        if norm is None or len(norm) != 6:
            raise ValueError(f"row {row_id}: a uint8 image needs image_norm (mean and std, 6 values), got {norm!r}")
        key = tuple(norm)
        pcfg = self._norms.get(key)
        if pcfg is None:  # only mean and std matter to normalize_pixels; they came from the actors' config
            pcfg = self._norms[key] = PreprocessConfig(mean=key[:3], std=key[3:])
        image = normalize_pixels(pixels, pcfg)
        return blank_centre(image) if blank else image

    def _bad(self, reason: str, row_id: str | None, task: str | None, detail: str | None, span: int) -> None:
        example = row_id if row_id is not None else (detail or "").split(": ", 1)[0]
        self.stats.add_bad(reason, example, task, span)
        n = self._logged.get(reason, 0)
        self._logged[reason] = n + 1
        level = logging.WARNING if n < self.log_bad_rows else logging.DEBUG
        logger.log(level, "bad row %s (%s, %d row%s): %s", row_id or "-", reason, span, "s" * (span != 1), detail)


def collate_rows(rows: Sequence[StreamRow], pad_id: int, with_meta: bool = False) -> dict[str, Any]:
    """`collate` of the rows' samples; with_meta adds lists ids, tasks, seqs and image_sizes ((w, h) or None)."""
    batch = collate([r.sample for r in rows], pad_id)
    if with_meta:
        batch["ids"] = [r.id for r in rows]
        batch["tasks"] = [r.task for r in rows]
        batch["seqs"] = [r.seq for r in rows]
        batch["image_sizes"] = [r.sample["image_size"] for r in rows]
    return batch


def _images(col: pa.ChunkedArray | pa.Array) -> list[torch.Tensor | None]:
    """Per-row (3, S, S) tensors (None for null) from a flattened large_list column, without copying.

    The tensors view the Arrow buffers (read-only, e.g. in Ray's object store); `collate` only reads them
    (torch.stack copies into the batch), so torch's one-time "not writable" warning is silenced here.
    """
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    out: list[torch.Tensor | None] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for chunk in chunks:
            if len(chunk) == 0:
                continue
            valid = chunk.is_valid().to_numpy(zero_copy_only=False)
            offsets = chunk.offsets.to_numpy()  # absolute positions in chunk.values (which ignores slicing)
            values = chunk.values.to_numpy(zero_copy_only=False)
            for i in range(len(chunk)):
                if not valid[i]:
                    out.append(None)
                    continue
                flat = values[offsets[i] : offsets[i + 1]]
                side = math.isqrt(flat.size // 3)
                if 3 * side * side != flat.size:
                    raise ValueError(f"image row {len(out)} has {flat.size} values, not 3 * S * S")
                out.append(torch.from_numpy(flat.reshape(3, side, side)))
    return out


class ProgressLog:
    """Logs rows, rate and ETA every `every_s` seconds."""

    def __init__(self, label: str, total: int | None, every_s: float, start_rows: int = 0) -> None:
        self.label, self.total, self.every_s = label, total, every_s
        self.t0 = self.last = time.monotonic()
        self.start_rows = start_rows

    def tick(self, rows: int, bad: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = (rows - self.start_rows) / max(now - self.t0, 1e-9)
        if self.total:
            eta = (self.total - rows) / rate if rate > 0 else math.inf
            logger.info("%s: %d/%d rows (%.1f%%), %.1f rows/s, ETA %s, %d bad", self.label, rows, self.total,
                        100 * rows / self.total, rate, _duration(eta), bad)
        else:
            logger.info("%s: %d rows, %.1f rows/s, %d bad", self.label, rows, rate, bad)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


class BatchIterator:
    """Training/evaluation batches from one DataIterator or Dataset (see `iter_train_batches`).

    Iterate once per epoch. `stats` holds the counts so far (including those of `resume`),
    `resume_state()` the state to save with a checkpoint.
    """

    def __init__(self, data: Any, pad_id: int, batch_size: int, *, info: EpochInfo | None = None,
                 resume: ResumeState | None = None, local_shuffle_buffer: int = 0, seed: int = 0,
                 bad_row_threshold: float | None = 0.01, early_check_rows: int = 1000, early_factor: float = 3.0,
                 with_meta: bool = False, drop_last: bool = False, prefetch_batches: int = 1,
                 progress_every_s: float = 30.0, log_bad_rows: int = 20, total_rows: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if resume is not None and info is not None:
            resume.check(info)
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.info = info
        self.epoch = info.epoch if info is not None else (resume.epoch if resume is not None else 0)
        self.threshold = bad_row_threshold
        self.early_check_rows = early_check_rows
        self.early_factor = early_factor
        self.with_meta = with_meta
        self.drop_last = drop_last
        self.stats = resume.row_stats() if resume is not None else RowStats()
        self.consumed = resume.seqs() if resume is not None else SeqSet()
        self.stream = SampleStream(
            data, fetch_rows=batch_size, local_shuffle_buffer=local_shuffle_buffer,
            local_shuffle_seed=seed + self.epoch if local_shuffle_buffer else None, prefetch_batches=prefetch_batches,
            skip=resume.seqs() if resume is not None else None, stats=self.stats, consumed=self.consumed,
            log_bad_rows=log_bad_rows, on_bad=self._check_early)
        total = total_rows if total_rows is not None else (info.total_rows if info is not None else None)
        self.progress = ProgressLog(f"epoch {self.epoch}", total, progress_every_s, start_rows=self.stats.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pending: list[StreamRow] = []
        for row in self.stream:
            pending.append(row)
            if len(pending) == self.batch_size:
                yield self._emit(pending)
                pending = []
        if pending and not self.drop_last:
            yield self._emit(pending)
        self.progress.tick(self.stats.rows, self.stats.bad, force=True)
        self._check_end()

    def _emit(self, rows: list[StreamRow]) -> dict[str, Any]:
        batch = collate_rows(rows, self.pad_id, self.with_meta)
        for r in rows:
            self.consumed.add(r.seq, r.seq + 1)
            self.stats.add_ok(r.task)
        self.progress.tick(self.stats.rows, self.stats.bad)
        return batch

    def _check_early(self) -> None:
        """Fail before the end of the epoch only when the epoch can no longer stay under the threshold
        (bad rows already exceed threshold * epoch rows), or, without a known epoch size, when the bad
        fraction is far above it after enough rows."""
        s = self.stats
        if self.threshold is None or s.rows < self.early_check_rows:
            return
        total = self.info.total_rows if self.info is not None else None
        if total:
            if s.bad > self.threshold * total:
                raise BadDataError(s, self.threshold, early=True)
        elif s.bad_fraction > min(1.0, self.early_factor * self.threshold):
            raise BadDataError(s, self.threshold, early=True)

    def _check_end(self) -> None:
        if self.threshold is not None and self.stats.bad_fraction > self.threshold:
            raise BadDataError(self.stats, self.threshold)
        if self.stats.bad:
            logger.info("epoch %d: %d good rows, %d bad rows: %s", self.epoch, self.stats.ok, self.stats.bad,
                        self.stats.describe())

    def resume_state(self) -> ResumeState:
        """Rows consumed so far (good rows yielded in batches, bad rows counted) and the counts."""
        return ResumeState(self.epoch, self.info.key if self.info is not None else None,
                           tuple(self.consumed.intervals()), self.stats.to_dict())


def pad_id_of(vocab: Any) -> int:
    """The pad id of a Vocabulary, or `vocab` itself when it is already an int."""
    return vocab if isinstance(vocab, int) else vocab.pad_id


def iter_train_batches(data_iterator: Any, vocab: Any, batch_size: int, **kwargs: Any) -> BatchIterator:
    """Batches of `collate` (src_tokens, src_lengths, patch_images, patch_masks, prev_output_tokens, target,
    target_weights, code_masks, ntokens) from a Ray DataIterator (e.g. `ray.train.get_dataset_shard`) or a
    Dataset built by `build_dataset`. `vocab`: a Vocabulary or the pad id. Keywords: see `BatchIterator`
    (info, resume, local_shuffle_buffer, seed, bad_row_threshold, with_meta (adds ids, tasks, seqs, image_sizes),
    drop_last, ...)."""
    return BatchIterator(data_iterator, pad_id_of(vocab), batch_size, **kwargs)


def iterator_options(cfg: DataConfig) -> dict[str, Any]:
    """The BatchIterator keywords that come from a DataConfig."""
    return {"local_shuffle_buffer": cfg.local_shuffle_buffer, "seed": cfg.seed,
            "bad_row_threshold": cfg.bad_row_threshold, "early_check_rows": cfg.early_check_rows,
            "early_factor": cfg.early_factor, "prefetch_batches": cfg.prefetch_batches,
            "progress_every_s": cfg.progress_every_s, "log_bad_rows": cfg.log_bad_rows}


def epoch_batches(cfg: DataConfig, vocab: Any, *, split: str | Sequence[str] | None = None, train: bool,
                  epoch: int = 0, resume: ResumeState | None = None, specs: Mapping[str, TaskSpec] | None = None,
                  **overrides: Any) -> BatchIterator:
    """One process consuming a whole epoch (evaluation, the doctor, single-process training)."""
    plan = plan_epoch(cfg, split=split, train=train, epoch=epoch)
    ds = build_dataset(cfg, vocab, train=train, resume=resume, specs=specs, plan=plan)
    options = {**iterator_options(cfg), "info": plan.info, "resume": resume, **overrides}
    return iter_train_batches(ds, vocab, cfg.batch_size, **options)


# =============================================================================================================
# Dataset doctor


def inspect(cfg: DataConfig, vocab: Any, *, split: str | Sequence[str] | None = None, limit: int | None = None,
            specs: Mapping[str, TaskSpec] | None = None) -> dict[str, Any]:
    """Push a corpus through the training pipeline (no augmentation, no shuffling) and summarise it:
    rows ok / bad (by reason with example ids, by task), per-task counts, rows/s (start-up included).
    `limit`: stop once that many rows were seen (a few more when bad rows arrive with the last batch).
    Never raises for bad data; `over_threshold` says whether training would stop with BadDataError."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    if limit is not None:
        cfg = cfg.replace(batch_size=min(cfg.batch_size, limit))
    plan = plan_epoch(cfg, split=split, train=False)
    it = epoch_batches(cfg, vocab, split=split, train=False, specs=specs, bad_row_threshold=None)
    t0 = time.perf_counter()
    for _ in it:
        if limit is not None and it.stats.rows >= limit:
            break
    seconds = time.perf_counter() - t0
    stats = it.stats.to_dict()
    return {
        "uri": storage.redact(cfg.uri),
        "splits": list(_as_tuple(split) or cfg.splits),
        "tasks": None if cfg.tasks is None else list(cfg.tasks),
        "rows_in_manifest": plan.total_rows,
        "rows_seen": it.stats.rows,
        "rows_ok": stats["ok"],
        "rows_bad": stats["bad"],
        "bad_fraction": round(it.stats.bad_fraction, 6),
        "bad_row_threshold": cfg.bad_row_threshold,
        "over_threshold": it.stats.bad_fraction > cfg.bad_row_threshold,
        "bad_by_reason": stats["bad_by_reason"],
        "bad_examples": stats["examples"],
        "ok_by_task": stats["ok_by_task"],
        "bad_by_task": stats["bad_by_task"],
        "seconds": round(seconds, 3),
        "rows_per_s": round(it.stats.rows / seconds, 1) if seconds > 0 else None,
    }
