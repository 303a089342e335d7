"""Faults survived by the Serve application (issue 28), measured on a local Ray with an ofa-micro bundle.

* Replica kill: N closed-loop clients against two model replicas; after `--before` seconds one replica's process
  is killed (SIGKILL), the load goes on until the deployment is back to two running replicas, and `--after`
  seconds more. Requests, failed requests (anything but 200) with their status and reason, hung requests (still
  unanswered `--timeout` seconds after the load stopped), p99 before / during / after, and the time to recover.
  Promise: 0 failed (a request whose replica dies is sent once more, to the other one), recovery <= 30 s.
* Early refusal: a body over max_body_bytes sent by Python's urllib (which asks for `Connection: close`) and
  by requests, at a few sizes: the status each client reads (413 expected; "reset" where it read none).

    python -m bench.chaos                  # both, ~1 minute after the app is up
    python -m bench.chaos --part kill --clients 8 --after 10

`replica_kill` and `early_refusal` are also what tests/test_serve.py runs against its own Serve instance.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
import urllib.error
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
# Command line


def table(kill: dict | None, refusal: list[dict] | None) -> str:
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["kill", "refusal", "all"], default="all")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--before", type=float, default=5.0, help="seconds of load before the kill")
    p.add_argument("--after", type=float, default=5.0, help="seconds of load after the recovery")
    p.add_argument("--timeout", type=float, default=60.0, help="a client's timeout per request (s)")
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
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bundle = make_bundle("ofa-micro", 64, Path(tmp))
            base = start(serve_config(data={
                "models": {"default": {"source": str(bundle)}}, "app_name": APP, "port": port, "num_cpus": 0.5,
                "torch_threads": 1, "max_body_bytes": limit, "request_timeout_s": 30,
                "autoscaling": {"min_replicas": 2, "max_replicas": 2}}))
            url = f"{base}/v1/caption"
            kill = refusal = None
            if args.part in ("kill", "all"):
                body = caption_body(64)
                body["items"][0]["decoding"] = {"max_len_b": 6}
                kill = replica_kill(url, body, APP, clients=args.clients, before_s=args.before,
                                    after_s=args.after, timeout_s=args.timeout)
            if args.part in ("refusal", "all"):
                refusal = early_refusal(url, [limit + 1024, 4 * 2**20, 20 * 2**20, 80 * 2**20])
    finally:
        serve.shutdown()
    print(table(kill, refusal))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "chaos.json").write_text(json.dumps({"replica_kill": kill, "early_refusal": refusal}, indent=1))


if __name__ == "__main__":
    main()
