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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from pipelines.tracking.registry import tracking_uri, transient

logger = logging.getLogger(__name__)

RUN_KEY_TAG = "ofa.run_key"
T = TypeVar("T")
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


def patiently(call: Callable[[], T], *, what: str, uri: str | None, deadline_s: float) -> T:
    """`call()`, tried again with backoff (1 s doubling to 30 s) while the tracking server is away, for up to
    `deadline_s` seconds; then a RuntimeError that says what could not be done. A call in progress is not cut
    short: MLflow's own retries bound it (MLFLOW_HTTP_REQUEST_MAX_RETRIES, _TIMEOUT; ~4 minutes by default
    against a port that refuses). A call that reached the server before its answer was lost is sent again."""
    deadline = time.monotonic() + deadline_s
    wait = 1.0
    while True:
        try:
            return call()
        except (MlflowException, OSError) as exc:
            if not transient(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"MLflow at {tracking_uri(uri)} did not answer for {deadline_s:.0f} s while "
                                   f"{what}: {exc}. Bring the tracking server back and rerun the same command; "
                                   "the run's checkpoints are kept, so it finishes from there (or raise "
                                   "tracking.server_wait_s)") from exc
            logger.warning("MLflow at %s is away while %s (%s); trying again in %.0f s", tracking_uri(uri), what,
                           exc, min(wait, left))
            time.sleep(min(wait, left))
            wait = min(2 * wait, 30.0)


def end_run(uri: str | None, run_id: str, ok: bool, *, deadline_s: float = 300.0) -> None:
    """Mark the run FINISHED (`ok`) or FAILED, waiting up to `deadline_s` for the tracking server."""
    client, _ = client_for(uri)
    status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
    patiently(lambda: client.set_terminated(run_id, status=status), what=f"marking run {run_id} {status}",
              uri=uri, deadline_s=deadline_s)


class MetricLogger:
    """Metrics and tags of one run. Without `background`, each call sends at once and raises what MLflow raises.
    With it (rank 0 of a training worker group), a thread sends them in batches, so that the training loop
    never waits on MLflow: while the tracking server is away, what failed to send stays in a buffer of at most `buffer` items (past that the oldest go, counted as dropped) and is tried again
    with backoff (1 s doubling to 30 s); `close` waits for the buffer to empty up to a deadline and warns with
    the number dropped. Non-finite values are skipped with a warning: MLflow stores them, but they break plots
    and comparisons. `log_artifacts` is synchronous and waits for the server up to `deadline_s`."""

    def __init__(self, uri: str | None, run_id: str, *, background: bool = False, buffer: int = 100_000,
                 deadline_s: float = 300.0):
        self.client, _ = client_for(uri)
        self.uri, self.run_id, self.deadline_s, self.background = uri, run_id, deadline_s, background
        self.sent = self.dropped = 0
        self._buffer: deque[Metric | RunTag] = deque()
        self._max = buffer
        self._cond = threading.Condition()
        self._sending = 0  # items taken by the sender, in flight
        self._closed = False
        self._thread: threading.Thread | None = None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            v = float(v)
            if not math.isfinite(v):
                logger.warning("metric %s = %s at step %d not logged (not finite)", k, v, step)
                continue
            items.append(Metric(k, v, now, step))
        self._put(items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._put([RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> str:
        """Log a directory; returns its artifact URI."""
        patiently(lambda: self.client.log_artifacts(self.run_id, str(local_dir), artifact_path),
                  what=f"logging {local_dir} to run {self.run_id}", uri=self.uri, deadline_s=self.deadline_s)
        run = patiently(lambda: self.client.get_run(self.run_id), what=f"reading run {self.run_id}", uri=self.uri,
                        deadline_s=self.deadline_s)
        return f"{run.info.artifact_uri}/{artifact_path}"

    def close(self, deadline_s: float | None = None) -> int:
        """Send what is buffered, waiting up to `deadline_s` (None: the logger's); returns the number of items
        dropped in all (warned about when not 0). Later `log` calls are refused."""
        deadline = time.monotonic() + (self.deadline_s if deadline_s is None else deadline_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while (self._buffer or self._sending) and self._thread is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            left_over = len(self._buffer) + self._sending
            self.dropped += left_over
            self._buffer.clear()
            self._sending = 0
        if self.dropped:
            logger.warning("MLflow: %d metric/tag values of run %s were not delivered to %s (%d were)%s",
                           self.dropped, self.run_id, tracking_uri(self.uri), self.sent,
                           "; the server did not come back in time" if left_over else "")
        return self.dropped

    def _put(self, items: list[Metric | RunTag]) -> None:
        if not items:
            return
        if not self.background:
            for lo in range(0, len(items), 100):
                self.client.log_batch(self.run_id, metrics=[i for i in items[lo:lo + 100] if isinstance(i, Metric)],
                                      tags=[i for i in items[lo:lo + 100] if isinstance(i, RunTag)])
            self.sent += len(items)
            return
        with self._cond:
            if self._closed:
                raise RuntimeError(f"MetricLogger of run {self.run_id} is closed")
            self._buffer.extend(items)
            over = len(self._buffer) - self._max
            if over > 0:
                for _ in range(over):
                    self._buffer.popleft()
                if self.dropped == 0:
                    logger.warning("MLflow at %s is away: the buffer of %d metric/tag values is full, the oldest "
                                   "are dropped", tracking_uri(self.uri), self._max)
                self.dropped += over
            if self._thread is None:
                self._thread = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _send_loop(self) -> None:
        wait, retry_at = 1.0, 0.0
        while True:
            with self._cond:
                while True:  # new values do not cut a backoff short
                    if not self._buffer and self._closed:
                        return
                    delay = retry_at - time.monotonic()
                    if self._buffer and delay <= 0:
                        break
                    self._cond.wait(delay if self._buffer else None)
                batch = _take_batch(self._buffer)
                self._sending = len(batch)
            outcome, error = self._send(batch)
            with self._cond:
                if self._sending == 0:  # `close` gave up on this batch meanwhile
                    return
                self._sending = 0
                if outcome == "sent":
                    self.sent += len(batch)
                    wait = 1.0
                elif outcome == "retry":
                    self._buffer.extendleft(reversed(batch))  # in order, first in line
                    logger.warning("MLflow at %s is away (%s); %d metric/tag values buffered, trying again in "
                                   "%.0f s", tracking_uri(self.uri), error, len(self._buffer), wait)
                    retry_at = time.monotonic() + wait
                    wait = min(2 * wait, 30.0)
                else:
                    self.dropped += len(batch)
                self._cond.notify_all()

    def _send(self, batch: list[Metric | RunTag]) -> tuple[str, BaseException | None]:
        """One `log_batch`: "sent", "retry" (the server is away) or "drop" (refused: said in a warning)."""
        try:
            self.client.log_batch(self.run_id, metrics=[i for i in batch if isinstance(i, Metric)],
                                  tags=[i for i in batch if isinstance(i, RunTag)])
            return "sent", None
        except (MlflowException, OSError) as exc:
            if transient(exc):
                return "retry", exc
            logger.warning("MLflow refused %d metric/tag values of run %s: %s", len(batch), self.run_id, exc)
            return "drop", exc
        except Exception as exc:  # a bug must not stop the sender silently: count and say it
            logger.exception("MLflow: sending %d values of run %s failed", len(batch), self.run_id)
            return "drop", exc


def _take_batch(buffer: deque) -> list[Metric | RunTag]:
    """The first items of `buffer` that fit one `log_batch` (at most 1000 values, of them at most 100 tags)."""
    batch: list[Metric | RunTag] = []
    tags = 0
    while buffer and len(batch) < 1000:
        if isinstance(buffer[0], RunTag):
            if tags == 100:
                break
            tags += 1
        batch.append(buffer.popleft())
    return batch


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
