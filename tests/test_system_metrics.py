"""pipelines.tracking.runs.system_metrics: MLflow's own monitor attached to a run made with MlflowClient (as
training and evaluation make theirs), sampling while the block runs and once at its end."""

from __future__ import annotations

import time

from mlflow import MlflowClient

from pipelines.tracking.runs import start_or_resume_run, system_metrics


def _run(tmp_path) -> tuple[str, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, start_or_resume_run(uri, "test-system", name="s", key="k", params={}, tags={})


def test_a_block_logs_cpu_and_memory_samples_and_a_later_block_goes_on_from_the_last_step(tmp_path):
    uri, run_id = _run(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    with system_metrics(uri, run_id, 0.2):
        time.sleep(0.9)  # about 4 samples, then one more as the block ends
    metrics = client.get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage"} <= metrics.keys()
    first = sorted(m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    assert first == list(range(len(first))) and len(first) >= 2
    assert 0 < metrics["system/system_memory_usage_percentage"] <= 100
    with system_metrics(uri, run_id, 60.0):  # shorter than every_s: only the sample at its end
        pass
    steps = sorted(m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    assert steps == [*first, len(first)]


def test_every_s_0_logs_nothing(tmp_path):
    uri, run_id = _run(tmp_path)
    with system_metrics(uri, run_id, 0):
        time.sleep(0.05)
    assert not [k for k in MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics if k.startswith("system/")]
