"""Training on the real stack: Ray Train on the session's local Ray, data and checkpoints on SeaweedFS (S3),
MLflow on sqlite, ofa-micro on a small easy-VQA corpus.

Each run is a few optimizer steps: these tests check the plumbing (sharding, checkpoints, resume, restarts,
registry, evaluation), not learning; the learning curve is a benchmark (bench/).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from ofa_model import metrics as M
from ofa_model.config_files import build
from ofa_model.evaluation import evaluate_rows
from ofa_model.precision import Execution
from ofa_model.predictor import OFAPredictor
from pipelines import storage
from pipelines.data.converters import prepare
from pipelines.data.shards import read_manifest
from pipelines.tracking.registry import resolve_model
from pipelines.train import STATE_JSON, TrainOutcome, latest_state_summary, read_state, steps_per_epoch, train
from pipelines.train.train_config import TrainConfig
from pipelines.train.worker import in_row_order, validation_rows
from tests.recipes import supplied

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ANSWERS = ["yes", "no", "circle", "rectangle", "triangle", "black", "blue", "brown", "gray", "green", "red",
           "teal", "yellow"]


@pytest.fixture(scope="module")
def corpus(s3_server) -> str:
    uri = s3_server.uri("train-corpus")
    prepare("easy-vqa", {}, uri, limit=60)
    return uri


def config(corpus: str, tmp: Path, name: str, **sections) -> TrainConfig:
    raw = {
        "task": "vqa", "answers": ANSWERS, "epochs": 1, "max_steps_per_epoch": 3, "seed": 0,
        # preprocessing in the read tasks: no actor start per epoch (the two-worker test keeps the actor pool)
        "data": {"uri": corpus, "tasks": ["vqa"], "batch_size": 8, "num_actors": [1, 1], "actor_num_cpus": 0.25,
                 "read_num_cpus": 0.25, "progress_every_s": 600.0, "preprocess_on": "tasks",
                 "preprocess": {"patch_image_size": 32, "max_src_length": 24, "max_tgt_length": 6}},
        "model": {"arch": "ofa-micro"},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.1},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.25},
        "run": {"name": name, "storage_path": str(tmp / "ray-results"), "log_every_s": 0.0},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "test-train",
                     "registered_model": f"ofa-vqa-{name}"},
        "validation": {"split": "test", "max_rows": 16, "batch_size": 16, "mode": "allcand"},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return build(TrainConfig, raw)


def _mlflow(cfg: TrainConfig) -> MlflowClient:
    uri = cfg.tracking.tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_two_worker_finetune_over_s3_logs_registers_and_keeps_the_champion_rule(corpus, s3_server, tmp_path,
                                                                               ray_cluster):
    cfg = config(corpus, tmp_path, "ft2", scaling={"num_workers": 2}, data={"preprocess_on": "actors"},
                 run={"storage_path": s3_server.uri("ray-results")}, tracking={"registered_model": "ofa-vqa-ft"})
    out = train(cfg, output_dir=tmp_path / "out1")
    assert (out.epochs_done, out.step) == (1, 3)
    assert out.registered_version == "1" and out.champion
    assert out.best_checkpoint.startswith("s3://") or "test-bucket" in out.best_checkpoint
    client = _mlflow(cfg)
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["scaling.num_workers"] == "2"
    assert run.data.tags["train.world_size"] == "2"
    manifest = read_manifest(corpus)
    assert run.data.tags["data_fingerprint"] == manifest.fingerprint
    steps = [m.step for m in client.get_metric_history(out.mlflow_run_id, "train/loss")]
    assert steps == [1, 2, 3]  # rank 0 alone logs, once per update (log_every_s=0)
    score = out.metrics["val/vqa_score"]
    assert [m.value for m in client.get_metric_history(out.mlflow_run_id, "val/vqa_score")] == [
        pytest.approx(score)]
    assert out.metrics["val/rows"] == 16

    # the champion resolves to the bundle trained here, with what it was trained with
    resolved = resolve_model("models:/ofa-vqa-ft@champion", tracking=cfg.tracking.tracking_uri,
                             cache_dir=tmp_path / "cache")
    meta = json.loads((resolved.path / "config.json").read_text())
    assert meta["metadata"]["task"] == "vqa" and meta["metadata"]["data_fingerprint"] == manifest.fingerprint
    assert meta["preprocess"]["patch_image_size"] == 32
    version = client.get_model_version("ofa-vqa-ft", "1")
    assert version.tags["task"] == "vqa" and float(version.tags["metric.vqa_score"]) == pytest.approx(score)
    assert (version.tags["metric_split"], version.tags["data_fingerprint"]) == ("test", manifest.fingerprint)

    # validation was sharded over the two ranks: the gathered metric is the one a single process computes with
    # the saved bundle (the weights validated) on the same rows, in the same precision and memory format
    execution = Execution.resolve(cfg.run.precision, cfg.run.memory_format, torch.device("cpu"))
    predictor = OFAPredictor.from_bundle(resolved.path, max_batch_size=cfg.validation.batch_size,
                                         precision=execution.precision, memory_format=execution.memory_format)
    alone = evaluate_rows(predictor, "vqa", validation_rows(cfg, cfg.validation.max_rows), mode="allcand")
    assert alone.metrics["rows"] == 16 and alone.metrics["vqa_score"] == pytest.approx(score, abs=1e-12)

    # a second run registers version 2; the champion moves only if its metric is strictly better
    cfg2 = config(corpus, tmp_path, "ft2b", optim={"lr": 3e-3}, tracking={"registered_model": "ofa-vqa-ft"})
    out2 = train(cfg2, output_dir=tmp_path / "out2")
    assert out2.registered_version == "2"
    assert out2.champion == (out2.metrics["val/vqa_score"] > score)
    champ = client.get_model_version_by_alias("ofa-vqa-ft", "champion")
    assert str(champ.version) == ("2" if out2.champion else "1")


def test_sharded_validation_records_return_to_row_order():
    rows = [{"id": i} for i in range(7)]
    for world in (1, 2, 3, 8):
        parts = [rows[rank::world] for rank in range(world)]  # what rank r predicts: rows r, r + world, ...
        assert in_row_order(parts) == rows


def test_a_rerun_with_the_same_name_continues_at_the_next_epoch(corpus, tmp_path, ray_cluster):
    cfg = config(corpus, tmp_path, "resume")
    first = train(cfg, output_dir=tmp_path / "a")
    assert (first.epochs_done, first.step) == (1, 3)
    again = train(config(corpus, tmp_path, "resume", epochs=2), output_dir=tmp_path / "b")
    assert (again.epochs_done, again.step) == (2, 6)
    assert again.mlflow_run_id == first.mlflow_run_id  # the same MLflow run continues
    summary = latest_state_summary(cfg.run.storage_path, "resume")
    state = read_state(summary["path"])
    assert state["epoch"] == 1 and state["epoch_done"] and state["step"] == 6
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {6}  # the optimizer's own step count went on from 3, not from 0
    assert state["scheduler"]["last_epoch"] == 6
    resumed = _mlflow(cfg).get_metric_history(first.mlflow_run_id, "train/resumed_from_step")
    assert [m.value for m in resumed] == [3.0]
    losses = [m.step for m in _mlflow(cfg).get_metric_history(first.mlflow_run_id, "train/loss")]
    assert losses == [1, 2, 3, 4, 5, 6]  # the loss curve continues where it stopped


def test_an_answer_file_is_read_by_the_driver_and_stored_in_the_bundle(corpus, tmp_path, ray_cluster):
    from ofa_model.bundle import load_bundle

    answers = tmp_path / "answers.txt"
    answers.write_text("\n".join(ANSWERS) + "\n")
    cfg = config(corpus, tmp_path, "answerfile", answers=str(answers), validation={"max_rows": 4})
    out = train(cfg, output_dir=tmp_path / "o")
    assert load_bundle(out.bundle).answer_sets == {"vqa": tuple(ANSWERS)}
    # validated in allcand mode with no candidates per row: the predictor scored the run's set
    assert out.metrics["val/rows"] == 4 and out.metrics["val/errors"] == 0


def test_one_worker_runs_all_its_epochs_in_one_fit(corpus, tmp_path, ray_cluster):
    cfg = config(corpus, tmp_path, "onefit", epochs=2, validation={"max_rows": 4, "full_at_end": True},
                 tracking={"system_metrics_every_s": 0.5})
    out = train(cfg, output_dir=tmp_path / "o")
    assert (out.epochs_done, out.step) == (2, 6)
    client = _mlflow(cfg)
    assert [m.step for m in client.get_metric_history(out.mlflow_run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    # the run's progress (the progress helper's figures) and rank 0's machine (MLflow's system metrics)
    fraction = [m.value for m in client.get_metric_history(out.mlflow_run_id, "progress/fraction")]
    assert fraction == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1])
    cpu = client.get_metric_history(out.mlflow_run_id, "system/cpu_utilization_percentage")
    assert sorted(m.step for m in cpu) == list(range(len(cpu))) and len(cpu) >= 2
    assert 0 < client.get_run(out.mlflow_run_id).data.metrics["system/system_memory_usage_megabytes"]
    # the worker's 0.25 CPUs give it one intra-op thread, not PyTorch's default of every core
    assert client.get_run(out.mlflow_run_id).data.tags["train.threads"] == "1"
    # validated after each epoch: 4 rows after the first, the whole test split (full_at_end) after the last
    test_rows = read_manifest(corpus).counts["test"]["vqa"]
    rows = sorted((m.step, m.value) for m in client.get_metric_history(out.mlflow_run_id, "val/rows"))
    assert rows == [(3, 4.0), (6, float(test_rows))] and test_rows > 4
    # each epoch's end is a checkpoint (two kept: run.keep_checkpoints)
    summaries = [json.loads(storage.read_bytes(uri)) for uri in
                 storage.list_files(storage.join(cfg.run.storage_path, "onefit"), suffix=STATE_JSON)]
    assert sorted((s["epoch"], s["step"]) for s in summaries if s["epoch_done"]) == [(0, 3), (1, 6)]
    # one fit: the second epoch did not start a worker group that loaded the first epoch's checkpoint
    assert client.get_metric_history(out.mlflow_run_id, "train/resumed_from_step") == []
    state = read_state(latest_state_summary(cfg.run.storage_path, "onefit")["path"])
    assert state["epoch"] == 1 and state["epoch_done"] and state["scheduler"]["last_epoch"] == 6


def test_a_time_budget_ends_the_run_after_the_epoch_that_leaves_no_room_and_validates_it_as_the_last(
        corpus, tmp_path, ray_cluster):
    """run.time_budget_s: a budget already spent when the first epoch ends (a fit's start alone takes seconds)
    stops the run there, with the whole split validated (validation.full_at_end) as a last epoch would be; the
    same run again without a budget continues to its epochs."""
    cfg = config(corpus, tmp_path, "budget", epochs=4, validation={"max_rows": 4, "full_at_end": True},
                 run={"time_budget_s": 1.0})
    out = train(cfg, output_dir=tmp_path / "o")
    assert (out.epochs_done, out.step) == (1, 3)
    client = _mlflow(cfg)
    test_rows = read_manifest(corpus).counts["test"]["vqa"]
    assert sorted((m.step, m.value) for m in client.get_metric_history(out.mlflow_run_id, "val/rows")) == [
        (3, float(test_rows))]
    assert [(m.step, m.value) for m in client.get_metric_history(out.mlflow_run_id, "train/stopped_by_budget")] \
        == [(3, 1.0)]
    again = train(config(corpus, tmp_path, "budget", epochs=2, validation={"max_rows": 4, "full_at_end": True}),
                  output_dir=tmp_path / "o2")
    assert (again.epochs_done, again.step) == (2, 6)


def test_two_workers_train_every_epoch_in_one_fit_each_reading_its_part(corpus, tmp_path, ray_cluster):
    """Two workers, two whole epochs, one fit: no worker group starts again from a checkpoint between the epochs,
    and each rank reads its part of every epoch (`plan_part`: the longer half first), so together they train on
    every row once an epoch, stopping together when the shorter part runs out."""
    cfg = config(corpus, tmp_path, "twofit", epochs=2, max_steps_per_epoch=None, scaling={"num_workers": 2},
                 data={"batch_size": 16}, validation={"max_rows": 4})
    rows = read_manifest(corpus).counts["train"]["vqa"]
    parts = ((rows + 1) // 2, rows // 2)
    steps = min(math.ceil(n / 16) for n in parts)  # every rank runs as many steps as the first to run out
    trained = sum(min(n, 16 * steps) for n in parts)
    out = train(cfg, output_dir=tmp_path / "o")
    assert (out.epochs_done, out.step) == (2, 2 * steps)
    client = _mlflow(cfg)
    losses = client.get_metric_history(out.mlflow_run_id, "train/loss")
    assert [m.step for m in losses] == list(range(1, 2 * steps + 1))
    assert client.get_metric_history(out.mlflow_run_id, "train/resumed_from_step") == []  # one fit
    for key, want in (("data/rows_ok", trained), ("data/rows_bad", 0)):
        got = sorted((m.step, m.value) for m in client.get_metric_history(out.mlflow_run_id, key))
        assert got == [(steps, want), (2 * steps, want)], key  # both ranks' rows, none twice: rows_ok <= rows
    assert rows - 1 <= trained <= rows
    state = read_state(latest_state_summary(cfg.run.storage_path, "twofit")["path"])
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["scheduler"]["last_epoch"] == 2 * steps


def test_a_checkpoint_of_two_workers_resumes_with_one(corpus, tmp_path, ray_cluster):
    """Two workers train the first epoch; the run continued with one worker (as after a lost node, elastic or
    rerun) goes on from that checkpoint: the optimizer's own step count goes on, the schedule goes on at the same
    share of the run (one worker's epoch has twice the updates), and the one worker reads every row of the next
    epoch. The world size is in MLflow at the fit's start and at every epoch's end."""
    two = config(corpus, tmp_path, "shrink", max_steps_per_epoch=None, scaling={"num_workers": 2},
                 data={"batch_size": 16}, validation={"max_rows": 4})
    rows = read_manifest(corpus).counts["train"]["vqa"]
    s1 = min(math.ceil(n / 16) for n in ((rows + 1) // 2, rows // 2))  # as the two-worker test above
    first = train(two, output_dir=tmp_path / "a")
    assert (first.epochs_done, first.step) == (1, s1)
    saved = read_state(latest_state_summary(two.run.storage_path, "shrink")["path"])
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2 and saved["scheduler"]["last_epoch"] == s1

    one = config(corpus, tmp_path, "shrink", max_steps_per_epoch=None, epochs=2, scaling={"num_workers": 1},
                 data={"batch_size": 16}, validation={"max_rows": 4})
    again = train(one, output_dir=tmp_path / "b")
    s2 = math.ceil(rows / 16)  # one worker, every row, the last batch short
    assert (again.epochs_done, again.step) == (2, s1 + s2) and again.mlflow_run_id == first.mlflow_run_id
    state = read_state(latest_state_summary(one.run.storage_path, "shrink")["path"])
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {s1 + s2}
    # the schedule, planned over 2 epochs: rows // 32 updates an epoch for two workers, rows // 16 for one
    planned_two, planned_one = 2 * (rows // 32), 2 * (rows // 16)
    assert state["scheduler"]["last_epoch"] == round(s1 * planned_one / planned_two) + s2
    assert state["world_size"] == 1 and len(state["rng"]) == 1
    client = _mlflow(one)
    sizes = [(m.step, m.value) for m in sorted(client.get_metric_history(again.mlflow_run_id, "train/world_size"),
                                                key=lambda m: (m.timestamp, m.step))]
    assert sizes == [(0, 2.0), (s1, 2.0), (s1, 1.0), (s1 + s2, 1.0)]
    ok = sorted((m.step, m.value) for m in client.get_metric_history(again.mlflow_run_id, "data/rows_ok"))
    assert ok == [(s1, sum(min(n, 16 * s1) for n in ((rows + 1) // 2, rows // 2))), (s1 + s2, rows)]


def test_a_mixture_epoch_lasts_until_its_first_source_runs_out(tmp_path):
    rows = {"vqa": 38575, "image_classification": 3837}
    mixed = config("s3://b/c", tmp_path, "m", max_steps_per_epoch=None, mixture={"vqa": 3, "image_classification": 1})
    # image classification has a quarter of the slots: it runs out after 4 * 3837 rows of the mixture
    assert steps_per_epoch(mixed, rows, 1) == (4 * 3837) // 8 == 1918
    assert steps_per_epoch(mixed, rows, 2) == (4 * 3837) // 16
    even = config("s3://b/c", tmp_path, "m", max_steps_per_epoch=None, mixture={"vqa": 1, "image_classification": 1})
    assert steps_per_epoch(even, rows, 1) == (2 * 3837) // 8
    rare = config("s3://b/c", tmp_path, "m", max_steps_per_epoch=None, mixture={"vqa": 1, "image_classification": 0.01})
    assert steps_per_epoch(rare, rows, 1) == 38575 * 1.01 // 8 == 4870  # vqa runs out first (at 38575 * 1.01 rows)
    single = config("s3://b/c", tmp_path, "m", max_steps_per_epoch=None)
    assert steps_per_epoch(single, {"vqa": 38575}, 1) == 38575 // 8
    assert steps_per_epoch(config("s3://b/c", tmp_path, "m"), {"vqa": 38575}, 1) == 3  # max_steps_per_epoch


def _train_worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "RayTrainWorker" in line and "ps -eo" not in line]


def _train_and_kill_a_worker(cfg: TrainConfig, out_dir: Path, when) -> tuple[TrainOutcome, int | None]:
    """Run `train(cfg)` in a thread and SIGKILL a training worker the first time `when(summary)` holds for the
    run's newest checkpoint summary; (the outcome, the checkpoint step seen at the kill or None)."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("out", train(cfg, output_dir=out_dir)), daemon=True)
    thread.start()
    killed = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and thread.is_alive():
        summary = latest_state_summary(cfg.run.storage_path, cfg.run.name)
        pids = _train_worker_pids()
        if summary is not None and when(summary) and pids:
            killed = summary["step"]
            os.kill(pids[0], signal.SIGKILL)
            break
        time.sleep(0.05)
    thread.join(timeout=300)
    return result.get("out"), killed


def test_a_killed_worker_restarts_from_the_last_checkpoint(corpus, tmp_path, ray_cluster):
    """Two workers, both epochs in one fit; killed inside the second epoch, the group restarts there, each rank
    reading its part of the rows the checkpoint left: the epoch trains exactly its steps' rows, none twice."""
    cfg = config(corpus, tmp_path, "fault", epochs=2, max_steps_per_epoch=30,
                 run={"checkpoint_every_steps": 4, "max_failures": 2}, scaling={"num_workers": 2},
                 data={"batch_size": 4})
    # the second mid-epoch checkpoint of the epoch: Ray has registered the first by then (a checkpoint uploaded
    # but not yet registered when its worker dies is dropped, and the restart takes the one before)
    out, killed = _train_and_kill_a_worker(
        cfg, tmp_path / "o", lambda s: s["epoch"] == 1 and not s["epoch_done"] and s["step"] >= 40)
    assert killed is not None, "no mid-epoch checkpoint of the second epoch appeared while the run was going"
    assert (out.epochs_done, out.step) == (2, 60)
    client = _mlflow(cfg)
    resumed = client.get_metric_history(out.mlflow_run_id, "train/resumed_from_step")
    assert len(resumed) == 1 and 36 <= resumed[0].value <= killed and resumed[0].value % 4 == 0
    assert sorted(m.step for m in client.get_metric_history(out.mlflow_run_id, "val/vqa_score")) == [30, 60]
    # 30 steps of 4 rows on each of 2 ranks, the rows before the restart counted once (rank 0 carries them)
    ok = sorted((m.step, m.value) for m in client.get_metric_history(out.mlflow_run_id, "data/rows_ok"))
    assert ok == [(30, 240), (60, 240)]


def test_a_killed_one_worker_run_restarts_inside_its_later_epoch(corpus, tmp_path, ray_cluster):
    """One worker runs both epochs in one fit; killed in the second, it restarts there, not at the first."""
    cfg = config(corpus, tmp_path, "fault1", epochs=2, max_steps_per_epoch=40, data={"batch_size": 4},
                 run={"checkpoint_every_steps": 4, "max_failures": 2})
    out, killed = _train_and_kill_a_worker(
        cfg, tmp_path / "o", lambda s: s["epoch"] == 1 and not s["epoch_done"] and s["step"] >= 48)
    assert killed is not None, "no mid-epoch checkpoint of the second epoch appeared while the run was going"
    assert (out.epochs_done, out.step) == (2, 80)
    client = _mlflow(cfg)
    resumed = client.get_metric_history(out.mlflow_run_id, "train/resumed_from_step")
    assert len(resumed) == 1 and 44 <= resumed[0].value <= killed and resumed[0].value % 4 == 0
    validated = sorted(m.step for m in client.get_metric_history(out.mlflow_run_id, "val/vqa_score"))
    assert validated == [40, 80]  # the first epoch was not redone


def test_evaluate_an_official_format_bundle_writes_metrics_of_its_predictions(corpus, tmp_path):
    from tests.test_checkpoint import TrainingConfig, synthetic_official_state  # noqa: F401 - pickled class

    ckpt = tmp_path / "ofa_tiny.pt"
    torch.save({"model": synthetic_official_state(seed=3)}, ckpt)
    bundle = tmp_path / "bundle"
    subprocess.run([os.sys.executable, "-m", "jobs.convert_checkpoint", "--input", str(ckpt), "--arch", "ofa-tiny",
                    "--gpt2-vocab", "--output", str(bundle), "--patch-image-size", "64", "--max-src-length", "40",
                    "--max-tgt-length", "8"], check=True, capture_output=True)
    out_dir = tmp_path / "eval"
    done = subprocess.run([os.sys.executable, "-m", "jobs.evaluate", "--model", str(bundle), "--data", corpus,
                           "--task", "vqa", "--split", "test", "--limit", "20", "--mode", "allcand",
                           "--candidates", ",".join(ANSWERS), "--output", str(out_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    metrics = json.loads((out_dir / "metrics.json").read_text())["metrics"]
    records = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 20 and len({r["id"] for r in records}) == 20
    assert all(r["prediction"] in ANSWERS for r in records)
    # the metric recomputed from the predictions file alone, with the metric functions
    expected = sum(M.vqa_score_weighted(r["prediction"], r["reference"], r["reference_weights"])
                   for r in records) / 20
    assert metrics["vqa_score"] == pytest.approx(expected, abs=1e-12)
    assert printed["metrics"]["vqa_score"] == pytest.approx(expected, abs=1e-12)
    ids = {r["id"] for r in records}
    assert all(i.startswith("easy-vqa/test/vqa/") for i in ids)
    # the precision flags reach the predictor: plain contiguous fp32 gives the default's answers; fp16 needs CUDA
    plain = subprocess.run([os.sys.executable, "-m", "jobs.evaluate", "--model", str(bundle), "--data", corpus,
                            "--task", "vqa", "--split", "test", "--limit", "20", "--mode", "allcand",
                            "--candidates", ",".join(ANSWERS), "--memory-format", "contiguous",
                            "--output", str(tmp_path / "eval-plain")], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    plain_records = [json.loads(line) for line in (tmp_path / "eval-plain/predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in plain_records] == [r["prediction"] for r in records]
    fp16 = subprocess.run([os.sys.executable, "-m", "jobs.evaluate", "--model", str(bundle), "--data", corpus,
                           "--task", "vqa", "--precision", "fp16"], capture_output=True, text=True, timeout=300)
    assert fp16.returncode == 2 and "fp16 needs a CUDA device" in fp16.stderr


def test_bad_configs_fail_before_anything_starts(corpus, tmp_path, capsys):
    from jobs.finetune import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: vqa\ndata: {{uri: {corpus}}}\noptim: {{lr: 2.0e+1}}\n")
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(cfg)])
    assert exc.value.code == 2
    assert "optim.lr: Input should be less than or equal to 10" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(cfg), "optim.lr=1e-4", "task=nope"])
    assert "unknown task 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(cfg), "optim.lr=1e-4", "custom_tasks={vqa: '[IMAGE:image] x -> [TEXT:target]'}"])
    assert "cannot replace a built-in task" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # labels name the mixture's other tasks; the main task's set is answers
        main(["--config", str(cfg), "optim.lr=1e-4", "labels={vqa: [yes]}"])
    assert "labels.vqa: labels are for the mixture's other tasks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(cfg), "optim.lr=1e-4", "mixture={vqa: 3, image_classification: 1}",
              "labels={image_classification: []}"])
    assert "labels.image_classification.list: Tuple should have at least 1 item" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(cfg), "optim.lr=1e-4", "scaling.threads_per_worker=0"])
    assert "scaling.threads_per_worker: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_every_recipe_loads():
    from ofa_model.config_files import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    recipes = sorted([*root.glob("finetune/*.yaml"), *root.glob("pretrain/*.yaml")])
    loaded = {p.stem: load_config(TrainConfig, p, supplied(p)) for p in recipes}
    assert len(loaded) >= 13
    multitask = loaded["vqa_easyvqa_multitask"]
    assert multitask.mixture == {"vqa": 3, "image_classification": 1}
    assert multitask.labels == {"image_classification": ("circle", "rectangle", "triangle")}
    assert set(multitask.labels["image_classification"]) < set(multitask.answers)


def test_storage_paths_are_listed_for_resume(tmp_path):
    assert latest_state_summary(str(tmp_path), "nothing-here") is None
    run = tmp_path / "r" / "checkpoint_1"
    run.mkdir(parents=True)
    (run / "train_state.json").write_text(json.dumps({"epoch": 0, "step": 4, "epoch_done": False, "metrics": {}}))
    (run / "train_state.pt").write_bytes(b"state")
    later = tmp_path / "r" / "checkpoint_2"
    later.mkdir()
    (later / "train_state.json").write_text(json.dumps({"epoch": 0, "step": 8, "epoch_done": True, "metrics": {}}))
    (later / "train_state.pt").write_bytes(b"state")
    (tmp_path / "r" / "checkpoint_3").mkdir()
    (tmp_path / "r" / "checkpoint_3" / "train_state.json").write_text("{half written")
    (tmp_path / "r" / "checkpoint_3" / "train_state.pt").write_bytes(b"state")
    cut = tmp_path / "r" / "checkpoint_4"  # an upload cut short: the summary without its state
    cut.mkdir()
    (cut / "train_state.json").write_text(json.dumps({"epoch": 1, "step": 12, "epoch_done": True, "metrics": {}}))
    got = latest_state_summary(str(tmp_path), "r")
    assert got["step"] == 8 and got["epoch_done"] and got["path"] == storage.join(str(tmp_path), "r", "checkpoint_2")
    # summaries that list their checkpoint's files count only when every file is there at its size
    listed = [("checkpoint_5", 16, b"w" * 10), ("checkpoint_6", 20, b"w" * 9), ("checkpoint_7", 24, None)]
    for name, step, weights in listed:
        d = tmp_path / "r" / name
        (d / "bundle").mkdir(parents=True)
        (d / "train_state.pt").write_bytes(b"state")
        if weights is not None:
            (d / "bundle" / "model.safetensors").write_bytes(weights)
        (d / "train_state.json").write_text(json.dumps({
            "epoch": 1, "step": step, "epoch_done": False, "metrics": {},
            "files": {"train_state.pt": 5, "bundle/model.safetensors": 10}}))
    got = latest_state_summary(str(tmp_path), "r")  # 6: its weights cut short; 7: without weights
    assert got["step"] == 16 and got["path"] == storage.join(str(tmp_path), "r", "checkpoint_5")


def test_self_critical_caption_training_runs_with_cider_rewards(corpus, tmp_path, ray_cluster):
    cfg = config(corpus, tmp_path, "scst", task="caption", answers=[], max_steps_per_epoch=2,
                 data={"tasks": ["caption"], "batch_size": 4},
                 scst={"enabled": True, "samples": 2, "max_len_b": 4},
                 validation={"max_rows": 8, "mode": None}, tracking={"registered_model": None})
    out = train(cfg, output_dir=tmp_path / "o")
    assert (out.epochs_done, out.step) == (1, 2)
    client = _mlflow(cfg)
    rewards = client.get_metric_history(out.mlflow_run_id, "train/scst_reward")
    assert [m.step for m in rewards] == [1, 2] and all(m.value >= 0.0 for m in rewards)
    assert "val/cider" in out.metrics and out.registered_version is None


def test_model_dims_resize_a_named_architecture_and_bad_dims_name_the_key():
    from ofa_model import OFAModel
    from ofa_model.config_files import load_config
    from ofa_model.errors import ConfigError
    from pipelines.train.train_config import TrainConfig

    path = Path(__file__).resolve().parents[1] / "configs/finetune/vqa_easyvqa_multitask.yaml"
    cfg = load_config(TrainConfig, path, ["model.dims={embed_dim: 128, ffn_dim: 512}"])
    arch = cfg.model.architecture()
    assert (arch.name, arch.embed_dim, arch.ffn_dim, arch.encoder_layers) == (
        "ofa-micro[embed_dim=128,ffn_dim=512]", 128, 512, 2)
    assert OFAModel(arch).encoder.embed_tokens.weight.shape[1] == 128
    for bad, message in [("model.dims={embd_dim: 128}", r"model.dims.embd_dim.\[key\]: Input should be 'embed_dim'"),
                         ("model.dims={embed_dim: 0}", "model.dims.embed_dim: Input should be greater than or equal "
                                                       "to 1"),
                         ("model.dims={embed_dim: 130}", "not divisible by attention_heads 4"),
                         ("model.init=/nowhere", None)]:
        overrides = [bad] if message is not None else [bad, "model.dims={embed_dim: 128}"]
        with pytest.raises(ConfigError, match=message or "model.dims / model.init: dims are the sizes of a model trained from scratch"):
            load_config(TrainConfig, path, overrides)
