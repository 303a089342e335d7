"""Training survives the tracking server going away (issue 28): rank 0's metrics are buffered while MLflow is
away and delivered when it is back, or counted as dropped in a warning; the run is not marked failed because
MLflow blinked, and the end of a run waits for the server up to `tracking.server_wait_s`, then fails loudly.

The outage is a SIGSTOP of the server's process group: its port stays open, so calls hang as they would
behind a stalled server, and SIGCONT brings it back with its database intact."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.data.converters import prepare
from pipelines.local.s3 import free_ports
from pipelines.local.services import Service, start_mlflow_server, venv_env
from pipelines.tracking.runs import MetricLogger, patiently
from pipelines.train import train
from tests.test_train import config

OUTAGE_S = 20.0


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[Service]:
    """An MLflow server of its own (sqlite, artifacts on local disk), stopped by process group."""
    service = start_mlflow_server(tmp_path / "srv", str(tmp_path / "srv" / "artifacts"), venv_env(), timeout_s=90)
    try:
        yield service
    finally:
        os.killpg(service.proc.pid, signal.SIGCONT)  # a test that failed mid-outage must not leave it stopped
        service.stop(grace_s=15)


def _unreachable(monkeypatch) -> str:
    """A tracking URI nobody listens on, with MLflow's own HTTP retries off (they take ~4 minutes)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    [port] = free_ports(1)
    return f"http://127.0.0.1:{port}"


def test_metrics_for_a_server_that_never_comes_back_are_counted_dropped_without_blocking(monkeypatch, caplog):
    uri = _unreachable(monkeypatch)
    log = MetricLogger(uri, "0" * 32, background=True)
    began = time.monotonic()
    for step in range(1, 51):
        log.log({"train/loss": 1.0 / step, "train/lr": 1e-3}, step)
    log.set_tags({"train.device": "cpu"})
    assert time.monotonic() - began < 0.5  # the training loop does not wait on the server
    with caplog.at_level(logging.WARNING, logger="pipelines.tracking.runs"):
        assert log.close(3.0) == 101
    assert log.sent == 0
    assert any("101 metric/tag values" in r.getMessage() and "did not come back" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(RuntimeError, match="closed"):
        log.log({"train/loss": 0.1}, 51)


def test_the_end_of_a_run_waits_for_the_server_then_fails_loudly(monkeypatch):
    uri = _unreachable(monkeypatch)
    calls = []

    def call():
        calls.append(time.monotonic())
        return MlflowClient(tracking_uri=uri).get_run("0" * 32)

    with pytest.raises(RuntimeError, match=r"did not answer for 3 s while reading the run.*server_wait_s"):
        patiently(call, what="reading the run", uri=uri, deadline_s=3.0)
    assert len(calls) >= 2 and calls[-1] - calls[0] <= 4.0  # tried again with backoff, within the deadline


def test_buffered_metrics_are_delivered_in_order_when_the_server_is_back(mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run_id = client.create_run(client.create_experiment("outage-unit")).info.run_id
    log = MetricLogger(mlflow_server.url, run_id, background=True)
    log.log({"m": 0.0}, 0)
    os.killpg(mlflow_server.proc.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        for step in range(1, 21):
            log.log({"m": float(step)}, step)
        assert time.monotonic() - began < 0.5
        time.sleep(3.0)
    finally:
        os.killpg(mlflow_server.proc.pid, signal.SIGCONT)
    assert log.close(60.0) == 0 and log.sent == 21
    history = client.get_metric_history(run_id, "m")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(21)]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_finetune_outlives_a_tracking_server_outage_and_delivers_every_step(s3_server, mlflow_server, tmp_path,
                                                                              ray_cluster, caplog):
    corpus = s3_server.uri("outage-corpus")
    prepare("easy-vqa", {}, corpus, limit=60)
    url = mlflow_server.url
    cfg = config(corpus, tmp_path, "outage", max_steps_per_epoch=40, data={"batch_size": 2},
                 tracking={"tracking_uri": url, "experiment": "test-outage", "system_metrics_every_s": 0.0,
                           "server_wait_s": 120.0})
    client = MlflowClient(tracking_uri=url)
    outage: dict[str, float] = {}

    def blink() -> None:
        """Stop the server once rank 0's first step has arrived; bring it back after OUTAGE_S."""
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            exp = client.get_experiment_by_name("test-outage")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
                break
            time.sleep(0.2)
        else:
            return
        outage["from"] = time.time()
        os.killpg(mlflow_server.proc.pid, signal.SIGSTOP)
        time.sleep(OUTAGE_S)
        os.killpg(mlflow_server.proc.pid, signal.SIGCONT)
        outage["to"] = time.time()

    blinker = threading.Thread(target=blink, daemon=True)
    blinker.start()
    out = train(cfg, output_dir=tmp_path / "out")
    blinker.join(OUTAGE_S + 10)
    assert "from" in outage and "to" in outage, "the training ended before its first step reached MLflow"

    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(out.mlflow_run_id, "train/loss")
    steps = sorted(m.step for m in history)
    assert steps == list(range(1, out.step + 1))  # every step, those logged during the outage delivered later
    during = [m.step for m in history if outage["from"] * 1000 <= m.timestamp <= outage["to"] * 1000]
    # training went on while the server was stopped (or finished, its last metrics waiting for the server)
    logging.getLogger(__name__).warning("outage %.1f s: %d of %d steps logged during it; run %s",
                                        outage["to"] - outage["from"], len(during), len(steps), run.info.status)
    assert during, "no step was logged while the server was stopped: the loop waited on MLflow"
    assert out.registered_version == "1"
    assert Path(out.bundle).is_dir()
