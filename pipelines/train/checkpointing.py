"""Checkpoints and where a run resumes.

A checkpoint (rank 0 writes it) holds the model, optimizer, scheduler, EMA, grad scaler, step, epoch, every
rank's RNG state, and the data position: the `ResumeState`s of all workers merged (rows any worker consumed).
Every restart (a worker failure inside a fit, or the job rerun with the same name) continues from it: every
worker's Dataset source skips the consumed rows and reads its part of the rest (`pipelines.data.source.plan_part`,
the rows left shared out anew, whatever the world size was), and the consumer skips them too. So a resumed run
continues mid-epoch where it stopped, and its loss curve continues.

Beside the state (`train_state.pt`) each checkpoint has a summary (`train_state.json`: epoch, step, whether the
epoch was done, its metrics, and every other file of the checkpoint with its size; our file, not Ray's internal
snapshot) and the bundle of the weights published at that point (`bundle/`: EMA weights when enabled, with the
preprocessing it trained with, its task and custom tasks, its answer and label sets, the data fingerprint). The
driver finds where a run stands from the newest summary among the run's checkpoint directories, and the sweep
copies a stopped trial's best bundle from them.

A checkpoint counts only when it is whole in storage. After Ray Train's upload, rank 0 checks that every file
arrived (`storage.check_copied`: the upload can return without an error while the store is gone) before Ray
registers the checkpoint, and `state_summaries` passes over a directory that lacks a file its summary lists (an
upload cut short leaves one). When the store fails, the run fails with a `CheckpointStorageError` naming the run,
the checkpoint and the cause; what the run had stored before stays, and rerunning it with the same name continues
from there.
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
RERUN = ("rerun with the same run.name and run.storage_path once the store is back: the run continues from its "
         "last whole checkpoint")


class CheckpointStorageError(OSError):
    """A run's checkpoints could not be written to or read from its storage (`run.storage_path`); the message
    names the run, the checkpoint or directory, and the store's error."""


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
        try:
            with ckpt.as_directory() as d:
                state = read_state(d)
        except OSError as exc:
            raise CheckpointStorageError(f"run {cfg.run.name}: its latest checkpoint ({ckpt.path}) could not be "
                                         f"read to resume from: {exc}; {RERUN}") from exc
    summary = latest_state_summary(cfg.run.storage_path, cfg.run.name)
    if summary is not None and (state is None or (summary["step"], summary["epoch_done"]) >
                                (state["step"], state["epoch_done"])):
        try:
            state = read_state(summary["path"], cfg.data.s3)
        except (OSError, RuntimeError, EOFError, ValueError) as exc:  # still being uploaded, or half deleted
            logger.warning("checkpoint %s not readable yet (%s); using Ray's latest", summary["path"], exc)
    return state


def state_summaries(storage_path: str, name: str, s3=None) -> list[dict]:
    """The summaries (`train_state.json`, each with its checkpoint directory as "path") of the run's checkpoints
    that are whole in storage: every file a summary lists is there at its size (a summary written before the list
    was kept needs its `train_state.pt`). [] for a run with nothing stored; CheckpointStorageError when the
    storage cannot be listed or read."""
    run_dir = storage.join(storage_path, name)
    try:
        sizes = storage.file_sizes(run_dir, s3)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CheckpointStorageError(f"run {name}: its checkpoints in {run_dir} could not be listed: "
                                     f"{exc}") from exc
    out = []
    for uri in sorted(u for u in sizes if u.endswith("/" + STATE_JSON)):
        path = uri.rsplit("/", 1)[0]
        try:
            summary = json.loads(storage.read_bytes(uri, s3))
        except FileNotFoundError:
            continue  # deleted since the listing (Ray keeps `run.keep_checkpoints`)
        except ValueError:
            continue  # a local summary being written
        except OSError as exc:
            raise CheckpointStorageError(f"run {name}: the checkpoint summary {uri} could not be read: "
                                         f"{exc}") from exc
        files = summary.get("files", {STATE_FILE: None})
        if all(sizes.get(f"{path}/{rel}", -1) == size if size is not None else f"{path}/{rel}" in sizes
               for rel, size in files.items()):
            out.append({**summary, "path": path})
    return out


def latest_state_summary(storage_path: str, name: str) -> dict | None:
    """The newest (by step) of `state_summaries`, or None."""
    return max(state_summaries(storage_path, name), key=lambda s: (s["step"], s["epoch_done"]), default=None)


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


def report_checkpoint(state: dict[str, Any], metrics: dict, bundle: Any, *, storage_path: str, name: str) -> None:
    """Rank 0: write `state` (`STATE_FILE`), the bundle (`bundle(path)` writes it) and, last, the summary
    (`STATE_JSON`, listing the other files with their sizes) into a checkpoint and report it with `metrics`.
    Returns once the checkpoint is uploaded into the run's directory (`storage_path`/`name`) and found whole
    there, before Ray Train registers it; CheckpointStorageError when it is not (after Ray's upload retries)."""
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / STATE_FILE)
        bundle(Path(d) / BUNDLE_DIR)
        files = {f.relative_to(d).as_posix(): f.stat().st_size for f in sorted(Path(d).rglob("*")) if f.is_file()}
        summary = {"epoch": state["epoch"], "step": state["step"], "epoch_done": state["epoch_done"],
                   "metrics": state["metrics"], "files": files}
        (Path(d) / STATE_JSON).write_text(json.dumps(summary, sort_keys=True))
        try:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_upload_fn=_upload_checked)
        except OSError as exc:
            raise CheckpointStorageError(
                f"run {name}: the checkpoint of step {state['step']} could not be stored in "
                f"{storage.join(storage_path, name)}: {exc}. Ray Train did not record it; {RERUN}") from exc


def _upload_checked(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
    """Ray Train's `checkpoint_upload_fn`: its own upload (what `report` does without one), then the check that
    every file arrived whole (`storage.check_copied`), so Ray registers only a checkpoint that is in storage. Both
    run inside Ray's upload retries (3 attempts, 1 and 2 s apart, on the store's network errors)."""
    persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
    storage.check_copied(checkpoint.path, persisted.filesystem, persisted.path)
    return persisted


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
