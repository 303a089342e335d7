"""The object store during a fine-tune (issue 28).

* Stopped for 20 s: the run completes with the same metrics as an uninterrupted run with the same seed. The
  outage is a SIGSTOP of the session's SeaweedFS process (`weed mini`, one process; its port stays open, so S3
  calls hang as behind a stalled store) after rank 0's fifth step, with mid-epoch checkpoints every 10 steps and
  shard reads going on, and SIGCONT 20 s later.
* Lost for good as a checkpoint upload begins (SIGKILL of a SeaweedFS of the test's own, holding the run's
  checkpoints; the corpus is local): `python -m jobs.finetune` fails soon with one error line naming the run and
  its storage; nothing records the checkpoint cut short (Ray's record, the checkpoint summaries); the same
  command, once the store is back on its data, continues from the last checkpoint that is whole there. The job
  runs in a subprocess with a Ray of its own, whose S3 is the test's store, not the session's."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from mlflow import MlflowClient

from ofa_model.bundle import load_bundle
from ofa_model.config_files import to_dict
from pipelines import storage
from pipelines.data.converters import prepare
from pipelines.local.ray_settings import LOCAL_RAY_ENV
from pipelines.local.s3 import BUCKET, CONFLICTING_ENV, S3Server, start_weed_retrying, stop_weed
from pipelines.train import latest_state_summary, read_state, train
from tests.test_train import config

OUTAGE_S = 20.0
ROOT = Path(__file__).resolve().parents[1]


def _weed_pid(endpoint: str) -> int:
    port = endpoint.rsplit(":", 1)[1]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                args = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"weed") and f"-s3.port={port}".encode() in args:
                return int(d.name)
    raise RuntimeError(f"no weed on port {port}")


def _run(corpus: str, s3_server, tmp_path: Path, name: str, outage: dict | None):
    cfg = config(corpus, tmp_path / name, name, max_steps_per_epoch=40, data={"batch_size": 2},
                 run={"storage_path": s3_server.uri("ray-results"), "checkpoint_every_steps": 10},
                 tracking={"system_metrics_every_s": 0.0, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    blinker = None
    if outage is not None:
        pid = _weed_pid(s3_server.endpoint)

        def blink() -> None:
            client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
            deadline = time.monotonic() + 200
            while time.monotonic() < deadline:
                exp = client.get_experiment_by_name("test-train")
                runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'") \
                    if exp else []
                if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 5:
                    break
                time.sleep(0.2)
            else:
                return
            outage["from"] = time.time()
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(OUTAGE_S)
            finally:
                os.kill(pid, signal.SIGCONT)
            outage["to"] = time.time()

        blinker = threading.Thread(target=blink, daemon=True)
        blinker.start()
    try:
        out = train(cfg, output_dir=tmp_path / name / "out")
    finally:
        if blinker is not None:
            blinker.join(OUTAGE_S + 10)
            os.kill(pid, signal.SIGCONT)
    history = MlflowClient(tracking_uri=cfg.tracking.tracking_uri).get_metric_history(out.mlflow_run_id,
                                                                                      "train/loss")
    return out, sorted((m.step, m.value, m.timestamp) for m in history)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_finetune_outlives_an_object_store_outage_with_the_same_metrics(s3_server, tmp_path, ray_cluster):
    corpus = s3_server.uri("store-outage")
    prepare("easy-vqa", {}, corpus, limit=60)
    base, base_losses = _run(corpus, s3_server, tmp_path, "store-base", None)
    outage: dict[str, float] = {}
    out, losses = _run(corpus, s3_server, tmp_path, "store-outage", outage)
    assert "to" in outage, "the training ended before its fifth step"
    during = [s for s, _, t in losses if outage["from"] * 1000 <= t <= outage["to"] * 1000]
    logging.getLogger(__name__).warning("store outage %.1f s: steps logged during it %s; final %s",
                                        outage["to"] - outage["from"], during, out.metrics)
    assert out.step == base.step == 40
    same = {k: v for k, v in base.metrics.items() if k != "val/seconds"}
    assert {k: out.metrics[k] for k in same} == same
    assert [s for s, _, _ in losses] == [s for s, _, _ in base_losses] == list(range(1, 41))
    assert [v for _, v, _ in losses] == pytest.approx([v for _, v, _ in base_losses], rel=1e-5)


def _job_env(server: S3Server) -> dict[str, str]:
    """The environment of a job whose S3 is `server` and whose Ray is its own (RAY_ADDRESS=local)."""
    env = {k: v for k, v in os.environ.items() if k not in CONFLICTING_ENV}
    return {**env, **server.env(), **LOCAL_RAY_ENV, "RAY_ADDRESS": "local"}


def _point_at(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's S3 (boto3, pyarrow) at `server`, as the session's `s3_server` fixture does for its own."""
    for name in CONFLICTING_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)


def _finetune(cfg_path: Path, server: S3Server) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.finetune", "--config", str(cfg_path)], cwd=ROOT,
                          env=_job_env(server), capture_output=True, text=True, timeout=270)


def _stored(server: S3Server, run_prefix: str) -> dict[str, dict[str, int]]:
    """Checkpoint directory name -> {file under it: size} of what the store holds for the run."""
    out: dict[str, dict[str, int]] = {}
    for page in server.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=run_prefix + "/"):
        for obj in page.get("Contents", []):
            parts = obj["Key"][len(run_prefix) + 1:].split("/", 1)
            if parts[0].startswith("checkpoint_") and len(parts) == 2 and parts[1] and not parts[1].endswith("/"):
                out.setdefault(parts[0], {})[parts[1]] = obj["Size"]
    return out


def _loads(uri: str, tmp: Path) -> int | None:
    """The step of the checkpoint at `uri` if its training state and its bundle load from the store, else None."""
    try:
        state = read_state(uri)
        fs, path = storage.resolve(uri)
        local = tmp / uri.rsplit("/", 1)[1]
        local.mkdir(parents=True)
        pafs.copy_files(f"{path}/bundle", str(local), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        load_bundle(local)
    except (OSError, ValueError, RuntimeError, EOFError):
        return None
    return state["step"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_store_lost_at_a_checkpoint_upload_fails_the_run_soon_and_a_rerun_continues_from_what_is_stored(
        tmp_path, monkeypatch):
    corpus = str(tmp_path / "corpus")  # local: the store that goes holds the run's checkpoints only
    prepare("easy-vqa", {}, corpus, limit=60)
    # checkpoints at step 2 (mid-epoch) and 3 (epoch 1's end), then 4 and 6 (epoch 2); one restart allowed
    cfg = config(corpus, tmp_path, "lost", epochs=2, max_steps_per_epoch=3, data={"batch_size": 2},
                 run={"storage_path": f"s3://{BUCKET}/runs", "checkpoint_every_steps": 2, "max_failures": 1},
                 tracking={"system_metrics_every_s": 0.0})
    cfg_path = tmp_path / "lost.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(cfg)))
    data = tmp_path / "weed-data"
    data.mkdir()
    proc, server = start_weed_retrying(tmp_path / "weed", data_dir=data)
    _point_at(server, monkeypatch)
    killed: dict = {}

    def kill_as_the_second_upload_begins() -> None:
        deadline = time.monotonic() + 250
        while time.monotonic() < deadline and proc.poll() is None:
            stored = _stored(server, "runs/lost")
            if len(stored) >= 2:
                proc.kill()
                killed.update(at=time.monotonic(), stored=stored)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_as_the_second_upload_begins, daemon=True)
    watcher.start()
    try:
        failed = _finetune(cfg_path, server)
        ended = time.monotonic()
    finally:
        watcher.join(5)
        stop_weed(proc)
    assert "at" in killed, f"no second checkpoint upload began:\n{failed.stderr[-3000:]}"
    errors = [line for line in failed.stderr.splitlines() if line.startswith("python -m jobs.finetune: error:")]
    logging.getLogger(__name__).warning("store killed with %s stored; the job exited %d, %.1f s later: %s",
                                        killed["stored"], failed.returncode, ended - killed["at"], errors)
    assert failed.returncode == 1 and len(errors) == 1, failed.stderr[-3000:]
    assert "run lost: " in errors[0] and f"{BUCKET}/runs/lost" in errors[0] and "could not be" in errors[0]
    assert "rerun with the same run.name and run.storage_path once the store is back" in errors[0]
    assert "the checkpoint of step 3 could not be stored in s3://test-bucket/runs/lost" in failed.stderr
    assert ended - killed["at"] < 150  # upload retries, one restart (max_failures=1) failing to read, Ray's exit

    proc, server = start_weed_retrying(tmp_path / "weed-again", data_dir=data)  # the store back, on its data
    try:
        _point_at(server, monkeypatch)
        stored = _stored(server, "runs/lost")
        run_dir = f"s3://{BUCKET}/runs/lost"
        steps = {d: _loads(f"{run_dir}/{d}", tmp_path / "read") for d in stored}
        whole = {d: step for d, step in steps.items() if step is not None}
        assert whole and len(whole) < len(stored), f"the upload was not cut short: {stored}"
        snapshot = json.loads(storage.read_bytes(f"{run_dir}/checkpoint_manager_snapshot.json"))
        recorded = {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
        recorded.add(snapshot["latest_checkpoint_result"]["checkpoint_dir_name"])
        assert recorded <= whole.keys(), (recorded, stored)  # Ray Train's record: whole checkpoints only
        summary = latest_state_summary(f"s3://{BUCKET}/runs", "lost")
        assert summary["path"].rsplit("/", 1)[1] in whole and summary["step"] == max(whole.values()) == 2
        mlflow = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
        experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        [run] = mlflow.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'lost'")
        assert run.info.status == "FAILED"

        done = _finetune(cfg_path, server)  # the same command again
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout)
        assert (out["mlflow_run_id"], out["epochs_done"], out["step"]) == (run.info.run_id, 2, 6)
        assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"
        resumed = mlflow.get_metric_history(run.info.run_id, "train/resumed_from_step")
        assert [(m.step, m.value) for m in resumed] == [(2, 2.0)]
        assert latest_state_summary(f"s3://{BUCKET}/runs", "lost")["step"] == 6
    finally:
        stop_weed(proc)
