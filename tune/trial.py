"""One Tune trial: a function trainable that runs `pipelines.train.loop.train` (the function `jobs.finetune` calls)
and reports each finished epoch's validation metric to Tune, so ASHA can stop it.

How epochs reach Tune (the decision):

* `train()` runs in a thread of the trial with the trial's full `epochs`, so the learning-rate schedule (warm-up,
  then decay to `optim.end_lr` over all epochs) is the one a fine-tune with the same config gets. The
  alternative, one `train()` call per epoch with `epochs=e+1` on the same run, would give epoch e a schedule
  that decays to `end_lr` within it, then rises again: the trial would not measure the config it names.
* The trial's own thread watches the trial's MLflow run, where rank 0 logs each epoch's `val/<metric>` (at the
  epoch's last step) just before the epoch's checkpoint is uploaded. An epoch counts as finished once its
  checkpoint is complete, which shows when rank 0 logs `train/checkpointed_step` at or past the epoch's step
  (logged once `ray.train.report` has returned from the upload), or when a later fit has loaded it
  (`train/resumed_from_step`), or when `train()` has returned. A checkpoint's `train_state.json` in storage is
  no such proof: the files of a checkpoint directory upload in no fixed order. Then the trial calls
  `ray.tune.report` with the epoch and the metric, and a small Tune checkpoint: epochs reported, trial time,
  the training run's name.
* The last epoch is reported only after `train()` has returned, so the bundle is logged to the trial's MLflow
  run before ASHA's stop at max_t can end the trial. An earlier report may be answered by a stop: Tune then
  ends the trial's actor, and with it the Ray Train run it owns; the reported epoch's checkpoint is complete.
* A restarted trial (a failure, or the sweep resumed after its driver died) calls `train()` again on the same
  run name, which continues from the run's latest checkpoint, and skips the epochs its Tune checkpoint says
  were reported already.

Each trial's MLflow run (one per training run, as for any fine-tune) is created here before `train()` finds it
by its run key, with the sweep's parent run id (`mlflow.parentRunId`) and the trial id as tags.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ofa_model.config_files import flatten, to_dict
from pipelines.tracking.runs import client_for, run_key, start_or_resume_run
from pipelines.train.train_config import TrainConfig
from tune.search import SweepPlan

logger = logging.getLogger(__name__)

POLL_S = 1.0  # how often a trial looks for a finished epoch
PROGRESS_FILE = "trial_progress.json"
TRIAL_TAG, SWEEP_TAG, PARENT_TAG = "tune.trial_id", "ofa.sweep", "mlflow.parentRunId"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares (sent to the trial actors with `tune.with_parameters`)."""

    plan: SweepPlan
    parent_run_id: str
    poll_s: float = POLL_S


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def trial_train_config(plan: SweepPlan, params: Mapping[str, Any], trial_id: str) -> TrainConfig:
    """The trial's TrainConfig: the base with `params` and the ties, its own run, no registration (the sweep
    registers its best trial's bundle, once)."""
    return plan.trial_config(params, trial_run_name(plan.cfg.name, trial_id),
                             source=f"sweep {plan.cfg.name} trial {trial_id}")


def start_trial_run(cfg: TrainConfig, ctx: TrialContext, trial_id: str) -> str:
    """The trial's MLflow run (created with the parent tag, or resumed): the run `train()` then continues. Its
    params and tags are those `train()` gives a new run, plus the sweep's."""
    from pipelines.data.shards import read_manifest

    manifest = read_manifest(cfg.data.uri, s3=cfg.data.s3)
    return start_or_resume_run(
        cfg.tracking.tracking_uri, cfg.tracking.experiment, name=cfg.run.name,
        key=run_key(cfg.run.name, cfg.run.storage_path), params=flatten(to_dict(cfg)),
        tags={"task": cfg.task, "data_fingerprint": manifest.fingerprint, "data_uri": cfg.data.uri,
              PARENT_TAG: ctx.parent_run_id, SWEEP_TAG: ctx.plan.cfg.name, TRIAL_TAG: trial_id})


def epoch_values(client, run_id: str, metric: str) -> list[tuple[int, float]]:
    """(step, value) of `metric`, one per epoch in order: a value logged twice at one step (an epoch redone
    after a failure between its validation and its checkpoint) counts once, the later one."""
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, metric):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return [(step, value) for step, (_, value) in sorted(latest.items())]


def finished_epochs(client, run_id: str, metric: str, *, train_returned: bool) -> list[tuple[int, float]]:
    """(step, value) of the epochs whose checkpoint is complete (see the module docstring)."""
    values = epoch_values(client, run_id, metric)
    if train_returned:
        return values
    complete = max((m.value for key in ("train/checkpointed_step", "train/resumed_from_step")
                    for m in client.get_metric_history(run_id, key)), default=-1.0)
    return [(step, value) for step, value in values if step <= complete]


def _restored_progress(checkpoint) -> dict[str, Any]:
    if checkpoint is None:
        return {"epochs_reported": 0, "elapsed_s": 0.0}
    with checkpoint.as_directory() as d:
        return json.loads((Path(d) / PROGRESS_FILE).read_text())


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """The function trainable (see the module docstring). `params`: one value per space key."""
    from ray import tune as ray_tune

    from pipelines.train.loop import train

    t0 = time.monotonic()
    trial_id = ray_tune.get_context().get_trial_id()
    # Tune starts trials in their own directory: relative data and model paths mean what they mean to the driver
    os.chdir(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd()))
    cfg = trial_train_config(ctx.plan, params, trial_id)
    metric = ctx.plan.metric
    progress = _restored_progress(ray_tune.get_checkpoint())
    reported, before_s = int(progress["epochs_reported"]), float(progress["elapsed_s"])
    run_id = start_trial_run(cfg, ctx, trial_id)
    client, _ = client_for(cfg.tracking.tracking_uri)
    logger.info("trial %s: run %s, params %s, %d epoch(s) reported before", trial_id, cfg.run.name, params, reported)

    box: dict[str, Any] = {}

    def work() -> None:
        try:
            with tempfile.TemporaryDirectory(prefix="trial-") as out:
                train(cfg, output_dir=out)
        except BaseException as exc:  # re-raised in the trial's thread
            box["error"] = exc

    worker = threading.Thread(target=work, name=f"train-{trial_id}", daemon=True)
    worker.start()
    while True:
        finished = not worker.is_alive()  # read before MLflow: a finished train() has logged every epoch
        if "error" in box:
            raise box["error"]
        values = finished_epochs(client, run_id, metric, train_returned=finished)
        while reported < len(values) and (reported + 1 < cfg.epochs or finished):  # the last waits for train()
            step, value = values[reported]
            reported += 1
            elapsed = before_s + time.monotonic() - t0
            _report(ray_tune, {"epoch": reported, "step": step, metric: value, "trial_time_s": elapsed},
                    {"epochs_reported": reported, "elapsed_s": elapsed, "run_name": cfg.run.name,
                     "storage_path": cfg.run.storage_path, "mlflow_run_id": run_id})
        if finished:
            break
        time.sleep(ctx.poll_s)
    if reported < cfg.epochs:
        raise RuntimeError(f"trial {trial_id}: train() returned, but MLflow run {run_id} has {metric} for "
                           f"{reported} of {cfg.epochs} epochs")


def _report(ray_tune, metrics: dict[str, Any], progress: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="trial-progress-") as d:
        (Path(d) / PROGRESS_FILE).write_text(json.dumps(progress))
        ray_tune.report(metrics, checkpoint=ray_tune.Checkpoint.from_directory(d))
