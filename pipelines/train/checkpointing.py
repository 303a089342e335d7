"""Checkpoints and where a run resumes.

A checkpoint (rank 0 writes it) holds the model, optimizer, scheduler, EMA, grad scaler, step, epoch, every
rank's RNG state, and the data position: the `ResumeState`s of all workers merged (rows any worker consumed).
Every restart (a worker failure inside a fit, or the job rerun with the same name) continues from it: every
worker's Dataset source skips the consumed rows and reads its part of the rest (`pipelines.data.source.plan_part`,
the rows left shared out anew, whatever the world size was), and the consumer skips them too. So a resumed run
continues mid-epoch where it stopped, and its loss curve continues.

Beside the state (`train_state.pt`) each checkpoint has a summary (`train_state.json`: epoch, step, whether the
epoch was done, its metrics; our file, not Ray's internal snapshot) and the bundle of the weights published at
that point (`bundle/`: EMA weights when enabled, with the preprocessing it trained with, its task and custom
tasks, its answer and label sets, the data fingerprint). The driver finds where a run stands from the newest summary among the run's
checkpoint directories, and the sweep copies a stopped trial's best bundle from them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
from ray.train import Checkpoint

from ofa_model import OFAModel
from ofa_model.bundle import save_bundle
from pipelines import storage
from pipelines.data.rowstats import MixtureState, ResumeState, RowStats
from pipelines.train.optim import Ema
from pipelines.train.setup import Setup
from pipelines.train.train_config import TrainConfig

logger = logging.getLogger(__name__)

STATE_FILE, STATE_JSON, BUNDLE_DIR = "train_state.pt", "train_state.json", "bundle"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(state: dict) -> None:
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


def resume_state(cfg: TrainConfig) -> dict | None:
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


def epoch_started(state: dict | None) -> int:
    """The first epoch not done in `state` (0 without one)."""
    return 0 if state is None else state["epoch"] + (1 if state["epoch_done"] else 0)


def worker_resume(state: dict | None, epoch: int, rank: int) -> ResumeState | MixtureState | None:
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


def merge_positions(positions: list, mixture: bool) -> dict:
    """The data position of a checkpoint: the workers' states merged (rows consumed by any of them)."""
    if not mixture:
        return {"kind": "single", "state": ResumeState.merge(positions).to_dict()}
    names = positions[0].sources.keys()
    return {"kind": "mixture", "slots": max(p.slots for p in positions),
            "sources": {n: ResumeState.merge([p.sources[n] for p in positions]).to_dict() for n in names}}


def report_checkpoint(state: dict[str, Any], metrics: dict, bundle: Any) -> None:
    """Rank 0: write `state` (`STATE_FILE`), its summary (`STATE_JSON`) and the bundle (`bundle(path)` writes it)
    into a checkpoint and report it with `metrics`; returns once uploaded (Ray's SYNC upload mode)."""
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / STATE_FILE)
        summary = {"epoch": state["epoch"], "step": state["step"], "epoch_done": state["epoch_done"],
                   "metrics": state["metrics"]}
        (Path(d) / STATE_JSON).write_text(json.dumps(summary, sort_keys=True))
        bundle(Path(d) / BUNDLE_DIR)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def published_weights(raw: OFAModel, ema: Ema | None) -> OFAModel:
    """The weights validation and bundles use: the EMA average when enabled (a copy), else the model itself."""
    if ema is None:
        return raw
    model = OFAModel(raw.config)
    model.load_state_dict(raw.state_dict())
    ema.copy_to(model)
    return model


def save_training_bundle(cfg: TrainConfig, setup: Setup, raw: OFAModel, ema: Ema | None, path: Path, *,
                         epoch: int, step: int, metrics: dict, fingerprint: str) -> None:
    save_bundle(path, published_weights(raw, ema), setup.vocab, preprocess=cfg.data.preprocess,
                custom_tasks=dict(cfg.custom_tasks), answer_sets=cfg.answer_sets(),
                image_tokenizer=setup.image_tokenizer,
                metadata={"task": cfg.task, "data_fingerprint": fingerprint, "data_uri": cfg.data.uri,
                          "epoch": epoch, "step": step, "init": setup.init,
                          "metrics": {k: v for k, v in metrics.items() if math.isfinite(v)},
                          "run": cfg.run.name, "ema": ema is not None})
