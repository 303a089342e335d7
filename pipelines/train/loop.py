"""Pretraining and fine-tuning on Ray Train (V2 `TorchTrainer`), tracked in MLflow.

    outcome = train(load_config(TrainConfig, "configs/finetune/vqa.yaml", overrides))

Epochs meet Ray Train like this (the decision):

* Several workers: one `TorchTrainer.fit()` per epoch, all under the same run (`run.name` +
  `run.storage_path`). Ray Train takes its datasets once per fit, and one `build_dataset(..., epoch=e)` is one
  epoch with its own seeded shard order, so each fit gets the epoch's Dataset, split across the workers
  (`streaming_split`). Each fit finds the run's snapshot in storage, so `ray.train.get_checkpoint()` is the
  latest checkpoint of the run and the best-N bookkeeping (`CheckpointConfig`) spans epochs. A fit costs a
  worker-group start, small against real epochs.
* One worker: one fit for all the remaining epochs. The worker builds and runs each epoch's Datasets itself
  (the same `build_dataset`, from the checkpoint's data position), which spares the run a SplitCoordinator per
  dataset and Ray Train's dataset manager per epoch, and a worker-group start and model build per epoch
  (process starts of seconds of CPU each: ~20 s an epoch on 2 cores).
* A checkpoint (rank 0 writes it) holds the model, optimizer, scheduler, EMA, step, epoch, every rank's RNG
  state, and the data position: the `ResumeState`s of all workers merged (rows any worker consumed). Every
  restart (a worker failure inside a fit, or the job rerun with the same name) continues from it: the
  dataset's source skips the consumed rows, and the workers skip them too (the rows of a Dataset built before
  the state was known). So a resumed run continues mid-epoch where it stopped, and its loss curve continues.
* The driver finds where a run stands from the newest `train_state.json` among the run's checkpoint
  directories (our file, not Ray's internal snapshot), and starts at that epoch.
* Workers end an epoch together: each step all-reduces "I have a batch"; when one worker's share runs out the
  others stop too (at most one batch per worker of rows dropped at the end, as drop_last would). Bad-row
  statistics of all workers are gathered at the end of an epoch (and every 100 steps for the early check),
  so the bad-row rule is global: no worker fails alone and leaves the others waiting.

Rank 0 validates after every epoch through `OFAPredictor` (EMA weights when enabled), writes the bundle (with
the preprocessing it trained with, its task and custom tasks, the data fingerprint), logs per-step and
per-epoch metrics to MLflow. The driver logs the best bundle as an artifact and registers it; the `champion`
alias moves only on improvement (`pipelines.tracking.registry`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import io
import itertools
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ofa_model import OFAModel
from ofa_model.checkpoint import load_bundle, load_bundle_vocab, save_bundle
from ofa_model.config_files import build, flatten, to_dict
from ofa_model.evaluation import evaluate_rows, primary_metric
from ofa_model.losses import (
    allowed_columns,
    answer_columns,
    label_smoothed_nll,
    mixture_constraints,
    target_constraints,
)
from ofa_model.precision import Execution
from ofa_model.predictor import OFAPredictor
from ofa_model.scst import CiderD, scst_loss
from ofa_model.tasks import TASKS, TaskSpec, parse_instruction
from ofa_model.vocab import Vocabulary
from pipelines import storage
from pipelines.data.batches import iter_mixture_batches, iter_train_batches, iterator_options
from pipelines.data.ingest import build_dataset, plan_epoch
from pipelines.data.rowstats import BadRowRule, MixtureState, ResumeState, RowStats
from pipelines.data.shards import Manifest, iter_rows, read_manifest
from pipelines.tracking.registry import promote_if_better, register_bundle, resolve_model
from pipelines.tracking.runs import MetricLogger, end_run, run_key, start_or_resume_run
from pipelines.train.optim import Ema, build_optimizer, build_scheduler, freeze
from pipelines.train.train_config import TrainConfig

logger = logging.getLogger(__name__)

STATE_FILE, STATE_JSON, BUNDLE_DIR = "train_state.pt", "train_state.json", "bundle"
EARLY_CHECK_EVERY = 100  # steps between global early bad-row checks


# =============================================================================================================
# What a run trains: model, vocabulary, preprocessing, tasks


@dataclass
class Setup:
    model: OFAModel
    vocab: Vocabulary
    specs: dict[str, TaskSpec]
    init: str  # where the weights came from ("scratch:<arch>" or the bundle/URI)


def task_specs(cfg: TrainConfig) -> dict[str, TaskSpec]:
    """Built-in tasks plus the config's custom ones (which may not replace a built-in name)."""
    specs = dict(TASKS)
    for name, line in cfg.custom_tasks.items():
        if name in TASKS:
            raise ValueError(f"custom_tasks.{name}: a custom task cannot replace the built-in task {name!r}")
        specs[name] = parse_instruction(line, name)
    names = [cfg.task] + list(cfg.mixture or {})
    unknown = sorted(n for n in names if n not in specs)
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(specs)}")
    return specs


def build_setup(cfg: TrainConfig) -> Setup:
    """The model to train (training-mode regularisation), from the init bundle or from scratch."""
    reg = cfg.model.regularization
    if cfg.model.init:
        bundle = load_bundle(resolve_model(cfg.model.init, tracking=cfg.tracking.tracking_uri).path)
        model = OFAModel(bundle.config, reg)
        model.load_state_dict(bundle.model.state_dict())
        vocab, init = bundle.vocab, cfg.model.init
    else:
        vocab = Vocabulary.gpt2()
        arch = cfg.model.architecture(vocab_size=len(vocab), pad_id=vocab.pad_id)
        model = OFAModel(arch, reg)
        init = f"scratch:{arch.name}"
    return Setup(model, vocab, task_specs(cfg), init)


# =============================================================================================================
# Checkpoints


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))


def read_state(path: str | Path, s3=None) -> dict:
    """A checkpoint's training state, from a local directory or a storage URI (weights_only: no code runs)."""
    path = str(path)
    if "://" in path:
        return torch.load(io.BytesIO(storage.read_bytes(storage.join(path, STATE_FILE), s3)), map_location="cpu",
                          weights_only=True)
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def _resume_state(cfg: TrainConfig) -> dict | None:
    """The newest of Ray's latest registered checkpoint and the newest checkpoint in storage.

    Ray registers a reported checkpoint a moment after it is uploaded; a worker killed in between restarts with
    the previous one from `get_checkpoint()`, while the newer one is already complete in storage."""
    state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = read_state(d)
    summary = latest_state_summary(cfg.run.storage_path, cfg.run.name)
    if summary is not None and (state is None or (summary["step"], summary["epoch_done"]) >
                                (state["step"], state["epoch_done"])):
        try:
            state = read_state(summary["path"], cfg.data.s3)
        except (OSError, RuntimeError, EOFError, ValueError) as exc:  # still being uploaded, or half deleted
            logger.warning("checkpoint %s not readable yet (%s); using Ray's latest", summary["path"], exc)
    return state


def latest_state_summary(storage_path: str, name: str) -> dict | None:
    """The newest `train_state.json` (by step) among the run's checkpoint directories that also hold their
    `train_state.pt` (an upload cut short leaves the summary without the state), with its "path"."""
    run_dir = storage.join(storage_path, name)
    try:
        files = storage.list_files(run_dir, suffix=STATE_JSON)
        complete = {uri.rsplit("/", 1)[0] for uri in storage.list_files(run_dir, suffix=STATE_FILE)}
    except (FileNotFoundError, OSError):
        return None
    best = None
    for uri in files:
        if uri.rsplit("/", 1)[0] not in complete:
            continue
        try:
            summary = json.loads(storage.read_bytes(uri))
        except (OSError, ValueError):
            continue  # a checkpoint being written or half deleted
        summary["path"] = uri.rsplit("/", 1)[0]
        if best is None or (summary["step"], summary["epoch_done"]) > (best["step"], best["epoch_done"]):
            best = summary
    return best


# =============================================================================================================
# The worker loop


@dataclass
class _Progress:
    """Rate and ETA for the log and MLflow (per worker; rank 0 logs)."""

    every_s: float
    steps_total: int
    steps_epoch: int
    t0: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    samples: int = 0
    steps: int = 0

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every_s

    def rates(self, step_in_epoch: int, step: int) -> dict[str, float]:
        dt = max(1e-9, time.monotonic() - self.t0)
        sps = self.steps / dt
        self.last = time.monotonic()
        return {"samples_per_s": self.samples / dt, "steps_per_s": sps,
                "eta_epoch_s": max(0, self.steps_epoch - step_in_epoch) / sps if sps else math.nan,
                "eta_run_s": max(0, self.steps_total - step) / sps if sps else math.nan}


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


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


def _worker_resume(state: dict | None, epoch: int, rank: int) -> ResumeState | MixtureState | None:
    """This worker's share of the saved data position: rows consumed by any worker; counts on rank 0 only (the
    end-of-epoch merge would count them once per worker otherwise)."""
    if not state or state["epoch"] != epoch or state["epoch_done"] or state["data"] is None:
        return None
    data = state["data"]
    if data["kind"] == "mixture":
        sources = {}
        for name, d in data["sources"].items():
            s = ResumeState.from_dict(d)
            sources[name] = s if rank == 0 else ResumeState(s.epoch, s.plan_key, s.consumed, RowStats().to_dict())
        return MixtureState(data["slots"], sources)
    s = ResumeState.from_dict(data["state"])
    return s if rank == 0 else ResumeState(s.epoch, s.plan_key, s.consumed, RowStats().to_dict())


def _merge_positions(positions: list, mixture: bool) -> dict:
    if not mixture:
        return {"kind": "single", "state": ResumeState.merge(positions).to_dict()}
    names = positions[0].sources.keys()
    return {"kind": "mixture", "slots": max(p.slots for p in positions),
            "sources": {n: ResumeState.merge([p.sources[n] for p in positions]).to_dict() for n in names}}


@dataclass
class _Run:
    """What a worker's epochs share: the config, the model and its optimizer state, the step counter."""

    cfg: TrainConfig
    loop_config: dict
    setup: Setup
    model: torch.nn.Module  # DDP-wrapped on several workers
    raw: OFAModel
    execution: Execution
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Ema | None
    scaler: torch.amp.GradScaler
    device: torch.device
    rank: int
    world: int
    mlflow: MetricLogger | None  # rank 0 only
    frozen: int
    per_epoch: int
    total_updates: int
    step: int
    last_metrics: dict  # the latest epoch's metrics: mid-epoch checkpoints carry them (for the best-N choice)
    scst: tuple | None  # self-critical training's references and CIDEr-D (`_scst_setup`), read once


def train_loop(loop_config: dict) -> None:
    """The Ray Train worker function: trains epochs `loop_config["epoch"]` up to `loop_config["end_epoch"]`
    (exclusive; default: that one epoch) from the run's latest checkpoint, which a restart finds further on."""
    cfg = build(TrainConfig, loop_config["cfg"], "train_loop_config")
    first = int(loop_config["epoch"])
    end = int(loop_config.get("end_epoch", first + 1))
    if end - first > 1 and not _worker_builds_datasets(cfg):
        raise ValueError(f"epochs {first + 1}-{end} in one fit: only a one-worker run builds each epoch's Datasets "
                         "itself; workers sharing the driver's Dataset run one fit per epoch")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_flush_denormal(True)  # denormal activations slow CPU matmuls after some updates (bench/model.py)
    torch.set_num_threads(cfg.scaling.threads)  # the CPUs this worker reserved, not every core of the node

    state = _resume_state(cfg)
    start = first if state is None else max(first, state["epoch"] + (1 if state["epoch_done"] else 0))
    if start >= end:
        logger.info("epochs %d-%d are already done (checkpoint at epoch %d, step %d)", first + 1, end,
                    state["epoch"] + 1, state["step"])
        ray.train.report({"epoch": end - 1, "step": state["step"], **state["metrics"]})
        return

    torch.manual_seed(cfg.seed)
    setup = build_setup(cfg)
    model = setup.model
    frozen = freeze(model, cfg.optim)
    if state is not None:
        model.load_state_dict(state["model"])
    execution = Execution.resolve(cfg.run.precision, cfg.run.memory_format, device)
    model = execution.prepare_model(model)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    raw = model.module if hasattr(model, "module") else model

    manifest = read_manifest(cfg.data.uri, s3=cfg.data.s3)  # once per fit: every epoch plans from it
    plans = _plans(cfg, start, manifest)
    per_epoch = steps_per_epoch(cfg, {n: p.info.total_rows for n, p in plans.items()}, world)
    total_updates = per_epoch * cfg.epochs
    optimizer = build_optimizer(raw, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_updates)
    ema = Ema(raw, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    scaler = torch.amp.GradScaler(device.type, enabled=execution.precision == "fp16")
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        step = int(state["step"])
        rng = state["rng"]
        if len(rng) == world:
            _set_rng_state(rng[rank])
    mlflow = MetricLogger(cfg.tracking.tracking_uri, loop_config["mlflow_run_id"]) if rank == 0 else None
    nodes = _all_gather(ray.get_runtime_context().get_node_id(), world)
    if rank == 0:
        mlflow.set_tags({"train.nodes": ",".join(nodes), "train.world_size": world, "train.device": device,
                         "train.precision": execution.precision, "train.memory_format": execution.memory_format,
                         "train.threads": torch.get_num_threads()})
        if state is not None:
            mlflow.log({"train/resumed_from_step": step}, step)  # a restart shows in the run, not only in logs
    run = _Run(cfg, loop_config, setup, model, raw, execution, optimizer, scheduler, ema, scaler, device, rank,
               world, mlflow, len(frozen), per_epoch, total_updates, step, _last_metrics(state),
               _scst_setup(cfg) if cfg.scst.enabled else None)
    for epoch in range(start, end):
        _train_epoch(run, epoch, plans if epoch == start else _plans(cfg, epoch, manifest), state)


def _train_epoch(run: _Run, epoch: int, plans: Mapping, state: dict | None) -> None:
    """One epoch (from `state`'s data position when it stopped inside this epoch), validation, checkpoint."""
    cfg, setup, model, raw, execution = run.cfg, run.setup, run.model, run.raw, run.execution
    optimizer, scheduler, ema, scaler = run.optimizer, run.scheduler, run.ema, run.scaler
    device, rank, world, mlflow, step = run.device, run.rank, run.world, run.mlflow, run.step
    vocab, specs = setup.vocab, setup.specs
    rows = sum(p.info.total_rows for p in plans.values())
    per_epoch, total_updates = run.per_epoch, run.total_updates
    resuming = state is not None and state["epoch"] == epoch and not state["epoch_done"]
    step_at_epoch_start = state["step_at_epoch_start"] if resuming else step
    if rank == 0:
        logger.info("epoch %d/%d on %d worker(s), %s: %d rows, ~%d updates/epoch, %d in all; %s frozen; "
                    "init %s; starting at step %d", epoch + 1, cfg.epochs, world, execution.describe(), rows,
                    per_epoch, total_updates, run.frozen or "nothing", setup.init, step)

    batches = _batches(cfg, vocab, specs, plans, _worker_resume(state, epoch, rank))
    progress = _Progress(cfg.run.log_every_s, total_updates, per_epoch)
    pad = vocab.pad_id
    scst = run.scst
    running = {"loss": 0.0, "nll": 0.0, "tokens": 0}
    model.train()
    optimizer.zero_grad(set_to_none=True)  # an epoch's updates start clean, as a fit of that epoch alone would
    it: Iterator = iter(batches)
    micro = 0
    epoch_steps_done = step - step_at_epoch_start
    while cfg.max_steps_per_epoch is None or epoch_steps_done < cfg.max_steps_per_epoch:
        batch = next(it, None)
        if not _all_have(batch is not None, world, device):
            break
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch["patch_images"] = execution.images(batch.get("patch_images"))
        code_masks = batch["code_masks"] if bool(batch["code_masks"].any()) else None
        sync = (micro + 1) % cfg.optim.grad_accum == 0
        ctx_sync = model.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
        with ctx_sync:
            with execution.autocast():
                if scst is not None:  # self-critical: CIDEr-D reward of the model's own hypotheses
                    refs, cider = scst
                    out = scst_loss(raw, batch, [refs[i] for i in batch["ids"]], cider, vocab,
                                    samples=cfg.scst.samples, sampling=cfg.scst.sampling,
                                    max_len_b=cfg.scst.max_len_b, no_repeat_ngram_size=cfg.scst.no_repeat_ngram_size,
                                    seed=cfg.seed + step, train_model=model)
                    running["reward"] = running.get("reward", 0.0) + out.mean_reward
                else:  # logits at the target positions only: the vocabulary projection dominates the step
                    hidden = model(batch["src_tokens"], batch.get("patch_images"), batch.get("patch_masks"),
                                   batch["prev_output_tokens"], code_masks, features_only=True)  # (B, T, D)
                    keep = batch["target"].ne(pad)  # (B, T)
                    # and, under a constraint, only at the columns it allows: the same loss and gradients
                    index, allowed, target = _loss_targets(cfg, vocab, specs, batch, keep, device)
                    logits = raw.decoder.project(hidden[keep], columns=index)  # (N, C|V)
            if scst is None:
                ratio = cfg.optim.drop_worst_ratio if step >= cfg.optim.drop_worst_after else 0.0
                weights = batch["target_weights"].unsqueeze(1).expand_as(keep)[keep].unsqueeze(0)  # (1, N)
                if allowed is not None and allowed.ndim == 2:
                    allowed = allowed.unsqueeze(0)  # (1, N, C|V)
                out = label_smoothed_nll(logits.unsqueeze(0), target.unsqueeze(0), pad_id=-1,  # no pad among them
                                         epsilon=cfg.optim.label_smoothing, weights=weights, allowed=allowed,
                                         drop_worst_ratio=ratio)
            scaler.scale(out.loss / max(1, out.ntokens) / cfg.optim.grad_accum).backward()
        running["loss"] += float(out.loss.detach())
        running["nll"] += float(getattr(out, "nll", out.loss).detach())
        running["tokens"] += out.ntokens
        running["batches"] = running.get("batches", 0) + 1
        progress.samples += int(batch["src_tokens"].shape[0])
        micro += 1
        if not sync:
            continue
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.optim.clip_norm if cfg.optim.clip_norm
                                                   else float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            ema.update(raw)
        step += 1
        epoch_steps_done += 1
        progress.steps += 1
        if step % EARLY_CHECK_EVERY == 0:
            _bad_row_rule(cfg).check(_merged_stats(batches.stats, world), rows, finished=False)
        if progress.due() and rank == 0:
            r = progress.rates(epoch_steps_done, step)
            tok = max(1, running["tokens"])
            m = {"train/loss": running["loss"] / tok, "train/nll": running["nll"] / tok,
                 "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                 "train/samples_per_s": r["samples_per_s"] * world, "train/eta_epoch_s": r["eta_epoch_s"],
                 "train/eta_run_s": r["eta_run_s"], "train/epoch": epoch}
            if "reward" in running:
                m["train/scst_reward"] = running["reward"] / max(1, running["batches"])
            logger.info("epoch %d step %d (%d/%d of the epoch) loss %.4f lr %.3g %.1f samples/s, ETA epoch %s, "
                        "run %s", epoch + 1, step, epoch_steps_done, per_epoch, m["train/loss"], m["train/lr"],
                        m["train/samples_per_s"], _duration(r["eta_epoch_s"]), _duration(r["eta_run_s"]))
            mlflow.log(m, step)
            running = {"loss": 0.0, "nll": 0.0, "tokens": 0}
        if cfg.run.checkpoint_every_steps and step % cfg.run.checkpoint_every_steps == 0:
            run.step = step
            _report(run, batches, epoch, step_at_epoch_start, done=False, metrics=run.last_metrics)
    if hasattr(it, "close"):
        it.close()

    stats = _merged_stats(batches.stats, world)
    _bad_row_rule(cfg).check(stats, None, finished=True)
    metrics = {"epoch": epoch, "step": step, "data/rows_ok": stats.ok, "data/rows_bad": stats.bad}
    if rank == 0:
        metrics.update(_validate(cfg, setup, raw, ema, execution, last_epoch=epoch + 1 == cfg.epochs))
        logger.info("epoch %d done at step %d: %s", epoch + 1, step,
                    ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        mlflow.log({k: v for k, v in metrics.items() if k != "epoch"}, step)
    metrics = _all_gather(metrics, world)[0]  # every rank reports rank 0's metrics
    run.step = step
    _report(run, batches, epoch, step_at_epoch_start, done=True, metrics=metrics)
    run.last_metrics = {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def _last_metrics(state: dict | None) -> dict:
    return dict(state["metrics"]) if state is not None else {}


def _bad_row_rule(cfg: TrainConfig) -> BadRowRule:
    return BadRowRule(cfg.data.bad_row_threshold, cfg.data.early_check_rows, cfg.data.early_factor)


def _plans(cfg: TrainConfig, epoch: int, manifest: Manifest) -> dict:
    names = sorted(cfg.mixture) if cfg.mixture else [cfg.task]
    return {n: plan_epoch(_data_for(cfg, n), train=True, epoch=epoch, manifest=manifest) for n in names}


def _data_for(cfg: TrainConfig, task: str):
    return cfg.data if not cfg.mixture else dataclasses.replace(cfg.data, tasks=(task,))


def _scst_setup(cfg: TrainConfig) -> tuple[dict[str, list[str]], CiderD]:
    """References of the training split's rows by id, and CIDEr-D with their document frequencies."""
    refs: dict[str, list[str]] = {}
    for row in iter_rows(cfg.data.uri, s3=cfg.data.s3, columns=["id", "target", "targets"],
                         splits=list(cfg.data.splits), tasks=[cfg.task]):
        captions = list(row["targets"] or []) or ([row["target"]] if row["target"] else [])
        if captions:
            refs[row["id"]] = captions
    if not refs:
        raise ValueError(f"scst: no references in {cfg.data.uri} for task {cfg.task} in {cfg.data.splits}")
    return refs, CiderD(refs.values())


def _worker_builds_datasets(cfg: TrainConfig) -> bool:
    """One worker runs its epoch's Datasets itself (see the module docstring); several share the driver's."""
    return cfg.scaling.num_workers == 1


def _batches(cfg: TrainConfig, vocab: Vocabulary, specs: Mapping[str, TaskSpec], plans: Mapping, resume):
    opts = {**iterator_options(cfg.data), "bad_row_threshold": None}  # the rule is applied globally
    if cfg.scst.enabled or cfg.mixture:
        opts["with_meta"] = True  # row ids: the rewards need each row's references; a mixture, each row's task
    if _worker_builds_datasets(cfg):  # the source skips what the run consumed already
        starts = resume.sources if isinstance(resume, MixtureState) else {n: resume for n in plans}
        data = {n: build_dataset(_data_for(cfg, n), vocab, train=True, specs=specs, plan=plan,
                                 resume=starts.get(n))
                for n, plan in plans.items()}
    else:
        data = {n: ray.train.get_dataset_shard(n) for n in plans}
    if cfg.mixture:
        return iter_mixture_batches(data, cfg.mixture, vocab, cfg.data.batch_size,
                                    infos={n: p.info for n, p in plans.items()}, resume=resume, **opts)
    (name, plan), = plans.items()
    return iter_train_batches(data[name], vocab, cfg.data.batch_size, info=plan.info, resume=resume, **opts)


def _loss_targets(cfg: TrainConfig, vocab: Vocabulary, specs: Mapping[str, TaskSpec], batch: dict,
                  keep: torch.Tensor, device: torch.device
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """What the loss reads of a batch's real target tokens (N,): the vocabulary columns to project onto (None:
    all), the mask of allowed tokens at them ((C|V,) or (N, C|V); None: unconstrained) and the targets as
    positions into those columns. Each row trains under its own task's constraint (a mixture's rows as in a
    batch of their task alone): its closed answer set, else its task's labels, else codes or none."""
    tasks = batch["tasks"] if cfg.mixture else [cfg.task] * batch["target"].shape[0]
    row_specs = [specs[t] for t in tasks]
    answers = [cfg.answers if t == cfg.task else cfg.labels.get(t, ()) for t in tasks]
    columns = answer_columns(row_specs, vocab, cfg.data.preprocess, batch["target"].cpu(), answers)
    if columns is None:  # codes, free text or an answer outside its set: the masks, and their columns
        if cfg.mixture:
            allowed = mixture_constraints(row_specs, vocab, cfg.data.preprocess, batch["target"], answers)
        else:
            allowed = target_constraints(row_specs[0], vocab, cfg.data.preprocess, batch["target"], cfg.answers)
        target = batch["target"][keep]
        if allowed is not None:
            allowed = allowed.to(device)[keep] if allowed.ndim == 3 else allowed.to(device)  # (N|, V)
        columns = allowed_columns(allowed, target, len(vocab))
        if columns is None:
            return None, allowed, target
    index, allowed, target = columns
    return index.to(device), allowed.to(device), target.to(device)


def _validate(cfg: TrainConfig, setup: Setup, raw: OFAModel, ema: Ema | None, execution: Execution, *,
              last_epoch: bool) -> dict[str, float]:
    """The task metric on the validation rows, through the inference path (EMA weights when enabled), in the
    training's precision and memory format (the one `run.precision` switch)."""
    was_training = raw.training
    t0 = time.perf_counter()
    predictor = OFAPredictor(_published_weights(raw, ema), setup.vocab, cfg.data.preprocess,
                             device=execution.device, tasks=setup.specs, max_batch_size=cfg.validation.batch_size,
                             precision=execution.precision, memory_format=execution.memory_format)
    try:  # rows stream through the predictor chunk by chunk: a large validation split is never held whole
        rows = _validation_rows(cfg, None if last_epoch and cfg.validation.full_at_end else cfg.validation.max_rows)
        result = evaluate_rows(predictor, cfg.task, rows, mode=cfg.validation.mode,
                               candidates=cfg.answers or None)
    finally:
        raw.train(was_training)
        del predictor
        _release_memory()
    return {**{f"val/{k}": v for k, v in result.metrics.items()}, "val/seconds": time.perf_counter() - t0}


def _release_memory() -> None:
    """After validation, inside a fit that trains on: collect its garbage and hand freed heap back to the OS
    (glibc's malloc_trim, where there is one), so the next epoch's allocations do not run on a fragmented heap."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _validation_rows(cfg: TrainConfig, max_rows: int | None) -> Iterator[dict]:
    rows = iter_rows(cfg.data.uri, s3=cfg.data.s3, splits=[cfg.validation.split], tasks=[cfg.task])
    return itertools.islice(rows, max_rows)


def _report(run: _Run, batches, epoch: int, step_at_epoch_start: int, *, done: bool, metrics: dict) -> None:
    """A checkpoint of everything a restart needs (rank 0 writes it; every rank reports). Once an epoch's last
    checkpoint (`done`) has uploaded, rank 0 logs `train/checkpointed_step`: proof in MLflow that it is complete
    (Tune's trials report an epoch on it)."""
    cfg, raw, optimizer, scheduler, ema, scaler = run.cfg, run.raw, run.optimizer, run.scheduler, run.ema, run.scaler
    step, world, rank = run.step, run.world, run.rank
    positions = _all_gather(batches.resume_state(), world)
    rngs = _all_gather(_rng_state(), world)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        state = {
            "model": raw.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
            "epoch_done": done, "step_at_epoch_start": step_at_epoch_start, "rng": rngs, "world_size": world,
            "data": None if done else _merge_positions(positions, bool(cfg.mixture)),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
        }
        torch.save(state, Path(d) / STATE_FILE)
        summary = {"epoch": epoch, "step": step, "epoch_done": done, "metrics": state["metrics"]}
        (Path(d) / STATE_JSON).write_text(json.dumps(summary, sort_keys=True))
        _save_training_bundle(cfg, run.setup, raw, ema, Path(d) / BUNDLE_DIR, epoch=epoch, step=step,
                              metrics=state["metrics"], fingerprint=run.loop_config["data_fingerprint"])
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))  # returns once uploaded (SYNC mode)
    if done:
        run.mlflow.log({"train/checkpointed_step": step}, step)


def _published_weights(raw: OFAModel, ema: Ema | None) -> OFAModel:
    """The weights validation and bundles use: the EMA average when enabled (a copy), else the model itself."""
    if ema is None:
        return raw
    model = OFAModel(raw.config)
    model.load_state_dict(raw.state_dict())
    ema.copy_to(model)
    return model


def _save_training_bundle(cfg: TrainConfig, setup: Setup, raw: OFAModel, ema: Ema | None, path: Path, *,
                          epoch: int, step: int, metrics: dict, fingerprint: str) -> None:
    save_bundle(path, _published_weights(raw, ema), setup.vocab, preprocess=cfg.data.preprocess,
                custom_tasks=dict(cfg.custom_tasks),
                metadata={"task": cfg.task, "data_fingerprint": fingerprint, "data_uri": cfg.data.uri,
                          "epoch": epoch, "step": step, "init": setup.init,
                          "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
                          "run": cfg.run.name, "ema": ema is not None})


# =============================================================================================================
# The driver


@dataclass(frozen=True)
class TrainOutcome:
    run_name: str
    mlflow_run_id: str
    epochs_done: int
    step: int
    metrics: dict[str, float]
    best_checkpoint: str | None  # the checkpoint directory (local path or URI) holding the best bundle
    bundle: str | None  # a local copy of the best bundle
    registered_version: str | None = None
    champion: bool = False


def _scaling(cfg: TrainConfig) -> ScalingConfig:
    res = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        res["GPU"] = cfg.scaling.gpus_per_worker
    return ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                         resources_per_worker=res, placement_strategy=cfg.scaling.placement_strategy)


def train(cfg: TrainConfig, *, output_dir: str | Path | None = None) -> TrainOutcome:
    """Run (or continue) the training run `cfg.run.name` to `cfg.epochs` epochs; see the module docstring."""
    specs = task_specs(cfg)  # fails on bad task names before anything starts
    if not ray.is_initialized():
        ray.init()
    vocab = build_setup_vocab(cfg)
    manifest = read_manifest(cfg.data.uri, s3=cfg.data.s3)
    metric, mode = primary_metric(specs[cfg.task])
    run_id = start_or_resume_run(
        cfg.tracking.tracking_uri, cfg.tracking.experiment, name=cfg.run.name,
        key=run_key(cfg.run.name, cfg.run.storage_path), params=flatten(to_dict(cfg)),
        tags={"task": cfg.task, "data_fingerprint": manifest.fingerprint, "data_uri": cfg.data.uri})
    ok = False
    try:
        summary = latest_state_summary(cfg.run.storage_path, cfg.run.name)
        start = 0 if summary is None else summary["epoch"] + (1 if summary["epoch_done"] else 0)
        if summary is not None:
            logger.info("run %s: continuing from its checkpoint at epoch %d, step %d (%s)", cfg.run.name,
                        summary["epoch"] + 1, summary["step"], "epoch done" if summary["epoch_done"] else
                        "mid-epoch")
        result = None
        if _worker_builds_datasets(cfg):  # one fit runs every remaining epoch
            fits = [(start, cfg.epochs)] if start < cfg.epochs else []
        else:  # one fit per epoch, each given its epoch's Datasets
            fits = [(epoch, epoch + 1) for epoch in range(start, cfg.epochs)]
        for first, end in fits:
            logger.info("run %s: epoch%s %s of %d", cfg.run.name, "s" if end - first > 1 else "",
                        f"{first + 1}-{end}" if end - first > 1 else first + 1, cfg.epochs)
            datasets = None if _worker_builds_datasets(cfg) else {
                n: build_dataset(_data_for(cfg, n), vocab, train=True, epoch=first, specs=specs)
                for n in (sorted(cfg.mixture) if cfg.mixture else [cfg.task])}
            trainer = TorchTrainer(
                train_loop,
                train_loop_config={"cfg": to_dict(cfg), "epoch": first, "end_epoch": end, "mlflow_run_id": run_id,
                                   "data_fingerprint": manifest.fingerprint},  # read once, by the driver
                scaling_config=_scaling(cfg),
                run_config=RunConfig(
                    name=cfg.run.name, storage_path=cfg.run.storage_path,
                    failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                                       checkpoint_score_attribute=f"val/{metric}",
                                                       checkpoint_score_order=mode)),
                datasets=datasets,
                dataset_config=ray.train.DataConfig(datasets_to_split="all"),
            )
            result = trainer.fit()
            if result.error is not None:
                raise result.error
        outcome = _finish(cfg, run_id, result, metric, mode, output_dir)
        ok = True
        return outcome
    finally:
        end_run(cfg.tracking.tracking_uri, run_id, ok)


def build_setup_vocab(cfg: TrainConfig) -> Vocabulary:
    """The vocabulary the run trains with (the init bundle's, read without building its model)."""
    if cfg.model.init:
        return load_bundle_vocab(resolve_model(cfg.model.init, tracking=cfg.tracking.tracking_uri).path)
    return Vocabulary.gpt2()


def _finish(cfg: TrainConfig, run_id: str, result, metric: str, mode: str, output_dir) -> TrainOutcome:
    summary = latest_state_summary(cfg.run.storage_path, cfg.run.name)
    best = None
    if result is not None:
        try:
            best = result.get_best_checkpoint(f"val/{metric}", mode)
        except (RuntimeError, ValueError):
            best = None
        best = best or result.checkpoint
    if best is not None:
        fs, best_dir = best.filesystem, best.path
        best_uri = f"s3://{best_dir}" if fs.type_name == "s3" else best_dir
    elif summary is not None:  # every epoch was done before this call: finish from the newest checkpoint
        best_uri = summary["path"]
        fs, best_dir = storage.resolve(best_uri, cfg.data.s3)
    else:
        raise RuntimeError(f"run {cfg.run.name}: no checkpoint to finish from")
    out = Path(output_dir or tempfile.mkdtemp(prefix=f"{cfg.run.name}-"))
    local = out / "bundle"
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    pafs.copy_files(f"{best_dir}/{BUNDLE_DIR}", str(local), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    state = json.loads((local / "config.json").read_text())["metadata"]  # the best checkpoint's bundle
    metrics = state.get("metrics", {})
    last = summary or {"epoch": state.get("epoch", -1), "step": state.get("step", 0), "epoch_done": True}
    logger_ = MetricLogger(cfg.tracking.tracking_uri, run_id)
    source = logger_.log_artifacts(local, "bundle")
    version, champion = None, False
    value = metrics.get(f"val/{metric}")
    if cfg.tracking.registered_model and value is not None and math.isfinite(value):
        version = register_bundle(cfg.tracking.registered_model, source, run_id=run_id, metric=metric,
                                  value=float(value), mode=mode, tracking=cfg.tracking.tracking_uri,
                                  tags={"task": cfg.task, "data_fingerprint": state.get("data_fingerprint", ""),
                                        "run": cfg.run.name})
        champion = promote_if_better(cfg.tracking.registered_model, version, tracking=cfg.tracking.tracking_uri)
    epochs_done = last["epoch"] + (1 if last["epoch_done"] else 0)
    return TrainOutcome(cfg.run.name, run_id, epochs_done, last["step"], metrics, best_uri, str(local), version,
                        champion)
