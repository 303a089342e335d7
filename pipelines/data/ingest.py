"""Stages 1 and 2 of the ingest: an epoch's plan -> a lazy, streaming Ray Dataset of model-ready rows.

1. `plan_epoch`: the shards of the selection in the epoch's order and the row numbering (`seq`), from the
   manifest alone. `pipelines.data.source.ShardSource` (a `ray.data.Datasource`) reads them in that order;
   unreadable shards and wrongly typed columns become marker rows ("unreadable_shard" with the shard URI,
   "bad_type" with the ids); rows consumed before a resume, and a training worker's rows outside its part of
   the epoch (`build_dataset(part=...)`), are dropped there, before any image is decoded.
2. `map_batches(_Preprocess)` on an actor pool: each actor builds the vocabulary once and runs the shared
   `ofa_model.tasks.build_example` per row (or, with `DataConfig.preprocess_on` "tasks", the same code fused
   into the read tasks). Output columns (`output_schema()`): id, task, seq, span, ok,
   reason, detail, source / prev_output / target (int32 token lists), image (flattened (3, S, S), null for
   text-only rows), image_width / image_height, target_weight, code_mask, image_blank, image_norm.
   With image_dtype "uint8" (the default) the image is the resized uint8 pixels (a quarter of float32's
   object-store traffic), `image_norm` holds the PreprocessConfig's mean and std and `image_blank` says
   whether image infilling blanks the centre; the consumer (`pipelines.data.batches`) normalises them, giving
   bit for bit the float32 image of `build_example`. With "float32" / "float16" the actors ship the
   normalised (and blanked) image and image_norm is null.

Only input errors are bad rows: a row whose preprocessing raises `ofa_model.errors.InputError` (a
TaskInputError or an ImageError) comes out with ok=False and the error's `reason`; nothing is dropped
inside Ray, so counts stay exact. Any other exception is a bug in our code and fails the pipeline.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback

from ofa_model.derived import POOL_SIZE, derive_row, needs_pool, pool_value
from ofa_model.errors import (
    BAD_BOX,
    BAD_IMAGE,
    BAD_ROW,
    BAD_TYPE,
    EMPTY_IMAGE,
    EMPTY_TEXT,
    IMAGE_TOO_LARGE,
    MISSING_FIELD,
    NOT_AN_IMAGE,
    TRUNCATED_IMAGE,
    UNKNOWN_LABEL,
    UNKNOWN_TASK,
    UNREADABLE_SHARD,
    WRONG_CODE_COUNT,
    InputError,
)
from ofa_model.preprocess import PreprocessConfig
from ofa_model.tasks import TASKS, TaskSpec, build_example
from pipelines import storage
from pipelines.data.data_config import IMAGE_DTYPES, DataConfig, read_block_rows
from pipelines.data.rowstats import ResumeState
from pipelines.data.shards import Manifest, iter_rows, read_manifest
from pipelines.data.source import EpochPlan, SeqSet, ShardSource, plan_part, plan_shards

__all__ = ["REASONS", "build_dataset", "classify", "output_schema", "plan_epoch", "preprocess_row"]

logger = logging.getLogger(__name__)

# Every reason a row of the ingest can be counted by: ofa_model's input errors, the read stage's markers and
# unknown tasks.
REASONS = (
    BAD_IMAGE, IMAGE_TOO_LARGE, EMPTY_IMAGE, NOT_AN_IMAGE, TRUNCATED_IMAGE, MISSING_FIELD, EMPTY_TEXT, BAD_BOX,
    UNKNOWN_LABEL, BAD_TYPE, UNKNOWN_TASK, UNREADABLE_SHARD, BAD_ROW, WRONG_CODE_COUNT,
)  # fmt: skip


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
# Stage 2: preprocessing on an actor pool (stage 1 is pipelines.data.source)


def classify(exc: InputError) -> str:
    """The bad-row reason of an input error raised while preprocessing a row: the `reason` code it carries
    (ofa_model's TaskInputError and ImageError set it; a plain InputError is bad_row)."""
    return exc.reason or BAD_ROW


def preprocess_row(spec: TaskSpec, row: Mapping[str, Any], vocab: Any, pcfg: PreprocessConfig, *, train: bool,
                   rng: np.random.Generator | None,
                   pixels: str = "float") -> tuple[dict | None, str | None, str | None]:
    """(sample, None, None) or (None, reason, detail): `build_example` with input errors classified, never
    raised. Any other exception is a bug, not bad data, and propagates."""
    try:
        return build_example(spec, row, vocab, pcfg, train=train, rng=rng, pixels=pixels), None, None
    except InputError as exc:
        return None, classify(exc), f"{type(exc).__name__}: {exc}"


class _Preprocess:
    """map_batches UDF (one instance per actor): source rows (pyarrow) -> OUTPUT rows (pyarrow)."""

    def __init__(self, vocab: Any, pcfg: PreprocessConfig, specs: Mapping[str, TaskSpec], train: bool, seed: int,
                 epoch: int, image_dtype: str, derived: str | None = None, pool: Sequence[str] = ()) -> None:
        self.vocab = vocab  # unpickling a Vocabulary rebuilds it: once per actor
        self.derived, self.pool = derived, tuple(pool)  # rows of a derived task: made from the source's rows
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
            task, sample, reason, detail = self._one(row)
            ok = sample is not None
            cols["id"].append(row["id"])
            cols["task"].append(task)
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

    def _one(self, row: dict[str, Any]) -> tuple[str, dict | None, str | None, str | None]:
        """(the row's task, then `preprocess_row`'s sample, reason, detail); a derived task's row is made from
        the source row first, with the row's own generator (its negatives: the same on a resumed epoch)."""
        task = self.derived or row["task"]
        if row["error"] is not None:  # a marker from the read stage
            return task, None, row["error"], row["detail"]
        rng = np.random.default_rng([self.seed, self.epoch, row["seq"]]) if self.train else None
        if self.derived is not None:
            try:
                row = derive_row(self.derived, row, rng or np.random.default_rng([row["seq"]]), self.pool)
            except InputError as exc:
                return task, None, classify(exc), str(exc)
        spec = self.specs.get(task)
        if spec is None:
            return task, None, UNKNOWN_TASK, f"task {task!r} is not one of {sorted(self.specs)}"
        return (task, *preprocess_row(spec, row, self.vocab, self.pcfg, train=self.train, rng=rng,
                                      pixels=self.pixels))


def draws_negatives(cfg: DataConfig) -> bool:
    """Whether the corpus `cfg` is a derived task's whose negatives come from a pool (`negative_pool`)."""
    return cfg.derived is not None and needs_pool(cfg.derived)


def negative_pool(cfg: DataConfig) -> tuple[str, ...]:
    """The captions or answers a derived task draws its negatives from: the first POOL_SIZE distinct ones of the
    corpus's source-task rows in manifest order (`ofa_model.derived.pool_value`), the same in every process."""
    seen: dict[str, None] = {}
    for row in iter_rows(cfg.uri, s3=cfg.s3, columns=["target", "targets"], splits=cfg.splits, tasks=cfg.tasks):
        value = pool_value(row)
        if value is not None:
            seen.setdefault(value, None)
            if len(seen) >= POOL_SIZE:
                break
    return tuple(seen)


def _preprocess_batch(batch: pa.Table, kwargs: dict[str, Any]) -> pa.Table:
    """The task form of `_Preprocess` (DataConfig.preprocess_on "tasks"). Ray deserialises `kwargs`, and so
    rebuilds the vocabulary, once per task; constructing `_Preprocess` from them per batch only stores them."""
    return _Preprocess(**kwargs)(batch)


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
# The Dataset of one epoch


class IdleLoopThrottle(ExecutionCallback):
    """Keeps Ray Data's scheduling loop from spinning a core while the pipeline waits on its consumer.

    In Ray 2.60 the loop blocks in `ray.wait` only while some task runs. When every operator is backpressured
    by a slower consumer, which is the normal state of a training input pipeline, no task runs and the loop
    returns at once, over and over: measured here, the SplitCoordinator used 80% of a core while training ran
    at half speed on the other. A step that does not wait is not free either: on a busy 2-core machine its
    bookkeeping (resource budgets, metrics) takes several milliseconds of Python, holding the GIL of the
    process that iterates, which is the training worker when it builds its own Datasets. Sampled there
    (py-spy, easy-VQA fine-tune), two such loops took 13% of the worker's samples while a step-length rule
    (sleep only after a step under 2 ms) never fired. So a loop step is never shorter than `MIN_PERIOD_S`:
    one that returns sooner sleeps the rest. A step that waited on running tasks for as long is not slowed,
    and each step still dispatches and collects every task it can: the period bounds how often the loop
    looks, not how much it moves in a look.
    (The callback hook is Ray Data's `DataContext.custom_execution_callback_classes`; the base class is internal.)
    """

    MIN_PERIOD_S = 0.05

    def __init__(self) -> None:
        self._last = 0.0

    def on_execution_step(self, executor) -> None:
        rest = self.MIN_PERIOD_S - (time.monotonic() - self._last)
        if rest > 0:
            time.sleep(rest)
        self._last = time.monotonic()


def build_dataset(cfg: DataConfig, vocab: Any, *, split: str | Sequence[str] | None = None, train: bool,
                  epoch: int = 0, resume: ResumeState | None = None, specs: Mapping[str, TaskSpec] | None = None,
                  plan: EpochPlan | None = None, pool: Sequence[str] | None = None,
                  part: tuple[int, int] | None = None) -> ray.data.Dataset:
    """A lazy, streaming Dataset of one epoch's preprocessed rows (columns: `output_schema`), bad rows
    included as ok=False markers. Consume it with `pipelines.data.batches.iter_train_batches` (or, with other
    corpora, `iter_mixture_batches`), which counts and drops the markers.

    split: default cfg.splits. train: shuffle shards (cfg.shuffle_files) and apply training augmentation.
    resume: skip rows an earlier run consumed. specs: task specs by name (default ofa_model.tasks.TASKS).
    plan: a precomputed `plan_epoch(...)` (then split and epoch come from it).
    pool: a derived task's negatives, `negative_pool(cfg)`, read once by a caller that builds many Datasets (a
    training run: one per epoch and per worker); None: read here when cfg's derived task draws negatives.
    part: (rank, world): only worker `rank`'s part of the rows `resume` left (`pipelines.data.source.plan_part`:
    a run of consecutive rows, the parts of all ranks disjoint and together every row left); None: all of them.
    """
    specs = dict(TASKS if specs is None else specs)
    plan = plan or plan_epoch(cfg, split=split, train=train, epoch=epoch)
    unknown = sorted({s.task for s in plan.shards} - set(specs))
    if unknown:
        logger.warning("corpus %s has shards of unknown tasks %s; their rows count as %s",
                       storage.redact(cfg.uri), unknown, UNKNOWN_TASK)
    if resume is not None:
        resume.check(plan.info)
    skip = resume.seqs() if resume is not None else SeqSet()
    if part is not None:  # the rows outside this worker's part are skipped as if consumed
        skip = SeqSet(plan_part(plan.total_rows, skip, *part).gaps(0, plan.total_rows))
    source = ShardSource(plan, s3=cfg.s3, skip=skip, retries=cfg.read_retries)
    readers = None if cfg.read_concurrency is None else ray.data.TaskPoolStrategy(size=cfg.read_concurrency)
    # Ray merges a read task's row groups into blocks of up to target_max_block_size of *encoded* data, which
    # preprocessing then expands ~1000x; asking for one block per rows_per_read_block rows makes Ray split
    # read outputs (SplitBlocks) so that preprocessing work is spread evenly over the actors.
    to_read = plan.total_rows - len(skip)
    blocks = max(1, math.ceil(to_read / read_block_rows(cfg)))
    ds = ray.data.read_datasource(source, num_cpus=cfg.read_num_cpus, compute=readers, override_num_blocks=blocks)
    ctx = ds.context  # this dataset's own copy of the DataContext
    ctx.execution_options.preserve_order = cfg.preserve_order
    if IdleLoopThrottle not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, IdleLoopThrottle]
    if cfg.max_object_store_bytes is not None:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=cfg.max_object_store_bytes)
    kwargs = {"vocab": vocab, "pcfg": cfg.preprocess, "specs": specs, "train": train, "seed": cfg.seed,
              "epoch": plan.epoch, "image_dtype": cfg.image_dtype, "derived": cfg.derived,
              "pool": pool if pool is not None else negative_pool(cfg) if draws_negatives(cfg) else ()}
    if cfg.preprocess_on == "tasks":  # fused into the read tasks: no actor to start (see DataConfig)
        return ds.map_batches(_preprocess_batch, fn_kwargs={"kwargs": kwargs}, batch_size=cfg.rows_per_map_batch,
                              batch_format="pyarrow", num_cpus=cfg.read_num_cpus)
    return ds.map_batches(
        _Preprocess,
        fn_constructor_kwargs=kwargs,
        batch_size=cfg.rows_per_map_batch,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.num_actors[0], max_size=cfg.num_actors[1]),
        num_cpus=cfg.actor_num_cpus,
    )
