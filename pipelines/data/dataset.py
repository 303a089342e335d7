"""Ray Data ingest, the front door: a canonical corpus (`pipelines.data.shards`) -> model-ready rows -> batches.

    cfg = DataConfig.from_dict(yaml.safe_load(open("configs/data.yaml")))
    it = epoch_batches(cfg, vocab, train=True, epoch=e)                    # one corpus, Datasets built here
    it = epoch_batches(cfg, vocab, train=True, epoch=e, part=(rank, world))    # one worker's part of it
    it = epoch_batches(cfg, vocab, train=True, epoch=e, mixture={"caption": 3, "vqa": 1})   # a mixture
    for batch in it:                                                       # what preprocess.collate returns
        ...
    state = it.resume_state()                                              # save with the checkpoint

`epoch_batches` is the one way to get an epoch's batches: for the trainer (every worker builds its own Datasets
here, of its `part` of the epoch), the dataset doctor (`inspect`) and the benchmarks. Consumer settings travel as
one `ConsumerOptions` (default: the DataConfig's). The modules behind it, in pipeline order:

* `pipelines.data.data_config`: `DataConfig`, validated, from YAML.
* `pipelines.data.source`: stage 1, reading shards into numbered rows (`plan_shards`, `plan_part`, `ShardSource`,
  `SeqSet`).
* `pipelines.data.ingest`: stages 1-2 as a Ray Dataset: `plan_epoch`, `build_dataset` (preprocessing on an actor
  pool; only `ofa_model.errors.InputError`s become bad rows, by their reason).
* `pipelines.data.batches`: stage 3, the consumer (`iter_train_batches`, `iter_mixture_batches`, which
  `epoch_batches` calls): counts and drops bad rows, resumes, logs progress, collates.
* `pipelines.data.rowstats`: `RowStats`, the one bad-row rule (`BadRowRule` -> `BadDataError`), `ResumeState`.

One Dataset is one epoch: `epoch` seeds the shard order (and per-row augmentation). A Dataset iterated again
repeats that shard order; the consumer's local shuffle seed (`seed + epoch`) still changes the row order within
the shuffle buffer. With `preserve_order=True` and a seeded local shuffle, the same config and epoch give the same
id order.

Several workers: each plans the same epoch (the plan is a pure function of the manifest, seed and epoch) and
reads its `part=(rank, world)`: a run of consecutive rows of the plan (`plan_part`), the parts disjoint and
together every row the resume state left, so across the workers the epoch covers each row once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ofa_model.derived import DERIVED
from ofa_model.tasks import TaskSpec
from pipelines import storage
from pipelines.data.batches import BatchIterator, ConsumerOptions, iter_mixture_batches, iter_train_batches
from pipelines.data.data_config import DataConfig
from pipelines.data.ingest import build_dataset, draws_negatives, negative_pool, plan_epoch
from pipelines.data.rowstats import MixtureState, ResumeState
from pipelines.data.shards import Manifest, read_manifest
from pipelines.data.source import EpochPlan

__all__ = [
    "BatchIterator", "ConsumerOptions", "DataConfig", "EpochPlan", "build_dataset", "corpora", "data_fingerprint",
    "epoch_batches", "epoch_plans", "inspect", "negative_pools", "read_manifests",
]  # fmt: skip

SINGLE = "data"  # the name of a single corpus among `corpora` (and of its Ray Train dataset)


def corpora(cfg: DataConfig, mixture: Mapping[str, float] | None = None) -> dict[str, DataConfig]:
    """The corpora an epoch reads, by name: `cfg` alone, or one per task of a `mixture`: `cfg` restricted to the
    task, read from the task's own corpus when `cfg.sources` names one. A derived task (`ofa_model.derived`:
    itm, qa_matching, grounded_caption) reads its source task's rows (from that task's corpus), turned into its
    own as they are preprocessed, when `cfg.derive` lists it."""
    if not mixture:
        if cfg.derive:
            raise ValueError(f"data.derive ({', '.join(cfg.derive)}) is for a mixture's tasks; this run trains one "
                             f"task")
        if cfg.sources:
            raise ValueError(f"data.sources ({', '.join(sorted(cfg.sources))}) is for a mixture's tasks; "
                             f"this run trains one task from data.uri")
        return {SINGLE: cfg}
    strays = sorted(set(cfg.sources) - set(mixture) - {DERIVED[t] for t in cfg.derive})
    if strays:
        raise ValueError(f"data.sources.{strays[0]}: not a task of the mixture ({', '.join(sorted(mixture))})")
    strays = sorted(set(cfg.derive) - set(mixture))
    if strays:
        raise ValueError(f"data.derive: {strays[0]} is not a task of the mixture ({', '.join(sorted(mixture))})")
    moved = sorted(set(cfg.derive) & set(cfg.sources))
    if moved:
        raise ValueError(f"data.derive: {moved[0]} is made from {DERIVED[moved[0]]} rows; data.sources.{moved[0]} "
                         f"would read rows of its own")
    out = {}
    for task in sorted(mixture):
        reads = DERIVED[task] if task in cfg.derive else task
        source = cfg.sources.get(reads)
        where = {} if source is None else {"uri": source.uri, "splits": source.splits or cfg.splits}
        out[task] = cfg.replace(tasks=(reads,), sources={}, derive=(), derived=task if reads != task else None,
                                **where)
    return out


def read_manifests(cfg: DataConfig, mixture: Mapping[str, float] | None = None) -> dict[str, Manifest]:
    """The manifest of every corpus an epoch reads, by URI (each read once)."""
    uris = sorted({c.uri for c in corpora(cfg, mixture).values()})
    return {uri: read_manifest(uri, s3=cfg.s3) for uri in uris}


def negative_pools(cfg: DataConfig, mixture: Mapping[str, float] | None = None) -> dict[str, tuple[str, ...]]:
    """The negative pool of every corpus of `corpora` whose derived task draws negatives (itm, qa_matching), by
    corpus name (`pipelines.data.ingest.negative_pool`: a pass over the source rows). A training run reads them
    once, in its driver, and hands them to every Dataset its workers build (`epoch_batches(pools=...)`)."""
    return {name: negative_pool(c) for name, c in corpora(cfg, mixture).items() if draws_negatives(c)}


def data_fingerprint(manifests: Mapping[str, Manifest]) -> str:
    """What a run trained on: the corpus's fingerprint, or, over several corpora, a hash of theirs (in URI
    order), so a run's data is named by one value either way."""
    if len(manifests) == 1:
        return next(iter(manifests.values())).fingerprint
    joined = "\n".join(f"{uri}\t{m.fingerprint}" for uri, m in sorted(manifests.items()))
    return "corpora-sha256:" + hashlib.sha256(joined.encode()).hexdigest()


def epoch_plans(cfg: DataConfig, mixture: Mapping[str, float] | None = None, *, train: bool, epoch: int = 0,
                split: str | Sequence[str] | None = None,
                manifests: Mapping[str, Manifest] | None = None) -> dict[str, EpochPlan]:
    """Each corpus's `EpochPlan` (shard order, row numbering) for `epoch`, by the names of `corpora`.
    manifests: by URI (`read_manifests`; None: read here)."""
    return {name: plan_epoch(c, split=split, train=train, epoch=epoch,
                             manifest=(manifests or {}).get(c.uri))
            for name, c in corpora(cfg, mixture).items()}


def epoch_batches(cfg: DataConfig, vocab: Any, *, train: bool, epoch: int = 0,
                  split: str | Sequence[str] | None = None, mixture: Mapping[str, float] | None = None,
                  plans: Mapping[str, EpochPlan] | None = None, part: tuple[int, int] | None = None,
                  resume: ResumeState | MixtureState | None = None, specs: Mapping[str, TaskSpec] | None = None,
                  options: ConsumerOptions | None = None, pools: Mapping[str, Sequence[str]] | None = None,
                  **batching: Any) -> BatchIterator:
    """One epoch's batches of `cfg`'s corpus, or of a weighted `mixture` of its tasks (task -> weight).

    plans: each corpus's EpochPlan (default: `epoch_plans` of split/train/epoch). part: (rank, world): only this
    worker's part of each corpus's rows (`build_dataset(part=...)`); None: all of them. resume: a ResumeState
    (one corpus) or a MixtureState (a mixture); the sources skip what it consumed. options: the consumer's
    (default: `ConsumerOptions.of(cfg)`). pools: the derived corpora's negative pools (`negative_pools`, read
    once for every epoch; None: each Dataset reads its own). Batching keywords as in `iter_train_batches`
    (with_meta, drop_last, num_rows).
    """
    configs = corpora(cfg, mixture)
    plans = dict(plans) if plans is not None else epoch_plans(cfg, mixture, train=train, epoch=epoch, split=split)
    if set(plans) != set(configs):
        raise ValueError(f"plans name {sorted(plans)}, the corpora are {sorted(configs)}")
    options = options if options is not None else ConsumerOptions.of(cfg)
    starts = resume.sources if isinstance(resume, MixtureState) else {name: resume for name in configs}
    shards = {name: build_dataset(c, vocab, train=train, specs=specs, plan=plans[name], resume=starts.get(name),
                                  pool=(pools or {}).get(name), part=part)
              for name, c in configs.items()}
    if mixture:
        return iter_mixture_batches(shards, mixture, vocab, cfg.batch_size, resume=resume, options=options,
                                    infos={name: p.info for name, p in plans.items()}, **batching)
    return iter_train_batches(shards[SINGLE], vocab, cfg.batch_size, info=plans[SINGLE].info, resume=resume,
                              options=options, **batching)


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
    plans = epoch_plans(cfg, split=split, train=False)
    it = epoch_batches(cfg, vocab, train=False, plans=plans, specs=specs,
                       options=ConsumerOptions.of(cfg).without_rule())
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
        "rows_in_manifest": plans[SINGLE].total_rows,
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
