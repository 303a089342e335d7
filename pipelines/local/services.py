"""Local service processes on loopback: a Ray head node and an MLflow tracking server, for the demo and the tests.

Each starts in a session of its own (`start_new_session=True`) with every port chosen free, and stops by
process group: SIGTERM, then SIGKILL after a grace period, then whatever `ps` still finds of its session or its
markers is killed by pid and reported. Never `ray stop`: it stops every Ray on the machine, other people's too.
(The S3 server is `pipelines.local.s3`.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.local.ray_settings import LOCAL_RAY_ENV
from pipelines.local.s3 import free_ports

VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin, not the base interpreter's
STOP_GRACE_S = 30.0


def venv_env(**extra: str) -> dict[str, str]:
    """This environment with the venv first on PATH (a plain `python` is the venv's) and no RAY_ADDRESS or Ray
    auth settings of the caller leaking in; `extra` on top."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") and not k.startswith("RAY_AUTH")}
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(VENV_BIN.parent)
    env.update(extra)
    return env


def spawn(args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """`args` in a new session, stdout and stderr to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError as exc:
        return f"<no log: {exc}>"


def http_status(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET; (0, b"") when nothing answers."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def processes(sessions: set[int], markers: tuple[str, ...]) -> list[tuple[int, str]]:
    """(pid, args) of live processes in one of `sessions` or with one of `markers` in their arguments.

    The session catches processes that renamed themselves (Ray workers show as `ray::IDLE`); the markers
    catch any that started a session of their own."""
    me = os.getpid()
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True,
                         check=True).stdout
    found = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) < 4:
            continue
        pid, sid, stat, args = int(parts[0]), int(parts[1]), parts[2], parts[3]
        if pid == me or stat.startswith("Z") or args.startswith("ps -ww -eo"):
            continue
        if sid in sessions or any(m in args for m in markers):
            found.append((pid, args))
    return found


def stop_groups(procs: list[subprocess.Popen], markers: tuple[str, ...],
                grace_s: float = STOP_GRACE_S) -> tuple[list[tuple[int, str]], bool]:
    """SIGTERM to each process group, SIGKILL to the groups if anything of theirs is still alive after
    `grace_s`; returns (leftovers, whether SIGKILL was needed).

    Processes of those sessions outside the groups (Ray puts each worker in a group of its own) get a moment to
    exit after their parents did. Leftovers are what is still alive then: they are killed here by pid, so
    nothing stays behind, and the caller reports them."""
    sessions = {p.pid for p in procs}

    def wait_gone(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            for p in procs:
                p.poll()  # reap our own children
            if not processes(sessions, markers):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    def signal_groups(sig: signal.Signals) -> None:
        for p in procs:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass

    signal_groups(signal.SIGTERM)
    killed = not wait_gone(grace_s)
    if killed:
        signal_groups(signal.SIGKILL)
        wait_gone(15.0)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    leftovers = processes(sessions, markers)
    for pid, _ in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftovers, killed


def _wait_http(url: str, proc: subprocess.Popen, log: Path, what: str, timeout_s: float,
               token: str | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while http_status(url, token)[0] != 200:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} (log {log}):\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not up after {timeout_s:.0f} s (log {log}):\n{log_tail(log)}")
        time.sleep(0.3)


@dataclass
class Service:
    """A started service: its process (own session), what identifies its processes, where it logs."""

    name: str
    proc: subprocess.Popen
    markers: tuple[str, ...]
    log: Path
    url: str
    info: dict[str, str] = field(default_factory=dict)

    def stop(self, grace_s: float = STOP_GRACE_S) -> list[tuple[int, str]]:
        """Stops it; returns the processes that had to be killed by pid (empty when it stopped cleanly)."""
        leftovers, _ = stop_groups([self.proc], self.markers, grace_s)
        return leftovers


def start_mlflow_server(workdir: Path, artifacts_destination: str, env: dict[str, str],
                        timeout_s: float = 120.0, port: int | None = None) -> Service:
    """`mlflow server` on 127.0.0.1 (`port`, else a free one): sqlite in `workdir`, artifacts proxied to
    `artifacts_destination` (e.g. s3://bucket/mlflow; `env` must reach that store: MLFLOW_S3_ENDPOINT_URL and
    AWS_* for S3). Started again with the same workdir and port after a stop, it is the same registry."""
    workdir.mkdir(parents=True, exist_ok=True)
    if port is None:
        port, = free_ports(1)
    log = workdir / "mlflow-server.log"
    # MLflow 3's server runs a job executor by default (seven huey consumer processes, ~27 CPU-seconds to start
    # here) for features ofa-ray does not use (GenAI jobs, trace rollups): off
    env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = spawn([str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                  "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                  "--artifacts-destination", artifacts_destination], env, log, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    service = Service("mlflow", proc, (f"--port {port}", str(workdir)), log, url)
    try:
        _wait_http(f"{url}/health", proc, log, "mlflow server", timeout_s)
    except BaseException:
        service.stop(grace_s=10)
        raise
    return service


def start_ray_head(temp_dir: Path, env: dict[str, str], *, num_cpus: int, num_gpus: int = 0,
                   object_store_bytes: int = 512 * 2**20, dashboard: bool = True, timeout_s: float = 120.0) -> Service:
    """`ray start --head --block` on loopback, every port free, its own temp dir (keep the path short: Ray's unix
    sockets live under it), under `LOCAL_RAY_ENV` unless `env` says otherwise. `url` is the GCS address for
    `ray.init(address=...)`; `info["dashboard"]` its dashboard (the Jobs API)."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    gcs, dash, client, node_manager, object_manager, agent_http, agent_grpc, runtime_env, metrics = free_ports(9)
    log = temp_dir / "head.log"
    args = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
            f"--include-dashboard={'true' if dashboard else 'false'}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}", f"--object-store-memory={object_store_bytes}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            "--min-worker-port=0", "--max-worker-port=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    env = {**LOCAL_RAY_ENV, **env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # `env` may override the first
    proc = spawn(args, env, log)
    address, dashboard_url = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
    service = Service("ray", proc, (str(temp_dir), address), log, address, {"dashboard": dashboard_url})
    try:
        if dashboard:
            _wait_http(f"{dashboard_url}/api/version", proc, log, "ray start --head", timeout_s,
                       env.get("RAY_AUTH_TOKEN"))
        else:
            _wait_file(temp_dir, proc, log, timeout_s)
    except BaseException:
        service.stop(grace_s=10)
        raise
    return service


def _wait_file(temp_dir: Path, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Without a dashboard: up once the head wrote its address file."""
    deadline = time.monotonic() + timeout_s
    while not (temp_dir / "ray_current_cluster").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start --head did not come up (log {log}):\n{log_tail(log)}")
        time.sleep(0.3)
