"""MLflow for training runs: one MLflow run per job, metrics from rank 0 only, artifacts and registration
from the driver.

The tracking URI comes from the config, else MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/mlflow.db`
(`pipelines.tracking.registry.tracking_uri`). With sqlite, artifacts go to `mlartifacts/` beside the database (an
absolute location, so workers in other working directories write to the same place); with a tracking
server (`http://...`) the server decides (e.g. `mlflow server --artifacts-destination s3://...`).

A rerun of the same training run (same `run.name` and storage) continues the same MLflow run: it is found by
the `ofa.run_key` tag.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

from pipelines.tracking.registry import tracking_uri

logger = logging.getLogger(__name__)

RUN_KEY_TAG = "ofa.run_key"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value (8000 on recent servers; stay below)


def run_key(name: str, storage_path: str) -> str:
    return hashlib.sha256(f"{storage_path}\0{name}".encode()).hexdigest()[:32]


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite database, else the server's choice."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///")).expanduser()
        return str(db.resolve().parent / "mlartifacts" / experiment)
    return None


def client_for(uri: str | None) -> tuple[MlflowClient, str]:
    resolved = tracking_uri(uri)
    return MlflowClient(tracking_uri=resolved, registry_uri=resolved), resolved


def experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """The experiment `name`, created if missing; two jobs starting at once may both try, and one wins."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, name))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise RuntimeError(f"MLflow experiment {name!r} was reported created but cannot be found at {uri}")
    return exp.experiment_id


def start_or_resume_run(uri: str | None, experiment: str, *, name: str, key: str,
                        params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    """The id of the MLflow run tagged with `key` (resumed: status back to RUNNING), or of a new one with
    `params` and `tags` logged."""
    client, resolved = client_for(uri)
    exp = experiment_id(client, resolved, experiment)
    found = client.search_runs([exp], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        logger.info("MLflow: continuing run %s (%s) at %s", name, run_id, resolved)
        return run_id
    run = client.create_run(exp, run_name=name, tags={**tags, RUN_KEY_TAG: key})
    items = [Param(k, _param_text(v)) for k, v in sorted(params.items())]
    for lo in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[lo:lo + 100])
    logger.info("MLflow: run %s (%s) at %s", name, run.info.run_id, resolved)
    return run.info.run_id


def _param_text(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def end_run(uri: str | None, run_id: str, ok: bool) -> None:
    client, _ = client_for(uri)
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


class MetricLogger:
    """Batched metric logging to one run (rank 0 of a training worker group). Non-finite values are skipped
    with a warning: MLflow stores them, but they break plots and comparisons."""

    def __init__(self, uri: str | None, run_id: str):
        self.client, _ = client_for(uri)
        self.run_id = run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            v = float(v)
            if not math.isfinite(v):
                logger.warning("metric %s = %s at step %d not logged (not finite)", k, v, step)
                continue
            items.append(Metric(k, v, now, step))
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> str:
        """Log a directory; returns its artifact URI."""
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)
        return f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))


@contextlib.contextmanager
def system_metrics(uri: str | None, run_id: str, every_s: float) -> Iterator[None]:
    """This machine's system metrics logged to the MLflow run `run_id` by MLflow's own monitor (a thread) every
    `every_s` seconds while the block runs, and once more as it ends, so that a block shorter than `every_s`
    still leaves a sample; `every_s` 0: nothing. The names are MLflow's: system/cpu_utilization_percentage,
    system/system_memory_usage_megabytes and _percentage, disk and network, and, where the nvidia-ml-py
    package finds an NVIDIA GPU, system/gpu_<i>_utilization_percentage and _memory_usage_megabytes (without
    either, MLflow logs that it skips the GPU). Steps go on from the run's last system step (a resumed run,
    the next fit of the same run). MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, if set, overrides `every_s`."""
    if every_s <= 0:
        yield
        return
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as exc:  # psutil, which MLflow's CPU monitor imports
        raise RuntimeError(f"MLflow's system metrics cannot start: {exc}. Install psutil, or set "
                           "tracking.system_metrics_every_s=0") from exc
    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=True,
                                   tracking_uri=tracking_uri(uri))
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except MlflowException as exc:  # e.g. the run was deleted meanwhile: the block's own outcome matters more
            logger.warning("MLflow: the last system metrics of run %s were not logged: %s", run_id, exc)
