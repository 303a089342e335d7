"""Sweeps: the config checks (no Ray), then a real sweep of ofa-micro on a small easy-VQA corpus (Ray Tune and
Train on the session's local Ray, Tune's experiment and the checkpoints on SeaweedFS, MLflow on sqlite).

One sweep (three trials of two epochs of three updates; its driver killed mid-way, then resumed) serves the
three sweep tests: early stopping and MLflow nesting, resume, and the best config reproducing its trial. They
check the plumbing, not the search; bench/tune.py measures a real sweep.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from ofa_model.config_files import dump_yaml, load_config
from ofa_model.errors import ConfigError
from pipelines.train import latest_state_summary
from pipelines.train.train_config import TrainConfig
from tests import test_train
from tests.recipes import supplied
from tests.test_train import config
from tune.report import TrialSummary, rank, savings, table
from tune.search import load_sweep_config, param_space, plan_sweep

ROOT = Path(__file__).resolve().parents[1]
corpus = test_train.corpus  # the small easy-VQA corpus on S3 (a module fixture)
GOOD_LR, BAD_LR = 3e-3, 1e-7  # BAD_LR leaves the model as initialised: it loses at ASHA's first rung


def _sweep_file(tmp: Path, body: dict, name: str = "sweep.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _plan(tmp: Path, **changes):
    body = {"name": "s", "base": str(ROOT / "configs/finetune/vqa_easyvqa.yaml"),
            "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}}
    body.update(changes)
    return plan_sweep(load_sweep_config(_sweep_file(tmp, body)), source="sweep.yaml")


# =============================================================================================================
# Configs (no Ray)


def test_every_task_sweep_config_checks_against_its_base(monkeypatch):
    monkeypatch.chdir(ROOT)  # bases are relative to the working directory
    metrics = {}
    for path in sorted((ROOT / "configs/tune").glob("*.yaml")):
        cfg = load_sweep_config(path, supplied(path))
        if cfg.search == "optuna" and importlib.util.find_spec("optuna") is None:
            with pytest.raises(ConfigError, match="optuna needs the optuna package"):
                plan_sweep(cfg, source=path.name)
            cfg = load_sweep_config(path, supplied(path, ["search=random"]))
        plan = plan_sweep(cfg, source=path.name)
        metrics[path.stem] = (plan.base.task, plan.metric, plan.max_t)
        if path.stem == "vqa_easyvqa_fast":  # issue 29's search: the multi-task recipe's rate, ResNet and mixture
            assert {"optim.lr", "model.dims.resnet_width", "mixture.image_classification"} <= set(cfg.space)
            continue
        assert {"optim.lr", "optim.warmup_ratio", "optim.label_smoothing", "optim.weight_decay",
                "model.regularization.encoder_drop_path", "data.batch_size",
                "optim.freeze_embeddings"} <= set(cfg.space), path.name
    assert metrics == {
        "caption": ("caption", "val/cider", 5), "grounding": ("grounding", "val/acc50", 5),
        "image_classification": ("image_classification", "val/accuracy", 4),
        "summarization": ("summarization", "val/rouge_l", 3),
        "text_classification": ("glue_sst2", "val/accuracy", 5), "visual_entailment": ("visual_entailment",
                                                                                        "val/accuracy", 5),
        "vqa": ("vqa", "val/vqa_score", 5), "vqa_easyvqa": ("vqa", "val/vqa_score", 4),
        "vqa_easyvqa_fast": ("vqa", "val/vqa_score", 4)}


@pytest.mark.parametrize(("changes", "message"), [
    ({"space": {"optim.lr": {"logunifrom": [1e-4, 1e-2]}}}, "space.optim.lr: expected one of"),
    ({"space": {"optim.rate": {"uniform": [0.1, 0.2]}}}, "'rate' is not a key of optim"),
    ({"space": {"model.dims.width": {"choice": [16]}}}, "'width' is not a key of model.dims (known: embed_dim"),
    ({"space": {"model.dims.resnet_width.x": {"choice": [16]}}}, "model.dims is a value, not a section"),
    ({"space": {"model.dims.resnet_width": {"choice": [4]}}}, "resnet_width must lie in [8, 256]"),
    ({"space": {"optim": {"uniform": [0.1, 0.2]}}}, "optim is a section"),
    ({"space": {"optim.lr": {"loguniform": [0.0, 1e-2]}}}, "loguniform: low must be > 0"),
    ({"space": {"optim.lr": {"uniform": [1e-2, 1e-4]}}}, "low < high"),
    ({"space": {"optim.lr": {"loguniform": [1e-4, 20.0]}}}, "space.optim.lr=20.0: optim.lr: Input should be less than or equal to 10"),
    ({"space": {"data.batch_size": {"uniform": [8, 32]}}}, "an integer key takes choice or grid values"),
    ({"space": {"optim.freeze_embeddings": {"choice": ["yes"]}}}, "optim.freeze_embeddings"),
    ({"tie": {"model.regularization.decoder_drop_path": "model.regularization.encoder_drop_path"}},
     "not a key of space"),
    ({"points_to_evaluate": [{"optim.momentum": 0.9}]}, "points_to_evaluate[0]: ['optim.momentum'] not in space"),
    ({"asha": {"grace_period": 9}}, "asha.grace_period (9) exceeds the trials' epochs (4"),
    ({"train": {"optim": {"lr": "fast"}}}, "optim.lr: Input should be a valid number"),
    ({"serach": "optuna"}, "serach: unknown key"),
    ({"base": "configs/finetune/nope.yaml"}, "base: configs/finetune/nope.yaml is not a file"),
    ({"space": {"optim.lr": {"grid": [1e-4]}}, "search": "optuna"}, None),
])
def test_bad_sweep_configs_fail_naming_the_key(tmp_path, changes, message):
    if message is None:  # optuna with grid values: a clear error with or without optuna installed
        message = "cannot take grid values" if importlib.util.find_spec("optuna") else "optuna needs the optuna"
    with pytest.raises(ConfigError) as exc:
        _plan(tmp_path, **changes)
    assert message in str(exc.value)


def test_optuna_missing_is_a_clear_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'ofa-ray\[tune\]'"):
        _plan(tmp_path, search="optuna")


def test_optuna_tpe_suggests_inside_the_space(tmp_path):
    pytest.importorskip("optuna")
    from tune.runner import _tune_config

    plan = _plan(tmp_path, search="optuna", space={"optim.lr": {"loguniform": [1e-4, 1e-2]},
                                                   "data.batch_size": {"choice": [16, 32]}})
    searcher = _tune_config(plan).search_alg
    assert searcher.set_search_properties(plan.metric, plan.mode, param_space(plan.cfg))
    for i in range(4):
        params = searcher.suggest(f"t{i}")
        assert 1e-4 <= params["optim.lr"] <= 1e-2 and params["data.batch_size"] in (16, 32)


def test_overrides_trial_configs_and_ties(tmp_path):
    path = _sweep_file(tmp_path, {
        "name": "s", "base": str(ROOT / "configs/finetune/vqa_easyvqa.yaml"), "train": {"epochs": 3},
        "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]},
                  "model.regularization.encoder_drop_path": {"uniform": [0.0, 0.2]}},
        "tie": {"model.regularization.decoder_drop_path": "model.regularization.encoder_drop_path"}})
    cfg = load_sweep_config(path, ["num_samples=3", "train.optim.weight_decay=0.05",
                                   "space={optim.lr: {choice: [1.0e-3, 2.0e-3]}}"])
    assert cfg.num_samples == 3 and cfg.space["optim.lr"].choice == (1e-3, 2e-3)
    plan = plan_sweep(cfg)
    assert plan.max_t == 3 and plan.base.optim.weight_decay == 0.05
    assert plan.base.tracking.tracking_uri.startswith("sqlite:////")  # pinned: trials run elsewhere
    trial = plan.trial_config({"optim.lr": 2e-3, "model.regularization.encoder_drop_path": 0.15}, "s-t1")
    reg = trial.model.regularization
    assert (trial.optim.lr, reg.encoder_drop_path, reg.decoder_drop_path) == (2e-3, 0.15, 0.15)
    assert trial.run.name == "s-t1" and trial.run.storage_path == plan.runs_path
    assert trial.tracking.registered_model is None and plan.base.tracking.registered_model == "ofa-vqa"
    with pytest.raises(ConfigError, match="space keys are whole dotted names"):
        load_sweep_config(path, ["space.optim.lr={choice: [1.0e-3]}"])


def test_the_cli_checks_the_task_before_starting_anything(tmp_path, capsys):
    from jobs.sweep import main

    with pytest.raises(SystemExit) as exc:
        main(["--task", "caption", "--config", str(ROOT / "configs/tune/vqa_easyvqa.yaml")])
    assert exc.value.code == 2
    assert "tunes task 'vqa'" in capsys.readouterr().err


def test_table_ranks_best_first_and_savings_estimate_stopped_epochs():
    def trial(tid, best, epochs, stopped, time_s):
        curve = tuple((e, best) for e in range(1, epochs + 1)) if not math.isnan(best) else ()
        return TrialSummary(tid, {"optim.lr": 1e-3}, curve, best, epochs if curve else 0, epochs, stopped, None,
                            time_s, f"s-{tid}")
    trials = [trial("a", 0.5, 4, False, 400.0), trial("b", 0.7, 4, False, 400.0), trial("c", 0.2, 1, True, 120.0),
              trial("d", math.nan, 0, False, 0.0)]
    ranked = rank(trials, "max")
    assert [t.trial_id for t in ranked] == ["b", "a", "c", "d"]
    assert [t.trial_id for t in rank(trials, "min")] == ["c", "a", "b", "d"]
    assert savings(trials, 4) == (920.0, 920.0 + 3 * 120.0)
    lines = table(ranked, "val/vqa_score").splitlines()
    assert lines[0].split() == ["#", "trial", "optim.lr", "val/vqa_score", "at", "epoch", "epochs", "stopped",
                                "early", "minutes"]
    assert lines[2].split()[:4] == ["1", "b", "0.001", "0.7000"] and lines[4].split()[-3:] == ["1", "yes", "2.0"]


# =============================================================================================================
# Real sweeps

def _base(data_uri: str, tmp: Path, name: str, **sections) -> Path:
    path = tmp / f"{name}-base.yaml"
    path.write_text(dump_yaml(config(data_uri, tmp, name, epochs=2, **sections)))
    return path


def _terminated_trials(path: str) -> set[str]:
    """Trials Tune's saved experiment state has as TERMINATED (finished, or stopped by the scheduler)."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id for t in ExperimentAnalysis(path).trials if t.status == "TERMINATED"}
    except Exception:  # not written yet, or being written
        return set()


def _trial_runs(client: MlflowClient, sweep: str) -> dict[str, object]:
    exp = client.get_experiment_by_name("test-train")
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`ofa.sweep` = '{sweep}'")
    return {r.data.tags["tune.trial_id"]: r for r in runs}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_epoch_report_passes_finished_epochs_to_tune_but_the_last(ray_cluster, tmp_path):
    """Ray Train's report channel into a Tune trial, as the sweep's trials use it: epoch ends only (mid-epoch
    checkpoints report too), counted from 1, each after its checkpoint; the last epoch is the trial's to report."""
    import tempfile as tmp

    import ray.train
    from ray import tune as ray_tune
    from ray.train.torch import TorchTrainer

    from tune.trial import EpochReport

    def loop(_):
        for epoch in range(3):
            ray.train.report({"epoch": epoch - 1, "step": 10 * epoch + 5, "val/acc": 0.0, "epoch_done": False})
            with tmp.TemporaryDirectory() as d:
                ray.train.report({"epoch": epoch, "step": 10 * epoch + 10, "val/acc": 0.1 * (epoch + 1),
                                  "epoch_done": True}, checkpoint=ray.train.Checkpoint.from_directory(d))

    def trainable(_):
        TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.25}),
                     run_config=ray.train.RunConfig(name="fit", storage_path=str(tmp_path / "train"),
                                                    callbacks=[EpochReport("val/acc", 3, time.time())])).fit()

    grid = ray_tune.Tuner(ray_tune.with_resources(trainable, {"CPU": 0.25}),
                          run_config=ray_tune.RunConfig(name="t", storage_path=str(tmp_path / "tune"))).fit()
    assert grid[0].error is None
    df = grid[0].metrics_dataframe
    assert list(df["epoch"]) == [1, 2] and list(df["step"]) == [10, 20]
    assert list(df["val/acc"]) == pytest.approx([0.1, 0.2])
    assert all(df["checkpoint_path"].str.contains("checkpoint_")) and df["trial_time_s"].is_monotonic_increasing


def _first_epoch_saved(plan, run_name: str) -> bool:
    summary = latest_state_summary(plan.runs_path, run_name)
    return summary is not None and (summary["epoch"], summary["epoch_done"]) >= (0, True)


@pytest.fixture(scope="module")
def sweep(corpus, s3_server, ray_cluster, tmp_path_factory):
    """One sweep on S3, three trials one at a time, run by `python -m jobs.sweep` in a subprocess (a second
    driver on the session's cluster) that is killed mid-sweep, then resumed here with `run_sweep`.

    Trials in grid order: a learning rate that learns; one that leaves the model as initialised, which ASHA
    stops at its first rung (below the first trial's epoch-1 score); another that learns, during whose second
    epoch the driver is killed: by then Tune's saved state has the first two TERMINATED."""
    import ray

    from tune.runner import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    path = _sweep_file(tmp, {
        "name": "sweep", "base": str(_base(corpus, tmp, "sweep")),
        "space": {"optim.lr": {"grid": [GOOD_LR, BAD_LR, GOOD_LR * 0.7]}},
        "num_samples": 1, "max_concurrent_trials": 1, "asha": {"grace_period": 1, "reduction_factor": 2},
        "storage_path": s3_server.uri("tune"), "trial": {"driver_cpus": 0.25}})
    plan = plan_sweep(load_sweep_config(path))
    client = MlflowClient(tracking_uri=plan.base.tracking.tracking_uri)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    log = (tmp / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "jobs.sweep", "--task", "vqa", "--config", str(path)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    before: dict[str, tuple] = {}
    deadline = time.monotonic() + 600  # generous: a loaded 2-core machine runs this 2-3x slower
    try:
        # Poll MLflow and the checkpoint summaries (cheap, so the few seconds of the third trial's second epoch
        # are not missed): trials run one at a time, so once the third run exists the first two have ended;
        # Tune's saved state is read after the kill, and checked below.
        while time.monotonic() < deadline and driver.poll() is None and not before:
            runs = _trial_runs(client, "sweep")
            newest = max(runs.values(), key=lambda r: r.info.start_time, default=None)
            # the third trial's first epoch's checkpoint is in storage (its state and summary), its second epoch
            # under way
            if len(runs) == 3 and _first_epoch_saved(plan, newest.info.run_name):
                driver.kill()  # the sweep's driver dies mid-sweep: two trials done, one mid-way
                driver.wait(timeout=60)
                done = _terminated_trials(plan.experiment_path)
                for tid, run in _trial_runs(client, "sweep").items():
                    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
                    before[tid] = (tid in done, run.info.end_time, steps)
            time.sleep(0.2)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver.wait(timeout=60)
        log.close()
    assert before, "no point with two finished trials and one running was seen:\n" + \
        (tmp / "driver.log").read_text()[-3000:]
    assert sum(was_done for was_done, _, _ in before.values()) == 2, \
        f"Tune's saved state at the kill: {before}\n" + (tmp / "driver.log").read_text()[-3000:]
    return plan, run_sweep(plan, output_dir=tmp / "out"), before


@pytest.mark.slow
@pytest.mark.timeout(900)  # the sweep fixture runs with the first test that uses it
def test_asha_stops_a_losing_trial_early_and_mlflow_nests_the_trials(sweep):
    plan, out, _ = sweep
    by_lr = {t.params["optim.lr"]: t for t in out.trials}
    assert sorted(by_lr) == sorted([GOOD_LR, GOOD_LR * 0.7, BAD_LR]) and all(t.error is None for t in out.trials)
    bad = by_lr[BAD_LR]
    assert bad.stopped_early and bad.epochs == 1 and [e for e, _ in bad.curve] == [1]  # from Tune's results
    for lr in (GOOD_LR, GOOD_LR * 0.7):
        assert not by_lr[lr].stopped_early and [e for e, _ in by_lr[lr].curve] == [1, 2]
    assert bad.curve[0][1] < by_lr[GOOD_LR].curve[0][1]
    assert out.best is not None and out.best.params["optim.lr"] != BAD_LR
    assert out.trial_time_full_s > out.trial_time_s  # the stopped trial's missing epoch

    client = MlflowClient(tracking_uri=plan.base.tracking.tracking_uri)
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == out.best.trial_id
    assert parent.data.metrics[f"best/{plan.metric}"] == pytest.approx(out.best.best)
    artifacts = {a.path for a in client.list_artifacts(out.parent_run_id, "sweep")}
    assert {"sweep/best_config.yaml", "sweep/metric_vs_epoch.png", "sweep/summary.txt", "sweep/trials.csv"} <= artifacts
    for t in out.trials:
        run = client.get_run(t.mlflow_run_id)
        assert run.data.tags["mlflow.parentRunId"] == out.parent_run_id and run.data.tags["tune.trial_id"] == t.trial_id
        assert run.data.tags["tune.stopped_early"] == str(t.stopped_early).lower()
        # a stopped trial's training ends with its actor (KILLED); a fast one may have finished before the stop
        assert run.info.status in (("KILLED", "FINISHED") if t.stopped_early else ("FINISHED",))
        assert run.data.params["optim.lr"] == str(t.params["optim.lr"])
        history = client.get_metric_history(t.mlflow_run_id, plan.metric)
        assert [m.value for m in history][:t.epochs] == pytest.approx([v for _, v in t.curve])

    # the best bundle is registered and, being the first, the champion
    assert out.registered_version == "1" and out.champion
    version = client.get_model_version(plan.base.tracking.registered_model, "1")
    assert version.run_id == out.best.mlflow_run_id and version.tags["trial"] == out.best.trial_id
    assert float(version.tags[f"metric.{plan.metric.removeprefix('val/')}"]) == pytest.approx(out.best.best)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_interrupted_sweep_resumed_without_rerunning_finished_trials(sweep):
    plan, out, before = sweep
    assert out.resumed and len(out.trials) == 3 and sorted(before) == sorted(t.trial_id for t in out.trials)
    client = MlflowClient(tracking_uri=plan.base.tracking.tracking_uri)
    for t in out.trials:
        was_done, end_time, steps_before = before[t.trial_id]
        steps = [m.step for m in client.get_metric_history(t.mlflow_run_id, "train/loss")]
        if was_done:  # not run again: not one more update, and a finished run ended once, before the kill
            assert steps == steps_before
            if not t.stopped_early:
                assert steps == [1, 2, 3, 4, 5, 6] and client.get_run(t.mlflow_run_id).info.end_time == end_time
        else:  # continued from its first epoch's checkpoint: the first epoch's updates were not trained again
            assert t.epochs == 2 and not t.stopped_early
            assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6] and [steps.count(s) for s in (1, 2, 3)] == [1, 1, 1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_best_config_fine_tunes_to_the_best_trials_metric(sweep, capsys):
    from jobs.finetune import main

    plan, out, _ = sweep
    best = load_config(TrainConfig, out.best_config)
    assert best.optim.lr == out.best.params["optim.lr"] and best.run.name == "sweep-best"
    assert best.tracking.registered_model == plan.base.tracking.registered_model
    capsys.readouterr()
    main(["--config", out.best_config])
    out_text = capsys.readouterr().out
    # the job's summary is the last thing on stdout; Ray forwards its own log lines (a raylet warning about
    # worker starts) to the driver's stdout before it
    printed = json.loads(out_text[out_text.rindex("\n{\n") + 1:] if not out_text.startswith("{\n") else out_text)
    assert printed["epochs_done"] == 2
    job_curve = [m.value for m in MlflowClient(tracking_uri=plan.base.tracking.tracking_uri).get_metric_history(
        printed["mlflow_run_id"], plan.metric)]
    assert printed["metrics"][plan.metric] == pytest.approx(out.best.best, abs=0.07), \
        f"trial {out.best.trial_id} curve {out.best.curve}, the job's {job_curve}"
    # the champion moves only if this run beats the sweep's best (a tie leaves it)
    assert printed["registered_version"] == "2"
    assert printed["champion"] == (printed["metrics"][plan.metric] > out.best.best)


def test_a_space_key_may_name_an_entry_of_a_mapping(tmp_path):
    """model.dims.<size> and mixture.<task> are searched like any value key, and reach the trial's config."""
    plan = _plan(tmp_path, base=str(ROOT / "configs/finetune/vqa_easyvqa_multitask.yaml"),
                 space={"model.dims.resnet_width": {"choice": [16, 32]},
                        "mixture.image_classification": {"choice": [1.0, 2.0]}})
    cfg = plan.trial_config({"model.dims.resnet_width": 16, "mixture.image_classification": 2.0}, "t",
                            storage_path=str(tmp_path))
    assert cfg.model.dims == {"embed_dim": 128, "ffn_dim": 512, "resnet_width": 16}
    assert cfg.mixture == {"vqa": 3.0, "image_classification": 2.0}
    assert cfg.model.architecture().resnet_out_channels == 256
