"""The object store stopped for 20 s during a fine-tune (issue 28): the run completes with the same metrics
as an uninterrupted run with the same seed.

The outage is a SIGSTOP of the session's SeaweedFS process (`weed mini`, one process; its port stays open, so
S3 calls hang as behind a stalled store) after rank 0's fifth step, with mid-epoch checkpoints every 10 steps
and shard reads going on, and SIGCONT 20 s later."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.data.converters import prepare
from pipelines.train import train
from tests.test_train import config

OUTAGE_S = 20.0


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
