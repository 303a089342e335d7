"""Pretraining and fine-tuning on Ray Train (V2 `TorchTrainer`), tracked in MLflow: the driver.

    outcome = train(load_config(TrainConfig, "configs/finetune/vqa.yaml", overrides))

All the epochs a call has left train in one `TorchTrainer.fit()` (under `run.name` + `run.storage_path`),
with one worker or several. Each worker builds each epoch's Datasets itself, from the same seeded plan and the
checkpoint's data position, and reads its own part of the epoch (`pipelines.train.worker`; the parts:
`pipelines.data.source.plan_part`), so no Dataset comes from the driver and nothing ties a fit to an epoch.
Before, several workers ran one fit per epoch: Ray Train takes a fit's datasets once, and the driver's Dataset
(one epoch's seeded shard order) was split across the workers (`streaming_split`). Each such fit started a
worker group, rebuilt the model and read the checkpoint again in every worker (for ofa-base, 3-4 GB a worker
at every epoch boundary). Measured on the 2-core machine, a 2-worker x 1-CPU easy-VQA fine-tune (ofa-micro,
4 steps an epoch, 16 validation rows, about 1 s of validation), timed from MLflow's per-step timestamps on a
busy machine: 28-46 s from one epoch's last step to the next one's first with a fit per epoch (six epoch
boundaries, two runs), 6.7-8.2 s in one fit; the 16 steps took 161-224 s of `train()` against 68 s.

A lost worker or node: `run.max_failures` restarts the worker group from the latest checkpoint, with
`scaling.num_workers` workers, or, when `scaling.min_workers` is lower, with as many as the cluster has room for
(Ray Train's elastic `num_workers=(min, max)`; the workers go on at another world size, `pipelines.train.worker`).
A fixed-size restart that cannot place its workers waits for them (`run.max_start_failures`). When the fit fails
and a node that was alive at its start is gone (Ray counts it dead, or its raylet takes no connection: Ray's
verdict comes seconds after a fit without restarts has failed), the error names the node and says how to let
the run go on with fewer workers (`_lost_nodes_error`). Measured with a two-node cluster on the 2-core machine,
its worker node SIGKILLed (`tests/test_train_cluster.py`, three runs): an elastic run trained again on the node
left 79-95 s later, 60 s of it Ray's wait for a first restart of two workers, which Ray sized before it had
noticed the loss (its view of the nodes lags a loss by up to 20 s; `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`
bounds that wait: at 15 s the run trained again after 45 s, two waits); a fixed run failed 9 s after the loss without restarts, 70-75 s with one restart allowed
and `run.max_start_failures=0`.

The driver finds where a run stands from the newest `train_state.json` among the run's checkpoint directories
(`pipelines.train.checkpointing`); a run whose epochs are all done is not fitted again, only finished. Inside the
fit, a restarted worker group finds the latest checkpoint itself, mid-epoch included. A fit the object store ends
(after Ray's upload retries and `run.max_failures` restarts) raises `CheckpointStorageError`, not Ray's
`TrainingFailedError` with the cause in a truncated worker traceback (`_storage_failure`).

Before anything starts, the driver reads the answer and label files (`pipelines.train.setup.with_answer_sets`)
and folds the init bundle's preprocessing and custom tasks into the config (`with_init_bundle`); the workers get
that config. It refuses corpora of image codes made by another image tokenizer or at another code_image_size than
the run's (`check_code_corpora`, from the corpora's manifests and the tokenizers' config.json, no weights loaded).
It also reads, once, the negative pools of the derived tasks that draw negatives
(`pipelines.data.dataset.negative_pools`, a pass over the source rows), which every Dataset the workers build
gets. The worker loop is
`pipelines.train.worker`. At the end the driver logs the best bundle as an artifact and registers it; the
`champion` alias moves only on improvement (`pipelines.tracking.registry`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
from ray.train import (
    CheckpointConfig,
    ControllerError,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
    WorkerGroupError,
)
from ray.train.torch import TorchTrainer

from ofa_model.config_files import flatten, to_dict
from ofa_model.evaluation import primary_metric
from pipelines import storage
from pipelines.data.dataset import data_fingerprint, negative_pools, read_manifests
from pipelines.job_env import job_tracking_uri
from pipelines.tracking.registry import promote_if_better, register_bundle
from pipelines.tracking.runs import MetricLogger, end_run, patiently, run_key, start_or_resume_run
from pipelines.train.checkpointing import (
    BUNDLE_DIR,
    RERUN,
    CheckpointStorageError,
    epoch_started,
    latest_state_summary,
)
from pipelines.train.setup import (
    check_code_corpora,
    run_code_image_size,
    task_specs,
    with_answer_sets,
    with_init_bundle,
)
from pipelines.train.train_config import TrainConfig
from pipelines.train.worker import train_loop

logger = logging.getLogger(__name__)


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


def train(cfg: TrainConfig, *, output_dir: str | Path | None = None,
          callbacks: Sequence[Any] = ()) -> TrainOutcome:
    """Run (or continue) the training run `cfg.run.name` to `cfg.epochs` epochs; see the module docstring.
    `callbacks`: Ray Train `UserCallback`s of the fit (Tune's report channel: `tune.trial`)."""
    deadline = None if cfg.run.time_budget_s is None else time.time() + cfg.run.time_budget_s
    task_specs(cfg)  # fails on bad task names before anything starts
    cfg = with_answer_sets(cfg)  # answer and label files, read once: the workers get the answers
    # one tracking URI for the driver and every worker, whichever node and environment they run in
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(
        cfg.tracking, tracking_uri=job_tracking_uri(cfg.tracking.tracking_uri)))
    if not ray.is_initialized():
        ray.init()
    cfg = with_init_bundle(cfg)
    code_image_size = run_code_image_size(cfg)
    specs = task_specs(cfg, code_image_size)
    manifests = read_manifests(cfg.data, cfg.mixture)
    check_code_corpora(cfg, manifests, specs, code_image_size)
    fingerprint = data_fingerprint(manifests)
    pools = negative_pools(cfg.data, cfg.mixture)  # read once: every Dataset the workers build
    metric, mode = primary_metric(specs[cfg.task])
    run_id = patiently(lambda: start_or_resume_run(
        cfg.tracking.tracking_uri, cfg.tracking.experiment, name=cfg.run.name,
        key=run_key(cfg.run.name, cfg.run.storage_path), params=flatten(to_dict(cfg)),
        tags={"task": cfg.task, "data_fingerprint": fingerprint, "data_uri": cfg.data.uri}),
        what=f"starting run {cfg.run.name}", uri=cfg.tracking.tracking_uri, deadline_s=cfg.tracking.server_wait_s)
    ok = False
    try:
        summary = latest_state_summary(cfg.run.storage_path, cfg.run.name)
        if summary is not None:
            logger.info("run %s: continuing from its checkpoint at epoch %d, step %d (%s)", cfg.run.name,
                        summary["epoch"] + 1, summary["step"], "epoch done" if summary["epoch_done"] else
                        "mid-epoch")
        result, start = None, epoch_started(summary)
        if start < cfg.epochs:
            logger.info("run %s: epochs %d-%d of %d in one fit", cfg.run.name, start + 1, cfg.epochs, cfg.epochs)
            trainer = _trainer(cfg, metric, mode, callbacks,
                               {"mlflow_run_id": run_id, "data_fingerprint": fingerprint, "negative_pools": pools,
                                "deadline": deadline})
            nodes = _alive_nodes()
            try:
                result = trainer.fit()
            except TrainingFailedError as exc:  # what Ray's FailureConfig could not restart
                failure = _storage_failure(cfg, exc) or _lost_nodes_error(cfg, exc, nodes)
                if failure is None:
                    raise
                raise failure from exc
            if result.error is not None:
                raise result.error
            if (result.metrics or {}).get("train/stopped_by_budget"):
                logger.info("run %s: stopped by run.time_budget_s=%g after epoch %d of %d", cfg.run.name,
                            cfg.run.time_budget_s, int(result.metrics.get("epoch", 0)) + 1, cfg.epochs)
        outcome = _finish(cfg, run_id, result, metric, mode, output_dir)
        ok = True
        return outcome
    finally:
        try:  # the run is FAILED only for its own reasons: the status waits for a server that is away
            end_run(cfg.tracking.tracking_uri, run_id, ok, deadline_s=cfg.tracking.server_wait_s)
        except RuntimeError:
            if ok:
                raise
            logger.exception("run %s: its MLflow status could not be set to FAILED", cfg.run.name)


def _storage_failure(cfg: TrainConfig, exc: TrainingFailedError) -> CheckpointStorageError | None:
    """The storage failure that ended a fit, if that is what did: a worker's CheckpointStorageError (an upload,
    or a restart reading the latest checkpoint), or the controller's OSError (its only I/O is the run's directory:
    the record of the checkpoints it keeps there, the old checkpoints it deletes)."""
    if isinstance(exc, WorkerGroupError):
        return next((e for e in exc.worker_failures.values() if isinstance(e, CheckpointStorageError)), None)
    if isinstance(exc, ControllerError) and isinstance(exc.controller_failure, OSError):
        return CheckpointStorageError(
            f"run {cfg.run.name}: Ray Train could not keep its record of the run's checkpoints in "
            f"{storage.join(cfg.run.storage_path, cfg.run.name)}: {exc.controller_failure}; {RERUN}")
    return None


def _trainer(cfg: TrainConfig, metric: str, mode: str, callbacks: Sequence[Any],
             run_info: dict[str, Any]) -> TorchTrainer:
    """The run's TorchTrainer (no datasets: the workers build theirs); `run_info`: the MLflow run id, the data
    fingerprint and the derived tasks' negative pools (`negative_pools`), read once, in `train`."""
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": to_dict(cfg), **run_info},
        scaling_config=scaling_of(cfg),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage_path, callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures,
                                         controller_failure_limit=cfg.run.max_start_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints,
                                               checkpoint_score_attribute=f"val/{metric}",
                                               checkpoint_score_order=mode)),
    )


def scaling_of(cfg: TrainConfig) -> ScalingConfig:
    """Ray Train's scaling: a fixed world of num_workers, or elastic (min_workers, num_workers)."""
    sc = cfg.scaling
    res = {"CPU": sc.cpus_per_worker, **sc.resources_per_worker}
    if sc.use_gpu:
        res["GPU"] = sc.gpus_per_worker
    workers = sc.num_workers if sc.least_workers == sc.num_workers else (sc.least_workers, sc.num_workers)
    return ScalingConfig(num_workers=workers, use_gpu=sc.use_gpu, resources_per_worker=res,
                         placement_strategy=sc.placement_strategy)


def _alive_nodes() -> dict[str, tuple[str, int]]:
    """node id -> (address, raylet port) of the nodes Ray counts alive."""
    return {n["NodeID"]: (n["NodeManagerAddress"], int(n["NodeManagerPort"])) for n in ray.nodes() if n["Alive"]}


def _answers(address: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether a node's raylet takes a TCP connection."""
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _lost_nodes_error(cfg: TrainConfig, error: BaseException,
                      before: dict[str, tuple[str, int]]) -> RuntimeError | None:
    """The error that says which of the nodes alive when the fit started (`before`) are lost now, and how to let
    the run go on without them; None when none is. Lost: Ray counts it dead, or its raylet takes no connection
    (Ray declares a node dead only after some seconds of failed health checks, and a fit without restarts
    fails as soon as a collective breaks)."""
    now = _alive_nodes()
    lost = sorted(node for node, where in before.items() if node not in now or not _answers(*where))
    if not lost:
        return None
    sc = cfg.scaling
    nodes = ", ".join(f"{node} ({before[node][0]})" for node in lost)
    how = (f"set scaling.min_workers below scaling.num_workers={sc.num_workers} (e.g. scaling.min_workers="
           f"{max(1, sc.num_workers - len(lost))}) with run.max_failures >= 1, and the run goes on with the "
           "workers left, from its last checkpoint"
           if sc.least_workers == sc.num_workers else
           f"it may go on with no fewer than scaling.min_workers={sc.least_workers}: lower it, or bring nodes "
           "back")
    said = " ".join(str(error).split())[:400] or type(error).__name__
    return RuntimeError(
        f"run {cfg.run.name}: lost node(s) {nodes} during training; the run needs {sc.least_workers} of its "
        f"{sc.num_workers} workers and could not go on: {how}. "
        f"Rerunning run.name={cfg.run.name} resumes it from its last checkpoint. Ray Train: {said}")


def _best_checkpoint(cfg: TrainConfig, result, metric: str, mode: str, summary: dict | None):
    """(filesystem, path, URI) of the checkpoint holding the run's best bundle."""
    best = None
    if result is not None:
        try:
            best = result.get_best_checkpoint(f"val/{metric}", mode)
        except (RuntimeError, ValueError):
            best = None
        best = best or result.checkpoint
    if best is not None:
        fs, best_dir = best.filesystem, best.path
        return fs, best_dir, f"s3://{best_dir}" if fs.type_name == "s3" else best_dir
    if summary is not None:  # every epoch was done before this call: finish from the newest checkpoint
        fs, best_dir = storage.resolve(summary["path"], cfg.data.s3)
        return fs, best_dir, summary["path"]
    raise RuntimeError(f"run {cfg.run.name}: no checkpoint to finish from")


def _finish(cfg: TrainConfig, run_id: str, result, metric: str, mode: str, output_dir) -> TrainOutcome:
    """Copy the best bundle out, log it to MLflow, register it (and maybe move `champion`)."""
    summary = latest_state_summary(cfg.run.storage_path, cfg.run.name)
    fs, best_dir, best_uri = _best_checkpoint(cfg, result, metric, mode, summary)
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
    uri, wait_s = cfg.tracking.tracking_uri, cfg.tracking.server_wait_s
    source = MetricLogger(uri, run_id, deadline_s=wait_s).log_artifacts(local, "bundle")
    version, champion = None, False
    value = metrics.get(f"val/{metric}")
    if cfg.tracking.registered_model and value is not None and math.isfinite(value):
        name = cfg.tracking.registered_model
        version = patiently(lambda: register_bundle(
            name, source, run_id=run_id, metric=metric, value=float(value), split=cfg.validation.split,
            data_fingerprint=state["data_fingerprint"], mode=mode, tracking=uri,
            tags={"task": cfg.task, "run": cfg.run.name}),
            what=f"registering {name}", uri=uri, deadline_s=wait_s)
        champion = patiently(lambda: promote_if_better(name, version, tracking=uri),
                             what=f"deciding {name}'s champion", uri=uri, deadline_s=wait_s)
    epochs_done = last["epoch"] + (1 if last["epoch_done"] else 0)
    return TrainOutcome(cfg.run.name, run_id, epochs_done, last["step"], metrics, best_uri, str(local), version,
                        champion)
