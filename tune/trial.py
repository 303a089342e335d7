"""One Tune trial: a function trainable that runs `pipelines.train.train` (the function `jobs.finetune` calls)
and reports each finished epoch's validation metric to Tune, so ASHA can stop it.

How epochs reach Tune (the decision): through Ray Train's report channel, not through MLflow.

* `train()` runs in the trial with the trial's full `epochs`, so the learning-rate schedule (warm-up, then
  decay to `optim.end_lr` over all epochs) is the one a fine-tune with the same config gets. The alternative,
  one `train()` call per epoch with `epochs=e+1` on the same run, would give epoch e a schedule that decays to
  `end_lr` within it, then rises again: the trial would not measure the config it names.
* Every fit of the trial's training run gets `EpochReport`, a `ray.tune.integration.ray_train.
  TuneReportCallback` (what Ray's docs give for Train inside Tune). Ray Train calls it on its controller after
  a report, and rank 0 reports an epoch's end (`epoch_done`) with its checkpoint, in Ray's SYNC upload mode:
  so a metric reaches Tune only once the epoch's checkpoint is uploaded. The callback passes on the epoch
  (counted from 1), the step, the metric and the trial's time; Tune's answer may be ASHA's stop, which ends the
  trial's actor and, with it, the Ray Train run it owns (its MLflow run is then set KILLED by the sweep).
* The adapter over Ray's callback is small and needed: the worker's metrics name epochs from 0, mid-epoch
  checkpoints report too (`epoch_done` false), and the last epoch is held back: the trial reports it itself
  once `train()` has returned (from the run's newest checkpoint summary), so the bundle is logged to the trial's
  MLflow run before ASHA's stop at max_t can end the trial. That report carries a small Tune checkpoint, so a
  trial Tune restores after it is not run again.
* A restarted trial (a failure, or the sweep resumed after its driver died) calls `train()` again on the same
  run name, which continues from the run's latest checkpoint: the epochs done before are not trained again.
  The newest finished epoch is reported once more first: a trial killed between its checkpoint's upload and
  Tune's saving of the result would lose it otherwise (the sweep keeps one result per epoch; ASHA decides a
  rung once). Its `trial_time_s` counts from the restart: a restarted trial's time is its longest stretch,
  not the sum.

Each trial's MLflow run (one per training run, as for any fine-tune) is created here before `train()` finds it
by its run key, with the sweep's parent run id (`mlflow.parentRunId`) and the trial id as tags.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from ofa_model.config_files import flatten, to_dict
from pipelines.tracking.runs import run_key, start_or_resume_run
from pipelines.train.train_config import TrainConfig
from tune.search import SweepPlan

logger = logging.getLogger(__name__)

PROGRESS_FILE = "trial_progress.json"
TRIAL_TAG, SWEEP_TAG, PARENT_TAG = "tune.trial_id", "ofa.sweep", "mlflow.parentRunId"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares (sent to the trial actors with `tune.with_parameters`)."""

    plan: SweepPlan
    parent_run_id: str


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
    from pipelines.data.dataset import data_fingerprint, read_manifests

    fingerprint = data_fingerprint(read_manifests(cfg.data, cfg.mixture))
    return start_or_resume_run(
        cfg.tracking.tracking_uri, cfg.tracking.experiment, name=cfg.run.name,
        key=run_key(cfg.run.name, cfg.run.storage_path), params=flatten(to_dict(cfg)),
        tags={"task": cfg.task, "data_fingerprint": fingerprint, "data_uri": cfg.data.uri,
              PARENT_TAG: ctx.parent_run_id, SWEEP_TAG: ctx.plan.cfg.name, TRIAL_TAG: trial_id})


def epoch_result(metrics: Mapping[str, Any], metric: str, started: float) -> dict[str, Any]:
    """Tune's result for a finished epoch, from the worker's epoch metrics (epochs counted from 0 there)."""
    return {"epoch": int(metrics["epoch"]) + 1, "step": int(metrics["step"]), metric: float(metrics[metric]),
            "trial_time_s": time.time() - started}


class EpochReport(TuneReportCallback):
    """Ray's Train-to-Tune callback, passing on finished epochs but the last (see the module docstring).
    `started`: the trial's start (`time.time()`; the callback runs in Ray Train's controller)."""

    def __init__(self, metric: str, epochs: int, started: float) -> None:
        super().__init__()
        self.metric, self.epochs, self.started = metric, epochs, started

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        m = metrics[0]  # every rank reports rank 0's metrics
        if m.get("epoch_done") and int(m["epoch"]) + 1 < self.epochs:
            super().after_report(run_context, [epoch_result(m, self.metric, self.started)], checkpoint)


def _restored_progress(checkpoint) -> dict[str, Any]:
    if checkpoint is None:
        return {"epochs_reported": 0}
    with checkpoint.as_directory() as d:
        return json.loads((Path(d) / PROGRESS_FILE).read_text())


def _finished_epoch(cfg: TrainConfig, metric: str) -> dict[str, Any] | None:
    """The metrics of the training run's newest finished epoch, from its newest checkpoint (None: none yet)."""
    from pipelines.train import latest_state_summary

    summary = latest_state_summary(cfg.run.storage_path, cfg.run.name)
    return summary["metrics"] if summary is not None and metric in summary["metrics"] else None


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """The function trainable (see the module docstring). `params`: one value per space key."""
    from ray import tune as ray_tune

    from pipelines.train import latest_state_summary, train

    started = time.time()
    trial_id = ray_tune.get_context().get_trial_id()
    # Tune starts trials in their own directory: relative data and model paths mean what they mean to the driver
    os.chdir(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd()))
    cfg = trial_train_config(ctx.plan, params, trial_id)
    if _restored_progress(ray_tune.get_checkpoint())["epochs_reported"] >= cfg.epochs:
        logger.info("trial %s: every epoch was reported before", trial_id)
        return
    run_id = start_trial_run(cfg, ctx, trial_id)
    logger.info("trial %s: run %s, params %s", trial_id, cfg.run.name, params)
    done = _finished_epoch(cfg, ctx.plan.metric)
    if done is not None and done["epoch"] + 1 < cfg.epochs:  # again (see the module docstring)
        ray_tune.report(epoch_result(done, ctx.plan.metric, started))
    with tempfile.TemporaryDirectory(prefix="trial-") as out:
        train(cfg, output_dir=out, callbacks=[EpochReport(ctx.plan.metric, cfg.epochs, started)])
    last = latest_state_summary(cfg.run.storage_path, cfg.run.name)
    if last is None or not last["epoch_done"] or last["epoch"] + 1 != cfg.epochs:
        raise RuntimeError(f"trial {trial_id}: train() returned, but the newest checkpoint of run {cfg.run.name} "
                           f"is not its last epoch's: {last}")
    with tempfile.TemporaryDirectory(prefix="trial-progress-") as d:
        (Path(d) / PROGRESS_FILE).write_text(json.dumps({"epochs_reported": cfg.epochs, "run_name": cfg.run.name,
                                                         "mlflow_run_id": run_id}))
        ray_tune.report(epoch_result({**last["metrics"], "epoch": last["epoch"], "step": last["step"]},
                                     ctx.plan.metric, started),
                        checkpoint=ray_tune.Checkpoint.from_directory(d))
