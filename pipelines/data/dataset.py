"""Ray Data ingest, the front door: a canonical corpus (`pipelines.data.shards`) -> model-ready rows -> batches.

    cfg = DataConfig.from_dict(yaml.safe_load(open("configs/data.yaml")))
    plan = plan_epoch(cfg, split="train", train=True, epoch=e)             # shard order + row numbering
    ds = build_dataset(cfg, vocab, train=True, plan=plan)                  # lazy, streaming ray.data.Dataset
    it = iter_train_batches(ds.iterator(), vocab, cfg.batch_size, info=plan.info, **iterator_options(cfg))
    for batch in it:                                                       # what preprocess.collate returns
        ...
    state = it.resume_state()                                              # save with the checkpoint

That is the one way to get batches; a weighted mixture of corpora is `iter_mixture_batches(...)`, the same
consumer with several sources. One process reading a whole epoch (evaluation) is `epoch_batches`; the dataset
doctor is `inspect`. Import everything from here; the modules behind it, in pipeline order:

* `pipelines.data.data_config`: `DataConfig`, validated, from YAML.
* `pipelines.data.source`: stage 1, reading shards into numbered rows (`plan_shards`, `ShardSource`, `SeqSet`).
* `pipelines.data.ingest`: stages 1-2 as a Ray Dataset: `plan_epoch`, `build_dataset` (preprocessing on an actor
  pool; only `ofa_model.errors.InputError`s become bad rows, by their reason).
* `pipelines.data.batches`: stage 3, the consumer (`iter_train_batches`, `iter_mixture_batches`): counts and drops
  bad rows, resumes, logs progress, collates.
* `pipelines.data.rowstats`: `RowStats`, the one bad-row rule (`BadRowRule` -> `BadDataError`), `ResumeState`.

One Dataset is one epoch: `epoch` seeds the shard order (and per-row augmentation). A Dataset iterated again
(e.g. by Ray Train in a later epoch) repeats that shard order; the consumer's local shuffle seed
(`seed + epoch`) still changes the row order within the shuffle buffer. With `preserve_order=True` and a
seeded local shuffle, the same config and epoch give the same id order.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from ofa_model.tasks import TaskSpec
from pipelines import storage
from pipelines.data.batches import (
    BatchIterator,
    CorpusStream,
    iter_mixture_batches,
    iter_train_batches,
    iterator_options,
    weighted_schedule,
)
from pipelines.data.data_config import DataConfig
from pipelines.data.ingest import REASONS, build_dataset, classify, output_schema, plan_epoch, preprocess_row
from pipelines.data.rowstats import BadDataError, BadRowRule, MixtureState, ResumeState, RowStats
from pipelines.data.source import SOURCE_SCHEMA, EpochInfo, EpochPlan, SeqSet

__all__ = [
    "REASONS", "SOURCE_SCHEMA", "BadDataError", "BadRowRule", "BatchIterator", "CorpusStream", "DataConfig",
    "EpochInfo", "EpochPlan", "MixtureState", "ResumeState", "RowStats", "SeqSet", "build_dataset", "classify",
    "epoch_batches", "inspect", "iter_mixture_batches", "iter_train_batches", "iterator_options",
    "output_schema", "plan_epoch", "preprocess_row", "weighted_schedule",
]  # fmt: skip


def epoch_batches(cfg: DataConfig, vocab: Any, *, split: str | Sequence[str] | None = None, train: bool,
                  epoch: int = 0, resume: ResumeState | None = None, specs: Mapping[str, TaskSpec] | None = None,
                  **overrides: Any) -> BatchIterator:
    """One process consuming a whole epoch (evaluation, the doctor, single-process training); `overrides`:
    keywords of `iter_train_batches` replacing the config's."""
    plan = plan_epoch(cfg, split=split, train=train, epoch=epoch)
    ds = build_dataset(cfg, vocab, train=train, resume=resume, specs=specs, plan=plan)
    options = {**iterator_options(cfg), "info": plan.info, "resume": resume, **overrides}
    return iter_train_batches(ds, vocab, cfg.batch_size, **options)


def inspect(cfg: DataConfig, vocab: Any, *, split: str | Sequence[str] | None = None, limit: int | None = None,
            specs: Mapping[str, TaskSpec] | None = None) -> dict[str, Any]:
    """The dataset doctor: push a corpus through the training pipeline (no augmentation, no shuffling) and
    summarise it: rows ok / bad (by reason with example ids, by task), per-task counts, rows/s (start-up
    included). `limit`: stop once that many rows were seen (a few more when bad rows arrive with the last
    batch). Never raises for bad data; `over_threshold` says whether training would stop with BadDataError."""
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
        "splits": [split] if isinstance(split, str) else list(split or cfg.splits),
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
