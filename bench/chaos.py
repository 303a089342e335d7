"""Faults survived by the Serve application (issue 28), measured on a local Ray with an ofa-micro bundle.

* Replica kill: N closed-loop clients against two model replicas; after `--before` seconds one replica's process
  is killed (SIGKILL), the load goes on until the deployment is back to two running replicas, and `--after`
  seconds more. Requests, failed requests (anything but 200) with their status and reason, hung requests (still
  unanswered `--timeout` seconds after the load stopped), p99 before / during / after, and the time to recover.
  Promise: 0 failed (a request whose replica dies is sent once more, to the other one), recovery <= 30 s.
* Early refusal: a body over max_body_bytes sent by Python's urllib (which asks for `Connection: close`) and
  by requests, at a few sizes: the status each client reads (413 expected; "reset" where it read none).
* Slow clients: raw sockets that trickle a body a byte a second (also with the header that turns Serve's proxy
  timeout off), send headers and nothing, never read their answer, never finish their headers, or pipeline
  9 MB of answers they never read, while one ordinary client goes on: when the server closed each connection
  (promise: within body_timeout_s, or keep_alive_timeout_s after an unread answer that fits the socket
  buffers), what it read, and the ordinary client's p50/p99 before and during. The last two are held by
  Serve's proxy until the client leaves (`serve_app.api.Guard`).
* Registry down at start: an MLflow server is stopped, the app started on a models:/ source of it, probed, and
  the server started again: the time to start, /healthz and a request meanwhile (503s), and the seconds until
  the model serves once the registry is back.

    python -m bench.chaos                  # all four, ~3 minutes after the app is up
    python -m bench.chaos --part kill --clients 8 --after 10
    python -m bench.chaos --part slow --body-timeout 5 --keep-alive 5

`replica_kill`, `early_refusal`, `slow_clients` and `registry_down_at_start` are also what tests/test_serve.py
runs against its own Serve instance.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests

from bench.serve import caption_body, make_bundle, percentile

APP = "chaos"
MODEL = "model-default"  # the deployment of the model named "default" (serve_app.app.deployment_name)


# =============================================================================================================
# Replica kill


def replica_pids(app: str, deployment: str = MODEL) -> list[int]:
    """The process ids of the deployment's live replica actors."""
    # The GCS actor table (a private module): the public state API (ray.util.state) needs the dashboard, which
    # the tests' and benches' throwaway clusters run without.
    from ray._private import state

    name = f"ServeReplica:{app}:{deployment}"
    return sorted(a["Pid"] for a in state.actors().values() if a["ActorClassName"] == name and a["State"] == "ALIVE")


def running_replicas(app: str, deployment: str = MODEL) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return status.deployments[deployment].replica_states.get("RUNNING", 0)


@dataclass
class Clients:
    """Closed-loop clients posting one body; each answer kept as (finished at, latency s, status, reason)."""

    url: str
    body: dict
    clients: int
    timeout_s: float
    done: list[tuple[float, float, int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for _ in range(self.clients):
            t = threading.Thread(target=self._client, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, wait_s: float) -> int:
        """Stop and wait up to `wait_s` for the requests in flight; how many are still unanswered (hung)."""
        self._stop.set()
        deadline = time.monotonic() + wait_s
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0.0))
        return sum(t.is_alive() for t in self._threads)

    def _client(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                r = session.post(self.url, json=self.body, timeout=self.timeout_s)
                status = r.status_code
                reason = "" if status == 200 else _reason(r)
            except requests.RequestException as exc:  # a reset or a timeout: no answer at all
                status, reason = -1, type(exc).__name__
            t1 = time.monotonic()
            with self._lock:
                self.done.append((t1, t1 - t0, status, reason))

    def rows(self) -> list[tuple[float, float, int, str]]:
        with self._lock:
            return list(self.done)


def _reason(r: requests.Response) -> str:
    try:
        return r.json()["error"]["reason"]
    except (ValueError, KeyError, TypeError):
        return r.text[:80]


def replica_kill(url: str, body: dict, app: str, *, clients: int = 8, before_s: float = 5.0,
                 recover_limit_s: float = 60.0, after_s: float = 5.0, timeout_s: float = 60.0) -> dict:
    """Kill one of the (two or more) replicas of `app`'s model deployment under `clients` closed-loop clients
    posting `body` to `url`; the figures (see the module docstring). The deployment must be running when called.
    """
    replicas = len(replica_pids(app))
    assert replicas >= 2, f"{app}: {replicas} live model replicas; the kill needs two"
    load = Clients(url, body, clients, timeout_s)
    load.start()
    time.sleep(before_s)
    victim = replica_pids(app)[0]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    back_at = None
    while time.monotonic() - killed_at < recover_limit_s:
        pids = replica_pids(app)
        if len(pids) >= replicas and victim not in pids and running_replicas(app) >= replicas:
            back_at = time.monotonic()
            break
        time.sleep(0.25)
    time.sleep(after_s)
    stopped_at = time.monotonic()
    hung = load.stop(timeout_s + 5)
    rows = load.rows()
    ended = back_at if back_at is not None else stopped_at

    def p99_ms(since: float, until: float) -> float:
        return round(percentile([lat for t, lat, s, _ in rows if since <= t < until and s == 200], 99) * 1000, 1)

    failures = Counter(f"{s} {reason}" for _, _, s, reason in rows if s != 200)
    return {"clients": clients, "requests": len(rows), "failed": sum(failures.values()), "failures": dict(failures),
            "hung": hung, "max_latency_s": round(max((lat for _, lat, _, _ in rows), default=0.0), 2),
            "p99_ms_before": p99_ms(0.0, killed_at), "p99_ms_during": p99_ms(killed_at, ended),
            "p99_ms_after": p99_ms(ended, float("inf")),
            "recovery_s": None if back_at is None else round(back_at - killed_at, 1), "killed_pid": victim}


# =============================================================================================================
# Early refusal


def urllib_post(url: str, body, headers: dict, timeout_s: float = 60.0) -> tuple[int, dict | None]:
    """(status, JSON body) as Python's urllib reads them (it sends `Connection: close`); (-1, None) for a reset."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except (urllib.error.URLError, ConnectionError):
        return -1, None


def requests_post(url: str, body, headers: dict, timeout_s: float = 60.0) -> tuple[int, dict | None]:
    """(status, JSON body) as requests reads them; (-1, None) for a reset."""
    try:
        r = requests.post(url, data=body, headers=headers, timeout=timeout_s)
    except requests.ConnectionError:
        return -1, None
    return r.status_code, r.json()


def early_refusal(url: str, sizes: list[int]) -> list[dict]:
    """POST JSON bodies of `sizes` bytes to `url` with urllib and requests (and requests asking for
    `Connection: close`); what each client read."""
    json_type = {"content-type": "application/json"}
    clients = {"urllib": lambda b: urllib_post(url, b, json_type),
               "requests": lambda b: requests_post(url, b, json_type),
               "requests, Connection: close": lambda b: requests_post(url, b, {**json_type, "Connection": "close"})}
    out = []
    for size in sizes:
        body = b'{"items": [{"image": "' + b"A" * max(size - 24, 0) + b'"}]}'
        for name, post in clients.items():
            status, answer = post(body)
            reason = (answer or {}).get("error", {}).get("reason") if isinstance(answer, dict) else None
            out.append({"client": name, "bytes": len(body), "status": status, "reason": reason})
    return out


# =============================================================================================================
# Slow clients

SLOW_KINDS = ("trickle", "trickle, no proxy timeout", "headers only", "never reads")  # what the test runs
HELD_KINDS = ("partial headers", "never reads, 9 MB pipelined")  # what neither the ingress nor Serve bounds


def _tcp_state(sock: socket.socket) -> str | None:
    """The kernel's TCP state of `sock` (Linux /proc/net/tcp): "01" established, "08" close-wait (the peer
    closed, data may still be unread), None when it is not listed."""
    local = f":{sock.getsockname()[1]:04X}"
    remote = f":{sock.getpeername()[1]:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if parts[1].endswith(local) and parts[2].endswith(remote):
            return parts[3]
    return None


def _status(data: bytes) -> tuple[int | None, str | None]:
    """(status, error reason) of the first HTTP response in `data`."""
    head, _, rest = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None, None
    start = rest.find(b"{")
    try:
        reason = json.loads(rest[start:rest.rfind(b"}") + 1])["error"]["reason"] if start >= 0 else None
    except (ValueError, KeyError, TypeError):
        reason = None
    return status, reason


def slow_client(url: str, kind: str, body: bytes, limit_s: float) -> dict:
    """One misbehaving client on a raw socket, for up to `limit_s` seconds; `closed_s`: seconds from its last
    header byte until the server closed the connection (None: still open at `limit_s`), and what it read.

    * trickle: headers with the Content-Length of `body`, then one body byte a second;
    * trickle, no proxy timeout: the same, with `x-request-timeout-seconds: 0` (Serve's proxy lets a client
      turn its request timeout off);
    * headers only: the headers, then nothing;
    * never reads: the whole request, then never a read (the close is seen in the kernel's TCP state);
    * partial headers: a request line and one header, never finished;
    * never reads, 9 MB pipelined: 300 GET /openapi.json (30 kB each) on one connection, never a read.
    """
    parsed = urllib.parse.urlsplit(url)
    head = (f"POST {parsed.path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n").encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if kind.startswith("never reads"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parsed.hostname, parsed.port))
    data, sent, closed = b"", 0, None
    try:
        if kind == "partial headers":
            sock.sendall(head)
        elif kind == "never reads":
            sock.sendall(head + b"\r\n" + body)
        elif kind == "never reads, 9 MB pipelined":
            docs = parsed.path.rsplit("/v1/", 1)[0] + "/openapi.json"
            sock.sendall(f"GET {docs} HTTP/1.1\r\nHost: {parsed.netloc}\r\n\r\n".encode() * 300)
        else:
            extra = b"x-request-timeout-seconds: 0\r\n" if kind == "trickle, no proxy timeout" else b""
            sock.sendall(head + extra + b"\r\n")
        began = time.monotonic()
        while closed is None and time.monotonic() - began < limit_s:
            if kind.startswith("never reads"):
                if _tcp_state(sock) != "01":
                    closed = time.monotonic() - began
                time.sleep(0.1)
                continue
            if kind.startswith("trickle") and sent < len(body):
                try:
                    sock.sendall(body[sent:sent + 1])
                    sent += 1
                except OSError:  # reset or broken pipe: the server closed it
                    closed = time.monotonic() - began
                    break
            readable, _, _ = select.select([sock], [], [], 1.0)
            if readable:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    closed = time.monotonic() - began
                data += chunk
        if kind.startswith("never reads") and closed is not None:  # read what it was sent, now
            sock.settimeout(5)
            try:
                while chunk := sock.recv(1 << 20):
                    data += chunk
            except OSError:
                pass
    finally:
        sock.close()
    status, reason = _status(data)
    return {"kind": kind, "closed_s": None if closed is None else round(closed, 1), "status": status,
            "reason": reason, "body_bytes_sent": sent, "limit_s": limit_s}


def slow_clients(url: str, body: dict, kinds: tuple[str, ...], *, limit_s: float, baseline_s: float = 5.0,
                 timeout_s: float = 60.0) -> dict:
    """`kinds` of slow clients (`slow_client`) against `url`, each for up to `limit_s`, while one closed-loop
    client posts `body` to it; that client's latency for `baseline_s` before (p50, p99, failures) and while
    the slow clients are connected."""
    raw = json.dumps(body).encode()
    fast = Clients(url, body, 1, timeout_s)
    fast.start()
    time.sleep(baseline_s)
    began = time.monotonic()
    results: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, slow_client(url, k, raw, limit_s)))
               for k in kinds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit_s + 30)
    ended = time.monotonic()
    fast.stop(timeout_s + 5)
    rows = fast.rows()

    def latency(since: float, until: float) -> dict:
        ok = [lat for t, lat, s, _ in rows if since <= t < until and s == 200]
        return {"requests": sum(1 for t, _, _, _ in rows if since <= t < until),
                "failed": sum(1 for t, _, s, _ in rows if since <= t < until and s != 200),
                "p50_ms": round(percentile(ok, 50) * 1000, 1), "p99_ms": round(percentile(ok, 99) * 1000, 1)}

    return {"clients": [results[k] for k in kinds], "before": latency(0.0, began), "during": latency(began, ended),
            "fast_requests": len(rows)}


# =============================================================================================================
# Registry down


class MlflowServer:
    """A real MLflow tracking server (sqlite, artifacts proxied to local disk under `root`) that can be stopped,
    leaving its port closed, and started again on the same port and database: a registry that goes away and
    comes back."""

    def __init__(self, root: Path) -> None:
        from pipelines.local.s3 import free_ports

        self.root = root
        [self.port] = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.service = None

    def start(self) -> None:
        from pipelines.local.services import start_mlflow_server, venv_env

        if self.service is None:
            self.service = start_mlflow_server(self.root, str(self.root / "artifacts"), venv_env(), timeout_s=90,
                                               port=self.port)

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop(grace_s=15)
            self.service = None

    def register(self, name: str, bundles: list[Path]) -> None:
        """Each bundle as the next version of `name` (through the server: artifacts are mlflow-artifacts:/, so a
        replica downloads them over HTTP); the first is the champion."""
        from mlflow import MlflowClient

        from pipelines.tracking.registry import promote_if_better, register_bundle

        client = MlflowClient(tracking_uri=self.url, registry_uri=self.url)
        exp = client.create_experiment(f"chaos-{name}")
        for i, bundle in enumerate(bundles):
            run = client.create_run(exp)
            client.log_artifacts(run.info.run_id, str(bundle), "bundle")
            v = register_bundle(name, f"{run.info.artifact_uri}/bundle", run_id=run.info.run_id, metric="score",
                                value=1.0 - i / 10, split="val", data_fingerprint="fp", tracking=self.url)
            promote_if_better(name, v, tracking=self.url)


def registry_down_at_start(cfg, server: MlflowServer, body: dict, *, back_limit_s: float = 60.0) -> dict:
    """Stop `server`, start the application `cfg` (a models:/ source on that server), probe it (/healthz, a
    caption request, /v1/models), start the server again and time until /healthz answers 200; the figures and
    what was read. The application is left running."""
    from serve_app.app import start

    def get(url: str) -> requests.Response:
        return requests.get(url, timeout=60)

    server.stop()
    try:
        began = time.monotonic()
        base = start(cfg, timeout_s=120)
        started_s = time.monotonic() - began
        health = get(f"{base}/healthz")
        request = requests.post(f"{base}/v1/caption", json=body, timeout=60)
        waiting = get(f"{base}/v1/models").json()["models"][0]
    finally:
        server.start()
    back = time.monotonic()
    served_s = None
    while time.monotonic() - back < back_limit_s:
        if get(f"{base}/healthz").status_code == 200:
            served_s = time.monotonic() - back
            break
        time.sleep(0.3)
    after = requests.post(f"{base}/v1/caption", json=body, timeout=60)
    return {"started_s": round(started_s, 1), "healthz": health.status_code, "health": health.json(),
            "state": health.json().get("states", {}).get("default"), "request": request.status_code,
            "retry_after": request.headers.get("Retry-After"), "answer": request.json(),
            "reason": request.json().get("error", {}).get("reason"), "waiting_info": waiting,
            "served_s": None if served_s is None else round(served_s, 1), "after": after.status_code,
            "after_answer": after.json(), "served_info": get(f"{base}/v1/models").json()["models"][0],
            "load_retry_max_s": cfg.load_retry_max_s, "base": base}


# =============================================================================================================
# Command line


def table(kill: dict | None, refusal: list[dict] | None, slow: dict | None = None,
          registry: dict | None = None) -> str:
    lines = []
    if kill is not None:
        lines += ["replica kill (SIGKILL one of 2 model replicas under load)",
                  f"  {'clients':>7} {'requests':>8} {'failed':>6} {'hung':>4} {'p99 before ms':>13} "
                  f"{'p99 during ms':>13} {'p99 after ms':>12} {'recovery s':>10}",
                  f"  {kill['clients']:>7} {kill['requests']:>8} {kill['failed']:>6} {kill['hung']:>4} "
                  f"{kill['p99_ms_before']:>13} {kill['p99_ms_during']:>13} {kill['p99_ms_after']:>12} "
                  f"{kill['recovery_s'] if kill['recovery_s'] is not None else 'never':>10}"]
        if kill["failures"]:
            lines.append(f"  failures: {kill['failures']}")
    if refusal is not None:
        lines += ["early refusal (body over max_body_bytes)", f"  {'client':<28} {'bytes':>10} {'status':>6} reason"]
        lines += [f"  {r['client']:<28} {r['bytes']:>10} {r['status'] if r['status'] != -1 else 'reset':>6} "
                  f"{r['reason'] or ''}" for r in refusal]
    if slow is not None:
        lines += [f"slow clients (body_timeout_s {slow['body_timeout_s']:g}, keep_alive_timeout_s "
                  f"{slow['keep_alive_timeout_s']})", f"  {'client':<30} {'closed after s':>14} {'status':>6} reason"]
        lines += [f"  {c['kind']:<30} {c['closed_s'] if c['closed_s'] is not None else 'open at ' + str(c['limit_s']):>14} "
                  f"{c['status'] or '-':>6} {c['reason'] or ''}" for c in slow["clients"]]
        for when in ("before", "during"):
            f = slow[when]
            lines.append(f"  other client {when:<7} requests {f['requests']:>4} failed {f['failed']:>3} "
                         f"p50 {f['p50_ms']:>7} ms p99 {f['p99_ms']:>7} ms")
    if registry is not None:
        lines += ["registry down at start (MLflow server stopped, then started again)",
                  f"  started in {registry['started_s']} s; /healthz {registry['healthz']} ({registry['state']}); "
                  f"a request {registry['request']} {registry['reason']} Retry-After {registry['retry_after']}",
                  f"  served {registry['served_s']} s after the registry came back "
                  f"(load_retry_max_s {registry['load_retry_max_s']:g})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["kill", "refusal", "slow", "registry", "all"], default="all")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--before", type=float, default=5.0, help="seconds of load before the kill")
    p.add_argument("--after", type=float, default=5.0, help="seconds of load after the recovery")
    p.add_argument("--timeout", type=float, default=60.0, help="a client's timeout per request (s)")
    p.add_argument("--body-timeout", type=float, default=5.0, help="slow: the app's body_timeout_s")
    p.add_argument("--keep-alive", type=int, default=5, help="slow: the proxy's keep_alive_timeout_s")
    p.add_argument("--slow-limit", type=float, default=30.0, help="slow: how long each slow client tries (s)")
    p.add_argument("--cpus", type=float, default=4.0, help="the local Ray's logical CPUs")
    p.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "tmp" / "chaos_bench",
                   help="directory for chaos.json")
    args = p.parse_args(argv)

    from ray import serve

    from pipelines.local.ray_settings import init_local_ray
    from pipelines.local.s3 import free_ports
    from serve_app.app import start
    from serve_app.serve_config import serve_config

    init_local_ray(args.cpus)
    limit = 256 * 1024
    [port] = free_ports(1)
    parts = {"kill", "refusal", "slow", "registry"} if args.part == "all" else {args.part}
    kill = refusal = slow = registry = None
    body = caption_body(64)
    body["items"][0]["decoding"] = {"max_len_b": 6}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bundle = make_bundle("ofa-micro", 64, Path(tmp))
            common = {"port": port, "num_cpus": 0.5, "torch_threads": 1, "max_body_bytes": limit,
                      "request_timeout_s": 30, "body_timeout_s": args.body_timeout,
                      "keep_alive_timeout_s": args.keep_alive}  # the first start sets the proxy's options
            base = start(serve_config(data={"models": {"default": {"source": str(bundle)}}, "app_name": APP,
                                            "autoscaling": {"min_replicas": 2, "max_replicas": 2}, **common}))
            url = f"{base}/v1/caption"
            if "kill" in parts:
                kill = replica_kill(url, body, APP, clients=args.clients, before_s=args.before,
                                    after_s=args.after, timeout_s=args.timeout)
            if "refusal" in parts:
                refusal = early_refusal(url, [limit + 1024, 4 * 2**20, 20 * 2**20, 80 * 2**20])
            if "slow" in parts:
                slow = slow_clients(url, body, SLOW_KINDS + HELD_KINDS, limit_s=args.slow_limit)
                slow.update(body_timeout_s=args.body_timeout, keep_alive_timeout_s=args.keep_alive)
            if "registry" in parts:
                server = MlflowServer(Path(tmp) / "mlflow")
                server.start()
                try:
                    server.register("chaos-model", [bundle])
                    cfg = serve_config(data={"models": {"default": {"source": "models:/chaos-model@champion"}},
                                             "app_name": "chaos-registry", "route_prefix": "/registry",
                                             "tracking_uri": server.url, "model_cache": str(Path(tmp) / "cache"),
                                             "load_retry_max_s": 2, "registry_timeout_s": 2, **common})
                    registry = registry_down_at_start(cfg, server, body)
                finally:
                    server.stop()
    finally:
        serve.shutdown()
    print(table(kill, refusal, slow, registry))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "chaos.json").write_text(json.dumps({"replica_kill": kill, "early_refusal": refusal,
                                                        "slow_clients": slow, "registry_down": registry}, indent=1))


if __name__ == "__main__":
    main()
