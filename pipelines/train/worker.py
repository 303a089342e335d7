"""The Ray Train worker: epochs of training steps, each epoch ending in validation, metrics and a checkpoint.

    train_loop(loop_config)   # what TorchTrainer runs on every worker (pipelines.train.driver builds it)

A step is `forward_loss` on each of `optim.grad_accum` micro-batches, then `optimizer_step`
(`pipelines.train.step`); `_train_epoch` shows a whole epoch on one screen.

* Data: every worker builds each epoch's Datasets itself (`pipelines.data.dataset.epoch_batches`), from the
  same seeded plan and the checkpoint's data position, and reads its part of it: rank r of `world` reads the r-th
  of `world` equal runs of the rows not yet consumed (`pipelines.data.source.plan_part`), so the ranks' rows
  are disjoint and together the epoch's. No Dataset crosses the fit's boundary, so one fit trains every epoch
  (`pipelines.train.driver`).
* Workers run the same number of steps: the parts differ by at most a row per corpus, so they hold the same
  number of batches up to one, and a mixture's parts run out of the same source at about the same slot; the
  count itself is not fixed from the plan, since bad rows are found only when read. Each micro-batch all-reduces
  "I have a batch", and when one worker's part runs out the others stop too (at most one batch per worker of
  rows dropped at the end, as drop_last would). Bad-row statistics of all workers are gathered at the end of an
  epoch (and every 100 steps for the early check), so the bad-row rule is global: no worker fails alone and
  leaves the others waiting. A checkpoint's data position is the rows any worker consumed
  (`checkpointing.merge_positions`); a restart shares out the rest anew, whatever the world size was.
* Validation after every epoch is sharded: every rank predicts every `world`-th row of the validation rows
  through `OFAPredictor` (EMA weights when enabled), in the training's precision and memory format; rank 0
  gathers the prediction records, puts them back in row order and scores them all together, so the corpus
  metric is exactly the one rank 0 alone would compute on the same rows (`_validate`). Rank 0 logs per-step
  and per-epoch metrics to MLflow and writes the checkpoint (`pipelines.train.checkpointing`); every rank
  reports it. The epoch's report carries `epoch_done`: a Ray Train callback (Tune's, `tune.trial`) hears epochs
  from it, once the checkpoint is uploaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist

from ofa_model.config_files import build
from ofa_model.evaluation import evaluate_records, predict_records
from ofa_model.precision import Execution
from ofa_model.predictor import OFAPredictor
from pipelines.data.batches import BatchIterator, ConsumerOptions
from pipelines.data.dataset import epoch_batches, epoch_plans, read_manifests
from pipelines.data.rowstats import BadRowRule, RowStats
from pipelines.data.shards import Manifest, iter_rows
from pipelines.data.source import EpochPlan
from pipelines.progress import Progress
from pipelines.tracking.runs import MetricLogger, system_metrics
from pipelines.train.checkpointing import (
    epoch_started,
    merge_positions,
    published_weights,
    report_checkpoint,
    resume_state,
    rng_state,
    save_training_bundle,
    set_rng_state,
    worker_resume,
)
from pipelines.train.optim import Ema, build_optimizer, build_scheduler, freeze, move_schedule
from pipelines.train.setup import Setup, build_setup
from pipelines.train.step import Learner, forward_loss, optimizer_step, scst_setup
from pipelines.train.train_config import TrainConfig

logger = logging.getLogger(__name__)

EARLY_CHECK_EVERY = 100  # steps between global early bad-row checks


@dataclass(frozen=True)
class Worker:
    """Where this process trains: its rank of `world`, device and precision, and rank 0's MLflow logger."""

    rank: int
    world: int
    device: torch.device
    execution: Execution
    mlflow: MetricLogger | None  # rank 0 only

    def to_device(self, batch: dict) -> dict:
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch["patch_images"] = self.execution.images(batch.get("patch_images"))
        return batch


@dataclass(frozen=True)
class Run:
    """What every epoch of this fit reads and never changes."""

    cfg: TrainConfig
    setup: Setup
    worker: Worker
    per_epoch: int  # optimizer updates in an epoch (the schedule and the ETA)
    fingerprint: str  # the data's, recorded in every bundle
    pools: dict[str, tuple[str, ...]]  # the derived tasks' negative pools by corpus (the driver's, read once)
    scst: tuple | None  # self-critical training's references and CIDEr-D (`scst_setup`), read once
    deadline: float | None = None  # time.time() by which the run should end (`run.time_budget_s`)
    validation_rows: int = 0  # rows of the validated task in the validation split (the budget's estimate)
    last_validation: dict = field(default_factory=dict)  # the latest validation's seconds and rows (rank 0)


def train_loop(loop_config: dict) -> None:
    """The Ray Train worker function: trains the run's epochs up to `cfg.epochs` from its latest checkpoint,
    which a restart finds further on."""
    cfg = build(TrainConfig, loop_config["cfg"], "train_loop_config")
    end = cfg.epochs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_flush_denormal(True)  # denormal activations slow CPU matmuls after some updates (bench/model.py)
    torch.set_num_threads(cfg.scaling.threads)  # the CPUs this worker reserved, not every core of the node
    state = resume_state(cfg)
    start = epoch_started(state)
    if start >= end:
        logger.info("all %d epochs are done (checkpoint at epoch %d, step %d)", end, state["epoch"] + 1,
                    state["step"])
        ray.train.report({"epoch": end - 1, "step": state["step"], **state["metrics"], "epoch_done": False})
        return
    worker = _join(cfg, loop_config["mlflow_run_id"])
    # rank 0 samples its machine for MLflow (system/...), from the model's setup to the fit's end; its metrics
    # go in the background, and the fit's end waits for them (up to tracking.server_wait_s, then warns)
    with metrics_delivered(worker.mlflow), system_metrics(cfg.tracking.tracking_uri, loop_config["mlflow_run_id"],
                                                   cfg.tracking.system_metrics_every_s if worker.rank == 0 else 0):
        torch.manual_seed(cfg.seed)
        setup = build_setup(cfg)
        manifests = read_manifests(cfg.data, cfg.mixture)  # once per fit: every epoch plans from them
        plans = _plans(cfg, start, manifests)
        rows = {n: p.info.total_rows for n, p in plans.items()}
        per_epoch = steps_per_epoch(cfg, rows, worker.world)
        saved_world = state["world_size"] if state is not None else worker.world
        learner, frozen = _learner(cfg, setup, worker, state, per_epoch * cfg.epochs,
                                   steps_per_epoch(cfg, rows, saved_world) * cfg.epochs)
        run = Run(cfg, setup, worker, per_epoch, loop_config["data_fingerprint"],
                  loop_config["negative_pools"], scst_setup(cfg) if cfg.scst.enabled else None,
                  loop_config.get("deadline"), _validation_split_rows(cfg, manifests))
        if worker.rank == 0:
            logger.info("%d worker(s), %s: ~%d updates/epoch, %d in all; %s frozen; init %s; starting at step %d",
                        worker.world, worker.execution.describe(), per_epoch, per_epoch * cfg.epochs,
                        frozen or "nothing", setup.init, learner.step)
            if saved_world != worker.world:
                logger.warning("world size changed from %d to %d worker(s) at step %d (scaling.min_workers=%d, "
                               "num_workers=%d): the rows left of epoch %d are shared out among %d, the schedule "
                               "goes on from the same share of the run", saved_world, worker.world, learner.step,
                               cfg.scaling.least_workers, cfg.scaling.num_workers, start + 1, worker.world)
            worker.mlflow.log({"train/world_size": worker.world}, learner.step)
        for epoch in range(start, end):
            if _train_epoch(run, learner, epoch, plans if epoch == start else _plans(cfg, epoch, manifests), state):
                break


def _join(cfg: TrainConfig, mlflow_run_id: str) -> Worker:
    """This worker's place in the group. Each worker tags the MLflow run with its node (`train.worker.<rank>.node`);
    rank 0 tags it with the group's nodes and settings."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    execution = Execution.resolve(cfg.run.precision, cfg.run.memory_format, device)
    node = ray.get_runtime_context().get_node_id()
    # every worker reaches the run itself (its settings came with the job, not from its node's shell)
    mlflow = MetricLogger(cfg.tracking.tracking_uri, mlflow_run_id, background=True,
                          deadline_s=cfg.tracking.server_wait_s)
    mlflow.set_tags({f"train.worker.{rank}.node": node})
    if rank != 0:
        mlflow.close()
        mlflow = None
    nodes = _all_gather(node, world)
    if mlflow is not None:
        mlflow.set_tags({"train.nodes": ",".join(nodes), "train.world_size": world, "train.device": device,
                         "train.precision": execution.precision, "train.memory_format": execution.memory_format,
                         "train.threads": torch.get_num_threads()})
    return Worker(rank, world, device, execution, mlflow)


@contextlib.contextmanager
def metrics_delivered(mlflow: MetricLogger | None) -> Iterator[None]:
    """Rank 0's buffered metrics sent as the block ends: waiting for the server when it ends well, at once
    (what is left counted as dropped) when it raises."""
    try:
        yield
    except BaseException:
        if mlflow is not None:
            mlflow.close(0)
        raise
    if mlflow is not None:
        mlflow.close()


def _learner(cfg: TrainConfig, setup: Setup, worker: Worker, state: dict | None, total_updates: int,
             saved_total: int) -> tuple[Learner, int]:
    """The model prepared for this worker (frozen parts, checkpoint weights, precision, DDP) with its optimizer,
    schedule over `total_updates`, EMA and grad scaler, from `state` when resuming; and how many parameters
    are frozen.

    A checkpoint written by another world size (`saved_total`: the updates its world planned) goes on as
    follows: the optimizer, EMA and weights as saved (the same on every rank); the schedule at the same share of
    the run, so the rate goes on where it was (an update of another world trains on another number of rows);
    rank r takes the RNG state of saved rank r mod the saved world (rank 0 its own; a fresh run seeds every
    rank alike too)."""
    model = setup.model
    frozen = len(freeze(model, cfg.optim))
    if state is not None:
        model.load_state_dict(state["model"])
    model = worker.execution.prepare_model(model)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    raw = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(raw, cfg.optim)
    learner = Learner(model, raw, optimizer, build_scheduler(optimizer, cfg.optim, total_updates),
                      Ema(raw, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None,
                      torch.amp.GradScaler(worker.device.type, enabled=worker.execution.precision == "fp16"))
    if state is not None:
        learner.load_state_dict(state)
        if saved_total != total_updates:
            move_schedule(learner.scheduler, round(learner.scheduler.last_epoch * total_updates / saved_total))
        set_rng_state(state["rng"][worker.rank % len(state["rng"])])
        if worker.mlflow is not None:  # a restart shows in the run, not only in logs
            worker.mlflow.log({"train/resumed_from_step": learner.step}, learner.step)
    return learner, frozen


def _train_epoch(run: Run, learner: Learner, epoch: int, plans: Mapping[str, EpochPlan], state: dict | None) -> bool:
    """One epoch (from `state`'s data position when it stopped inside this epoch), then `_end_epoch`; whether it
    was the run's last (its last epoch, or the time budget left no room for another)."""
    cfg, worker = run.cfg, run.worker
    started = time.time()
    resuming = state is not None and state["epoch"] == epoch and not state["epoch_done"]
    first_step = state["step_at_epoch_start"] if resuming else learner.step
    if worker.rank == 0:
        logger.info("epoch %d/%d: %d rows", epoch + 1, cfg.epochs, sum(p.info.total_rows for p in plans.values()))
    batches = _batches(run, plans, worker_resume(state, epoch, worker.rank))
    meter = _Meter(f"train epoch {epoch + 1}/{cfg.epochs}", cfg.run.log_every_s, run.per_epoch * cfg.epochs,
                   run.per_epoch, learner.step)
    learner.model.train()
    learner.optimizer.zero_grad(set_to_none=True)  # an epoch's updates start clean, as a fit of it alone would
    for micro, batch in enumerate(_together(batches, worker, learner, first_step, cfg.max_steps_per_epoch), 1):
        sync = micro % cfg.optim.grad_accum == 0
        with _no_sync(learner.model, worker.world, sync):
            out = forward_loss(cfg, learner, worker.execution, run.setup.vocab, run.setup.specs, batch, run.scst)
            learner.scaler.scale(out.loss / max(1, out.ntokens) / cfg.optim.grad_accum).backward()
        meter.add(out, batch)
        if sync:
            grad_norm = optimizer_step(learner, cfg.optim.clip_norm)
            _after_update(run, learner, batches, epoch, first_step, meter, grad_norm)
    last = epoch + 1 == cfg.epochs or _out_of_time(run, time.time() - started)
    _end_epoch(run, learner, batches, epoch, first_step, last=last)
    return last


def _out_of_time(run: Run, train_s: float) -> bool:
    """Whether another epoch would end past the run's deadline (rank 0 decides for all): this epoch's validation,
    then one more epoch of `train_s` (+5%) and its validation, the whole split's when validation.full_at_end. The
    validation times are the latest measured (none before the first validation)."""
    if run.deadline is None:
        return False
    stop = False
    if run.worker.rank == 0:
        val_s, val_rows = run.last_validation.get("seconds", 0.0), run.last_validation.get("rows", 0.0)
        full_s = val_s * run.validation_rows / val_rows if run.cfg.validation.full_at_end and val_rows else val_s
        ends = time.time() + val_s + 1.05 * train_s + full_s
        stop = ends > run.deadline
        if stop:
            logger.info("time budget: one more epoch would end %.0f s past the deadline (training %.0f s, "
                        "validation %.0f s, the last one %.0f s): this epoch is the last", ends - run.deadline,
                        train_s, val_s, full_s)
    return bool(_all_gather(stop, run.worker.world)[0])


def _validation_split_rows(cfg: TrainConfig, manifests: Mapping[str, Manifest]) -> int:
    """Rows of the validated task in the validation split, from its corpus's manifest (0 when not read)."""
    uri = cfg.data.sources[cfg.task].uri if cfg.task in cfg.data.sources else cfg.data.uri
    manifest = manifests.get(uri)
    return manifest.counts.get(cfg.validation.split, {}).get(cfg.task, 0) if manifest is not None else 0


def _batches(run: Run, plans: Mapping[str, EpochPlan], resume) -> BatchIterator:
    """This worker's part of the epoch's batches; the bad-row rule is applied across workers (`_bad_row_rule`)."""
    cfg = run.cfg
    return epoch_batches(cfg.data, run.setup.vocab, train=True, mixture=cfg.mixture, plans=plans,
                         part=(run.worker.rank, run.worker.world), resume=resume, specs=run.setup.specs,
                         options=ConsumerOptions.of(cfg.data).without_rule(),
                         pools=run.pools,
                         # row ids: the rewards need each row's references; a mixture, each row's task
                         with_meta=bool(cfg.scst.enabled or cfg.mixture))


def _together(batches: BatchIterator, worker: Worker, learner: Learner, first_step: int,
              max_steps: int | None) -> Iterator[dict]:
    """The batches on this worker's device, while every worker has one and the epoch has steps left."""
    it = iter(batches)
    try:
        while max_steps is None or learner.step - first_step < max_steps:
            batch = next(it, None)
            if not _all_have(batch is not None, worker.world, worker.device):
                return
            yield worker.to_device(batch)
    finally:
        it.close()


def _no_sync(model: torch.nn.Module, world: int, sync: bool):
    """DDP's gradient all-reduce only on the micro-batch that updates."""
    return model.no_sync() if world > 1 and not sync else contextlib.nullcontext()


def _after_update(run: Run, learner: Learner, batches: BatchIterator, epoch: int, first_step: int,
                  meter: _Meter, grad_norm: float) -> None:
    """The global early bad-row check, progress (log and MLflow, rank 0) and the mid-epoch checkpoint."""
    cfg, worker, step = run.cfg, run.worker, learner.step
    if step % EARLY_CHECK_EVERY == 0:
        _bad_row_rule(cfg).check(_merged_stats(batches.stats, worker.world),
                                 sum(s.total_rows or 0 for s in batches.streams.values()), finished=False)
    if meter.due() and worker.rank == 0:
        lr = learner.scheduler.get_last_lr()[0]
        m = meter.metrics(step - first_step, step, worker.world, lr)
        m.update({"train/lr": lr, "train/grad_norm": grad_norm, "train/epoch": epoch})
        worker.mlflow.log(m, step)
    if cfg.run.checkpoint_every_steps and step % cfg.run.checkpoint_every_steps == 0:
        _checkpoint(run, learner, batches, epoch, first_step, done=False,
                    metrics={**learner.metrics, "epoch_done": False})


def _end_epoch(run: Run, learner: Learner, batches: BatchIterator, epoch: int, first_step: int, *,
               last: bool) -> None:
    """The global end-of-epoch bad-row check, validation (the last epoch's on the whole split when
    validation.full_at_end) and metrics (rank 0), the epoch's checkpoint."""
    cfg, worker, step = run.cfg, run.worker, learner.step
    stats = _merged_stats(batches.stats, worker.world)
    _bad_row_rule(cfg).check(stats, None, finished=True)
    metrics = {"epoch": epoch, "step": step, "data/rows_ok": stats.ok, "data/rows_bad": stats.bad,
               "train/world_size": worker.world}
    validated = _validate(run, learner, last_epoch=last)  # every rank: its share of the rows
    if worker.rank == 0:
        metrics.update(validated)
        run.last_validation.update(seconds=validated.get("val/seconds", 0.0), rows=validated.get("val/rows", 0.0))
        if last and epoch + 1 < cfg.epochs:
            metrics["train/stopped_by_budget"] = 1.0
        logger.info("epoch %d done at step %d: %s", epoch + 1, step,
                    ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        worker.mlflow.log({k: v for k, v in metrics.items() if k != "epoch"}, step)
    metrics = _all_gather(metrics, worker.world)[0]  # every rank reports rank 0's metrics
    _checkpoint(run, learner, batches, epoch, first_step, done=True, metrics={**metrics, "epoch_done": True})
    learner.metrics = {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def _checkpoint(run: Run, learner: Learner, batches: BatchIterator, epoch: int, first_step: int, *, done: bool,
                metrics: dict) -> None:
    """A checkpoint of everything a restart needs (rank 0 writes it; every rank reports)."""
    cfg, worker, step = run.cfg, run.worker, learner.step
    positions = _all_gather(batches.resume_state(), worker.world)
    rngs = _all_gather(rng_state(), worker.world)
    if worker.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "epoch_done"}
    state = {**learner.state_dict(), "epoch": epoch, "epoch_done": done, "step_at_epoch_start": first_step,
             "rng": rngs, "world_size": worker.world, "metrics": numbers,
             "data": None if done else merge_positions(positions, bool(cfg.mixture))}
    report_checkpoint(state, metrics, lambda path: save_training_bundle(
        cfg, run.setup, learner.raw, learner.ema, path, epoch=epoch, step=step, metrics=numbers,
        fingerprint=run.fingerprint), storage_path=cfg.run.storage_path, name=cfg.run.name)


def _validate(run: Run, learner: Learner, *, last_epoch: bool) -> dict[str, float]:
    """The task metric on the validation rows, through the inference path (EMA weights when enabled), in the
    training's precision and memory format (the one `run.precision` switch). Every rank calls it: rank r predicts
    rows r, r + world, r + 2 world, ... of `validation_rows`; rank 0 gathers the records, restores the row order
    and scores them together (the metrics, with `val/seconds`, the whole validation's wall time); the other ranks
    return {}. Each rank reads the whole row stream and skips the others' rows: the reading is cheap beside the
    prediction it shares out."""
    cfg, raw, worker = run.cfg, learner.raw, run.worker
    was_training = raw.training
    t0 = time.perf_counter()
    predictor = OFAPredictor(published_weights(raw, learner.ema), run.setup.vocab, cfg.data.preprocess,
                             device=worker.execution.device, tasks=run.setup.specs,
                             max_batch_size=cfg.validation.batch_size, precision=worker.execution.precision,
                             memory_format=worker.execution.memory_format, answer_sets=cfg.answer_sets())
    spec = predictor.tasks[cfg.task]
    try:  # rows stream through the predictor chunk by chunk: a large validation split is never held whole
        rows = validation_rows(cfg, None if last_epoch and cfg.validation.full_at_end else cfg.validation.max_rows)
        mine = itertools.islice(rows, worker.rank, None, worker.world)
        # no candidates per row: the predictor scores the run's answer set, as a saved bundle's predictor will
        records = predict_records(predictor, spec, mine, mode=cfg.validation.mode)
    finally:
        raw.train(was_training)
        del predictor
        _release_memory()
    parts = _all_gather(records, worker.world)  # small dicts: id, prediction, reference
    if worker.rank != 0:
        return {}
    result = evaluate_records(spec, in_row_order(parts))
    return {**{f"val/{k}": v for k, v in result.metrics.items()}, "val/seconds": time.perf_counter() - t0}


def in_row_order(parts: Sequence[Sequence[dict]]) -> list[dict]:
    """Records predicted round-robin (rank r's k-th record is row k * len(parts) + r) back in row order."""
    return [rec for round_ in itertools.zip_longest(*parts) for rec in round_ if rec is not None]


def _release_memory() -> None:
    """After validation, inside a fit that trains on: collect its garbage and hand freed heap back to the OS
    (glibc's malloc_trim, where there is one), so the next epoch's allocations do not run on a fragmented heap."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def validation_rows(cfg: TrainConfig, max_rows: int | None) -> Iterator[dict]:
    """The validated task's rows of the validation split, from the task's own corpus in a mixture."""
    uri = cfg.data.sources[cfg.task].uri if cfg.task in cfg.data.sources else cfg.data.uri
    rows = iter_rows(uri, s3=cfg.data.s3, splits=[cfg.validation.split], tasks=[cfg.task])
    return itertools.islice(rows, max_rows)


def steps_per_epoch(cfg: TrainConfig, rows: Mapping[str, int], world: int) -> int:
    """Optimizer updates in an epoch on `world` workers (for the schedule and the ETA), from the rows of each
    dataset (task -> rows). A mixture's epoch ends when its first source runs out: source n, drawn at its
    weight's share w_n / W of the slots, lasts rows_n * W / w_n rows of the mixture."""
    total = sum(rows.values())
    if cfg.mixture:
        weight = sum(cfg.mixture.values())
        total = min([total, *(rows.get(n, 0) * weight / w for n, w in cfg.mixture.items())])
    n = max(1, int(total) // (cfg.data.batch_size * world * cfg.optim.grad_accum))
    return min(n, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else n


def _plans(cfg: TrainConfig, epoch: int, manifests: Mapping[str, Manifest]) -> dict[str, EpochPlan]:
    return epoch_plans(cfg.data, cfg.mixture, train=True, epoch=epoch, manifests=manifests)


def _bad_row_rule(cfg: TrainConfig) -> BadRowRule:
    return ConsumerOptions.of(cfg.data).rule


# =============================================================================================================
# Collectives and progress


def _all_gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _all_have(flag: bool, world: int, device: torch.device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _merged_stats(stats: RowStats, world: int) -> RowStats:
    total = RowStats()
    for d in _all_gather(stats.to_dict(), world):
        total.merge(RowStats.from_dict(d))
    return total


class _Meter:
    """The running sums of the loss between two progress lines, and the run's progress through the one progress
    helper (`pipelines.progress`): rate since this epoch's start, ETA of the epoch and of the run."""

    def __init__(self, label: str, every_s: float, steps_total: int, steps_epoch: int, step: int) -> None:
        self.progress = Progress(label, steps_total, every_s, unit="steps", start=step,
                                 extra_rates={"samples": "samples"}, logger=logger)
        self.steps_epoch = steps_epoch
        self.sums: dict[str, float] = {}
        self.samples = 0

    def due(self) -> bool:
        return self.progress.clock() - self.progress.last >= self.progress.every_s

    def add(self, out: Any, batch: dict) -> None:
        for key, value in (("loss", float(out.loss.detach())),
                           ("nll", float(getattr(out, "nll", out.loss).detach())),
                           ("tokens", out.ntokens), ("batches", 1), ("reward", getattr(out, "mean_reward", None))):
            if value is not None:
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.samples += int(batch["src_tokens"].shape[0])

    def metrics(self, step_in_epoch: int, step: int, world: int, lr: float) -> dict[str, float]:
        """Logs the progress line and returns the MLflow metrics since the last call (loss per token, rate, ETA);
        the sums start again."""
        sums, self.sums = self.sums, {}
        tokens = max(1, sums.get("tokens", 0))
        loss = sums.get("loss", 0.0) / tokens
        f = self.progress.update(step, extra={"loss": round(loss, 4), "lr": float(f"{lr:.3g}"),
                                              "samples": self.samples}, force=True)
        rate = f["rate"]
        m = {"train/loss": loss, "train/nll": sums.get("nll", 0.0) / tokens,
             "train/samples_per_s": f["samples_per_s"] * world, "train/steps_per_s": rate,
             "train/eta_epoch_s": max(0, self.steps_epoch - step_in_epoch) / rate if rate > 0 else math.nan,
             "train/eta_run_s": f.get("eta_s", math.nan) if rate > 0 else math.nan}
        if "percent" in f:  # the run's share done
            m["progress/fraction"] = f["percent"] / 100
        if "reward" in sums:
            m["train/scst_reward"] = sums["reward"] / max(1, sums["batches"])
        return m
