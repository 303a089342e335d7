"""Run a sweep: Ray Tune over `tune.trial.run_trial`, an MLflow parent run, the best trial's config and bundle.

    outcome = run_sweep(plan_sweep(load_sweep_config("configs/tune/vqa.yaml")))

* Tune: the trial function with `trial.driver_cpus` CPUs (its Ray Train workers take the trial config's
  `scaling`), at most `max_concurrent_trials` at once, ASHA on the task's validation metric with `epoch` as
  time and max_t the trials' epochs (or FIFO when `asha` is null), random search or Optuna TPE. Tune's
  experiment lives at `<storage>/<name>`, the trials' training runs at `<storage>/<name>-runs/<name>-<trial>`
  (local or s3://), trial checkpoints beside them in Tune's experiment.
* Resume: a sweep whose experiment is in storage is restored (`Tuner.restore`): finished trials keep their
  results and are not run again, unfinished and errored ones continue (each from its training run's latest
  checkpoint). A sweep that had finished is only summarised again. The MLflow parent run continues too
  (found by its run key); a resumed sweep must have the same config (fingerprint tag), or it is an error.
* MLflow: the parent run holds the sweep's settings as params; every trial's run (the training run) is its
  child (`mlflow.parentRunId`), tagged afterwards with its epochs and whether it was stopped early (stopped
  runs end KILLED). The parent gets the best metric, the table (text and CSV), the plot and the best config.
* Selection: the trial with the best validation metric over its epochs (the checkpoint a fine-tune registers
  is its best epoch's too). Its config is written as a fine-tune YAML (`best_config.yaml`: the base config with
  the trial's values, run name `<name>-best`), its best bundle is registered under the base config's
  `tracking.registered_model`, and `champion` moves only if it beats the current champion
  (`pipelines.tracking.registry.promote_if_better`). A stopped trial's bundle is copied from its best checkpoint first.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ofa_model.config_files import dump_yaml, flatten, to_dict
from pipelines.tracking.runs import (
    MetricLogger,
    client_for,
    end_run,
    experiment_id,
    run_key,
    start_or_resume_run,
)
from tune.report import TrialSummary, plot, rank, savings, write_csv
from tune.report import table as format_table
from tune.search import SweepPlan, format_value, param_space
from tune.trial import PARENT_TAG, TRIAL_TAG, TrialContext, run_trial, trial_run_name

logger = logging.getLogger(__name__)

FINGERPRINT_TAG, VERSION_TAG, CHAMPION_TAG = "ofa.sweep_fingerprint", "sweep.registered_version", "sweep.champion"
BEST_CONFIG = "best_config.yaml"


class SweepError(RuntimeError):
    """A sweep that cannot start or continue as asked; the message says why and what to do."""


@dataclass(frozen=True)
class SweepOutcome:
    name: str
    metric: str
    mode: str
    max_t: int
    parent_run_id: str
    trials: tuple[TrialSummary, ...]  # best first
    best_config: str | None  # the written fine-tune YAML (None: no trial finished an epoch)
    registered_version: str | None
    champion: bool
    output_dir: str
    wall_s: float
    resumed: bool
    trial_time_s: float  # all trials' time
    trial_time_full_s: float  # estimated, had every trial run to max_t

    @property
    def best(self) -> TrialSummary | None:
        return self.trials[0] if self.trials and not math.isnan(self.trials[0].best) else None

    @property
    def table(self) -> str:
        return format_table(self.trials, self.metric)


def _trial_dirname(trial) -> str:
    """Trial directories and names are the trial ids (module level: Tune pickles it for restore)."""
    return trial.trial_id


def run_sweep(plan: SweepPlan, *, output_dir: str | Path | None = None) -> SweepOutcome:
    """Run, or resume, the sweep `plan.cfg.name` to the end; see the module docstring."""
    import ray
    from ray import tune as ray_tune

    cfg = plan.cfg
    t0 = time.monotonic()
    if not ray.is_initialized():
        ray.init()
    parent = _parent_run(plan)
    ctx = TrialContext(plan, parent)
    trainable = ray_tune.with_resources(ray_tune.with_parameters(run_trial, ctx=ctx), {"CPU": cfg.trial.driver_cpus})
    resumed = ray_tune.Tuner.can_restore(plan.experiment_path)
    if resumed:
        logger.info("sweep %s: resuming the experiment at %s", cfg.name, plan.experiment_path)
        tuner = ray_tune.Tuner.restore(plan.experiment_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        logger.info("sweep %s: %d trial(s), %d at once, metric %s (%s), %s search, %s; experiment at %s", cfg.name,
                    cfg.num_samples, cfg.max_concurrent_trials, plan.metric, plan.mode, cfg.search,
                    "no early stopping" if cfg.asha is None else
                    f"ASHA grace {cfg.asha.grace_period} rf {cfg.asha.reduction_factor:g} max_t {plan.max_t}",
                    plan.experiment_path)
        tuner = ray_tune.Tuner(trainable, param_space=param_space(cfg), tune_config=_tune_config(plan),
                               run_config=ray_tune.RunConfig(
                                   name=cfg.name, storage_path=plan.storage_path,
                                   failure_config=ray_tune.FailureConfig(max_failures=cfg.trial.max_failures),
                                   checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=1)))
    ok = False
    try:
        grid = tuner.fit()
        trials = rank(_summaries(plan, grid, parent), plan.mode)
        out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix=f"sweep-{cfg.name}-"))
        out.mkdir(parents=True, exist_ok=True)
        outcome = _finish(plan, parent, trials, out, resumed, time.monotonic() - t0)
        ok = True
        return outcome
    finally:
        end_run(plan.base.tracking.tracking_uri, parent, ok)


def _tune_config(plan: SweepPlan):
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    cfg = plan.cfg
    points = [dict(p) for p in cfg.points_to_evaluate] or None
    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher, limit = OptunaSearch(points_to_evaluate=points, seed=cfg.seed), cfg.max_concurrent_trials
    else:  # Tune ignores max_concurrent_trials for a variant generator it did not make: the generator limits
        searcher, limit = BasicVariantGenerator(points_to_evaluate=points, random_state=cfg.seed,
                                                max_concurrent=cfg.max_concurrent_trials), None
    scheduler = FIFOScheduler() if cfg.asha is None else ASHAScheduler(
        time_attr="epoch", max_t=plan.max_t, grace_period=cfg.asha.grace_period,
        reduction_factor=cfg.asha.reduction_factor)
    return ray_tune.TuneConfig(metric=plan.metric, mode=plan.mode, num_samples=cfg.num_samples,
                               max_concurrent_trials=limit, scheduler=scheduler,
                               search_alg=searcher, reuse_actors=False, trial_name_creator=_trial_dirname,
                               trial_dirname_creator=_trial_dirname)


# =============================================================================================================
# MLflow


def _parent_run(plan: SweepPlan) -> str:
    """The sweep's MLflow run, new or continued; SweepError if the run in the registry is another config's."""
    cfg, tracking = plan.cfg, plan.base.tracking
    params = {k: v for k, v in flatten(to_dict(cfg)).items() if not k.startswith("space.")}
    params.update({f"space.{k}": d.describe() for k, d in cfg.space.items()})
    params.update({"metric": plan.metric, "mode": plan.mode, "max_t": plan.max_t, "storage": plan.storage_path})
    run_id = start_or_resume_run(tracking.tracking_uri, tracking.experiment, name=cfg.name,
                                 key=run_key(f"sweep:{cfg.name}", plan.storage_path), params=params,
                                 tags={"task": plan.base.task, "ofa.kind": "sweep", FINGERPRINT_TAG: plan.fingerprint})
    client, _ = client_for(tracking.tracking_uri)
    found = client.get_run(run_id).data.tags.get(FINGERPRINT_TAG)
    if found != plan.fingerprint:
        end_run(tracking.tracking_uri, run_id, False)
        raise SweepError(f"sweep {cfg.name} at {plan.storage_path} was started with another configuration "
                         f"(MLflow run {run_id}: fingerprint {found}, now {plan.fingerprint}); a sweep resumes only "
                         "unchanged: give a new name (name=...) to start another sweep")
    return run_id


def _child_runs(plan: SweepPlan, parent: str) -> dict[str, Any]:
    client, uri = client_for(plan.base.tracking.tracking_uri)
    exp = experiment_id(client, uri, plan.base.tracking.experiment)
    runs = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'", max_results=10_000)
    return {r.data.tags[TRIAL_TAG]: r for r in runs if TRIAL_TAG in r.data.tags}


def _summaries(plan: SweepPlan, grid, parent: str) -> list[TrialSummary]:
    """One summary per trial, from its reported results (deduplicated by epoch: a restarted trial may have
    reported an epoch again)."""
    runs = _child_runs(plan, parent)
    out = []
    for result in grid:
        trial_id = Path(result.path).name
        df = result.metrics_dataframe
        curve: dict[int, float] = {}
        spent = 0.0
        if df is not None and plan.metric in df.columns:
            for _, row in df.iterrows():
                if not math.isnan(row.get("epoch", math.nan)) and not math.isnan(row[plan.metric]):
                    curve[int(row["epoch"])] = float(row[plan.metric])
                    spent = max(spent, float(row.get("trial_time_s", 0.0)))
        points = tuple(sorted(curve.items()))
        pick = max if plan.mode == "max" else min
        best_epoch, best = pick(points, key=lambda p: p[1]) if points else (0, math.nan)
        error = None if result.error is None else f"{type(result.error).__name__}: {result.error}"
        epochs = max(curve, default=0)
        config = result.config or _params_file(result)
        params = {k: config[k] for k in plan.cfg.space if k in config}
        run = runs.get(trial_id)
        out.append(TrialSummary(trial_id, params, points, best, best_epoch, epochs,
                                stopped_early=error is None and epochs < plan.max_t, error=error,
                                trial_time_s=spent, run_name=trial_run_name(plan.cfg.name, trial_id),
                                mlflow_run_id=run.info.run_id if run else None))
    return out


def _params_file(result) -> dict[str, Any]:
    """The trial's params.json (a trial that failed before reporting has no config in its result)."""
    try:
        with result.filesystem.open_input_stream(f"{result.path}/params.json") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return {}


def _finish(plan: SweepPlan, parent: str, trials: list[TrialSummary], out: Path, resumed: bool,
            wall_s: float) -> SweepOutcome:
    cfg, tracking = plan.cfg, plan.base.tracking
    client, _ = client_for(tracking.tracking_uri)
    for t in trials:
        if t.mlflow_run_id is None:
            continue
        for k, v in {"tune.epochs_run": t.epochs, "tune.stopped_early": str(t.stopped_early).lower(),
                     f"tune.best_{plan.metric}": t.best}.items():
            client.set_tag(t.mlflow_run_id, k, str(v))
        # ended by the scheduler mid-run: still RUNNING when its actor died, or FAILED when the training noticed
        # the stop first (Tune itself recorded no error for the trial)
        if (t.stopped_early and t.error is None
                and client.get_run(t.mlflow_run_id).info.status in ("RUNNING", "FAILED")):
            client.set_terminated(t.mlflow_run_id, status="KILLED")
    spent, full = savings(trials, plan.max_t)
    best = trials[0] if trials and not math.isnan(trials[0].best) else None
    parent_log = MetricLogger(tracking.tracking_uri, parent)
    best_config, version, champion = None, None, False
    if best is not None:
        best_config = str(_write_best_config(plan, best, out / BEST_CONFIG))
        version, champion = _register(plan, parent, best, client)
        parent_log.log({f"best/{plan.metric}": best.best, "trials": len(trials),
                        "trials_stopped_early": sum(t.stopped_early for t in trials),
                        "trial_time_s": spent, "trial_time_full_s": full}, step=0)
        parent_log.set_tags({"best_trial": best.trial_id, "best_run_id": best.mlflow_run_id or ""})
    else:
        logger.warning("sweep %s: no trial finished an epoch; nothing to select", cfg.name)
    text = format_table(trials, plan.metric)
    head = (f"sweep {cfg.name}: {len(trials)} trial(s), {plan.metric} ({plan.mode}), {cfg.search} search, "
            + ("no early stopping" if cfg.asha is None else
               f"ASHA grace {cfg.asha.grace_period} rf {cfg.asha.reduction_factor:g} max_t {plan.max_t}")
            + f"; trial time {spent / 60:.1f} min (every trial to the end: ~{full / 60:.1f} min)")
    (out / "summary.txt").write_text(head + "\n\n" + text + "\n")
    write_csv(trials, out / "trials.csv")
    plot(trials, plan.metric, plan.max_t, out / "metric_vs_epoch.png", f"{cfg.name}: {plan.metric} per epoch")
    parent_log.log_artifacts(out, "sweep")
    outcome = SweepOutcome(cfg.name, plan.metric, plan.mode, plan.max_t, parent, tuple(trials), best_config,
                           version, champion, str(out), wall_s, resumed, spent, full)
    (out / "sweep.json").write_text(json.dumps(outcome_dict(outcome), indent=2, default=str))
    parent_log.client.log_artifact(parent, str(out / "sweep.json"), "sweep")
    return outcome


def outcome_dict(outcome: SweepOutcome) -> dict[str, Any]:
    """JSON-ready: the outcome without the per-trial curves, plus the best trial."""
    best = outcome.best
    return {"name": outcome.name, "metric": outcome.metric, "mode": outcome.mode, "parent_run_id": outcome.parent_run_id,
            "trials": len(outcome.trials), "stopped_early": sum(t.stopped_early for t in outcome.trials),
            "errors": sum(t.error is not None for t in outcome.trials),
            "best_trial": None if best is None else {"trial": best.trial_id, "params": best.params,
                                                     "value": best.best, "epoch": best.best_epoch,
                                                     "mlflow_run_id": best.mlflow_run_id},
            "best_config": outcome.best_config, "registered_version": outcome.registered_version,
            "champion": outcome.champion, "output_dir": outcome.output_dir, "wall_s": round(outcome.wall_s, 1),
            "resumed": outcome.resumed, "trial_time_s": round(outcome.trial_time_s, 1),
            "trial_time_full_s": round(outcome.trial_time_full_s, 1)}


def _write_best_config(plan: SweepPlan, best: TrialSummary, path: Path) -> Path:
    """The base fine-tune config with the best trial's values, run name `<sweep>-best`, as written by the user
    (storage and tracking not pinned), registering under the base's registered model."""
    from ofa_model.config_files import build
    from pipelines.train.train_config import TrainConfig
    from tune.search import apply_params

    raw = apply_params(to_dict(plan.user_base), best.params, plan.cfg.tie)
    raw["run"]["name"] = f"{plan.cfg.name}-best"
    cfg = build(TrainConfig, raw, f"sweep {plan.cfg.name} best trial {best.trial_id}")
    values = ", ".join(f"{k}={format_value(v)}" for k, v in sorted(best.params.items()))
    path.write_text(
        f"# Best trial {best.trial_id} of sweep {plan.cfg.name}: {plan.metric} {best.best:.6g} at epoch "
        f"{best.best_epoch} of {best.epochs}\n# ({values}).\n# Base {plan.cfg.base} with the sweep's `train` "
        f"settings and these values. Fine-tune with:\n#   python -m jobs.finetune --config {path.name}\n"
        + dump_yaml(cfg))
    return path


def _register(plan: SweepPlan, parent: str, best: TrialSummary, client) -> tuple[str | None, bool]:
    """Register the best trial's best bundle and move `champion` only on improvement (once per sweep: a
    resumed, finished sweep reuses the parent's record)."""
    from pipelines.tracking.registry import promote_if_better, register_bundle

    name = plan.base.tracking.registered_model
    if name is None:
        logger.info("sweep %s: tracking.registered_model is null: best bundle not registered", plan.cfg.name)
        return None, False
    tags = client.get_run(parent).data.tags
    if VERSION_TAG in tags:
        return tags[VERSION_TAG], tags.get(CHAMPION_TAG) == "true"
    if best.mlflow_run_id is None:
        raise SweepError(f"sweep {plan.cfg.name}: best trial {best.trial_id} has no MLflow run under parent {parent}")
    source, meta = _best_bundle(plan, best, client)
    uri = plan.base.tracking.tracking_uri
    version = register_bundle(name, source, run_id=best.mlflow_run_id, metric=plan.metric.removeprefix("val/"),
                              value=best.best, split=plan.base.validation.split,
                              data_fingerprint=meta.get("data_fingerprint", ""), mode=plan.mode, tracking=uri,
                              tags={"task": plan.base.task, "run": best.run_name, "sweep": plan.cfg.name,
                                    "trial": best.trial_id})
    champion = promote_if_better(name, version, tracking=uri)
    MetricLogger(uri, parent).set_tags({VERSION_TAG: version, CHAMPION_TAG: str(champion).lower()})
    logger.info("sweep %s: best trial %s registered as %s version %s%s", plan.cfg.name, best.trial_id, name, version,
                " (champion)" if champion else " (champion unchanged)")
    return version, champion


def _best_bundle(plan: SweepPlan, best: TrialSummary, client) -> tuple[str, Mapping[str, Any]]:
    """(artifact URI of the trial's best bundle, its metadata). A trial that finished has logged it; for one
    stopped early it is copied here from its best checkpoint in storage."""
    import pyarrow.fs as pafs

    from pipelines import storage
    from pipelines.train import BUNDLE_DIR, state_summaries

    run_id = best.mlflow_run_id
    with tempfile.TemporaryDirectory(prefix="sweep-bundle-") as tmp:
        if any(a.path == f"{BUNDLE_DIR}/config.json" for a in client.list_artifacts(run_id, BUNDLE_DIR)):
            meta = json.loads(Path(client.download_artifacts(run_id, f"{BUNDLE_DIR}/config.json", tmp)).read_text())
            return f"{client.get_run(run_id).info.artifact_uri}/{BUNDLE_DIR}", meta.get("metadata", {})
        run_dir = storage.join(plan.runs_path, best.run_name)
        candidates = []
        for summary in state_summaries(plan.runs_path, best.run_name, plan.base.data.s3):  # whole ones only
            value = summary.get("metrics", {}).get(plan.metric)
            if summary.get("epoch_done") and value is not None:
                candidates.append((value, summary["path"]))
        if not candidates:
            raise SweepError(f"sweep {plan.cfg.name}: no finished-epoch checkpoint with {plan.metric} under {run_dir}")
        _, ckpt = (max if plan.mode == "max" else min)(candidates)
        fs, path = storage.resolve(ckpt, plan.base.data.s3)
        local = Path(tmp) / BUNDLE_DIR
        local.mkdir()
        pafs.copy_files(f"{path}/{BUNDLE_DIR}", str(local), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        meta = json.loads((local / "config.json").read_text()).get("metadata", {})
        source = MetricLogger(plan.base.tracking.tracking_uri, run_id).log_artifacts(local, BUNDLE_DIR)
        shutil.rmtree(local, ignore_errors=True)
        logger.info("sweep %s: trial %s stopped early; its best bundle (%s) logged from %s", plan.cfg.name,
                    best.trial_id, plan.metric, ckpt)
        return source, meta
