"""Online inference with Ray Serve (`serve_app`) on a local Ray: batching, autoscaling and a soak, over HTTP.

* Batching: closed-loop load (N clients, each sending its next caption request when the last is answered) on
  one model replica, with `max_batch_size` B against 1, everything else equal: requests/s, p50, p99, errors.
  Goal: >= 4x the throughput at equal or better p99.
* Autoscaling: idle, then N clients, then idle again, with autoscaling 1..M replicas and short delays; every
  second the running replicas, the requests in flight (client side) and the p99 of the last 5 s. Written as
  a PNG timeline (and JSON).
* Soak: N clients for `--soak-minutes`; errors, and the model replica's resident memory sampled over time
  (flat memory: the slope over the second half, MiB per minute).

The model is `--model` (a bundle directory or models:/ URI) or a randomly initialised `--arch` bundle (weights
do not change the work done). Results go to `--output` (serve_bench.json and the PNGs).

    python -m bench.serve --quick                        # a minute or two: ofa-micro, short phases
    python -m bench.serve                                # ofa-tiny, 16 clients, 30 s per batching setting, ...
    python -m bench.serve --part soak --soak-minutes 5
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
APP = "bench"


@dataclass(frozen=True)
class Settings:
    arch: str
    image_size: int
    clients: int
    seconds: float  # measured time per batching setting
    warmup_s: float
    max_batch_size: int
    max_replicas: int
    load_s: float  # autoscaling: loaded phase
    idle_s: float  # autoscaling: idle phases before and after
    soak_minutes: float
    cpus: float


def settings(args) -> Settings:
    if args.quick:
        return Settings(arch=args.arch or "ofa-micro", image_size=64, clients=args.clients or 8, seconds=6,
                        warmup_s=2, max_batch_size=8, max_replicas=2, load_s=15, idle_s=8,
                        soak_minutes=args.soak_minutes if args.soak_minutes is not None else 0.25,
                        cpus=args.cpus or max(4, os.cpu_count() or 2))
    return Settings(arch=args.arch or "ofa-tiny", image_size=256, clients=args.clients or 16, seconds=30,
                    warmup_s=5, max_batch_size=16, max_replicas=4, load_s=90, idle_s=30,
                    soak_minutes=args.soak_minutes if args.soak_minutes is not None else 5.0,
                    cpus=args.cpus or max(4, os.cpu_count() or 2))


# =============================================================================================================
# Load


@dataclass
class Load:
    """Closed-loop clients: each sends its next request when the last is answered."""

    url: str
    body: dict
    clients: int
    done: list[tuple[float, float, int]] = field(default_factory=list)  # (finished at, latency s, status)
    in_flight: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, clients: int | None = None) -> None:
        for _ in range(clients or self.clients):
            t = threading.Thread(target=self._client, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)
        self._threads, self._stop = [], threading.Event()

    def _client(self) -> None:
        session = requests.Session()
        stop = self._stop
        while not stop.is_set():
            with self._lock:
                self.in_flight += 1
            t0 = time.perf_counter()
            try:
                status = session.post(self.url, json=self.body, timeout=120).status_code
            except requests.RequestException:
                status = -1
            t1 = time.perf_counter()
            with self._lock:
                self.in_flight -= 1
                self.done.append((t1, t1 - t0, status))

    def window(self, since: float, until: float | None = None) -> list[tuple[float, float, int]]:
        with self._lock:
            return [d for d in self.done if d[0] >= since and (until is None or d[0] < until)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarise(rows: list[tuple[float, float, int]], seconds: float) -> dict:
    ok = [lat for _, lat, status in rows if status == 200]
    return {"requests": len(rows), "errors": sum(1 for _, _, s in rows if s != 200),
            "requests_per_s": round(len(ok) / seconds, 2), "p50_ms": round(percentile(ok, 50) * 1000, 1),
            "p99_ms": round(percentile(ok, 99) * 1000, 1)}


# =============================================================================================================
# The application


def make_bundle(arch: str, image_size: int, out: Path) -> Path:
    import torch

    from ofa_model import OFAModel, Vocabulary, get_config, save_bundle
    from ofa_model.preprocess import PreprocessConfig

    path = out / f"bundle-{arch}-{image_size}"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        save_bundle(path, OFAModel(get_config(arch)), Vocabulary.gpt2(),
                    preprocess=PreprocessConfig(patch_image_size=image_size))
    return path


def deploy(model: str, port: int, **over) -> str:
    """Deploy the bench application (replacing a previous one); its caption URL."""
    from serve_app.app import start
    from serve_app.serve_config import serve_config

    data = {"models": {"default": {"source": model}}, "num_cpus": 1, "max_queued_requests": -1,
            "request_timeout_s": 120, "ingress": {"num_cpus": 0.25, "max_ongoing_requests": 1024},
            "app_name": APP, "host": "127.0.0.1", "port": port, **over}
    return start(serve_config(data=data)) + "/v1/caption"


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or "model-default" not in app.deployments:
        return 0
    return app.deployments["model-default"].replica_states.get("RUNNING", 0)


def caption_body(size: int) -> dict:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, "PNG")
    return {"items": [{"image": base64.b64encode(buf.getvalue()).decode()}]}


# =============================================================================================================
# Parts


def batching(s: Settings, model: str, port: int, body: dict) -> dict:
    out = {}
    for mbs in (s.max_batch_size, 1):
        url = deploy(model, port, max_batch_size=mbs, batch_wait_timeout_s=0.005,
                     max_ongoing_requests=max(mbs, 2 * s.clients),
                     autoscaling={"min_replicas": 1, "max_replicas": 1})
        load = Load(url, body, s.clients)
        load.start()
        time.sleep(s.warmup_s)
        t0 = time.perf_counter()
        time.sleep(s.seconds)
        rows = load.window(t0, time.perf_counter())
        load.stop()
        out[f"max_batch_size={mbs}"] = summarise(rows, s.seconds)
        print(f"  batching max_batch_size={mbs:<3} {s.clients} clients: {out[f'max_batch_size={mbs}']}", flush=True)
    b, one = out[f"max_batch_size={s.max_batch_size}"], out["max_batch_size=1"]
    out["throughput_ratio"] = round(b["requests_per_s"] / max(one["requests_per_s"], 1e-9), 2)
    out["p99_ratio"] = round(b["p99_ms"] / max(one["p99_ms"], 1e-9), 2)
    print(f"  batching: {out['throughput_ratio']}x the throughput, p99 x{out['p99_ratio']} (goal: >= 4x, <= 1)")
    return out


def autoscaling(s: Settings, model: str, port: int, body: dict, output: Path) -> dict:
    delay = 2.0 if s.load_s < 30 else 5.0
    url = deploy(model, port, max_batch_size=4, batch_wait_timeout_s=0.005, max_ongoing_requests=8,
                 autoscaling={"min_replicas": 1, "max_replicas": s.max_replicas, "target_ongoing_requests": 2,
                              "upscale_delay_s": delay, "downscale_delay_s": 2 * delay,
                              "look_back_period_s": 2 * delay})
    load = Load(url, body, s.clients)
    timeline = []
    start = time.perf_counter()
    phases = [(s.idle_s, False), (s.load_s, True), (s.idle_s + 4 * delay, False)]
    for duration, loaded in phases:
        if loaded:
            load.start()
        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            time.sleep(1.0)
            now = time.perf_counter()
            recent = [lat for _, lat, status in load.window(now - 5) if status == 200]
            timeline.append({"t": round(now - start, 1), "replicas": running_replicas(), "in_flight": load.in_flight,
                             "p99_ms": round(percentile(recent, 99) * 1000, 1) if recent else None,
                             "loaded": loaded})
        if loaded:
            load.stop()
    errors = sum(1 for _, _, status in load.done if status != 200)
    peak = max(p["replicas"] for p in timeline)
    result = {"peak_replicas": peak, "final_replicas": timeline[-1]["replicas"], "errors": errors,
              "requests": len(load.done), "timeline": timeline}
    png = output / "serve_autoscaling.png"
    plot_timeline(timeline, png, f"Serve autoscaling: {s.clients} clients, 1..{s.max_replicas} replicas, "
                                 f"{s.arch}, {os.cpu_count()} cores")
    print(f"  autoscaling: replicas up to {peak}, back to {result['final_replicas']}, {errors} errors; plot {png}")
    return result


def plot_timeline(timeline: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p["t"] for p in timeline]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    series = [("replicas", "running replicas"), ("in_flight", "requests in flight"), ("p99_ms", "p99 (ms, 5 s)")]
    for ax, (key, label) in zip(axes, series, strict=True):
        ax.plot(t, [p[key] if p[key] is not None else float("nan") for p in timeline], drawstyle="steps-post")
        ax.set_ylabel(label)
        for p0, p1 in zip(timeline, timeline[1:], strict=False):
            if p0["loaded"]:
                ax.axvspan(p0["t"], p1["t"], color="orange", alpha=0.15, lw=0)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds (shaded: clients sending)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def soak(s: Settings, model: str, port: int, body: dict) -> dict:
    url = deploy(model, port, max_batch_size=s.max_batch_size, batch_wait_timeout_s=0.005,
                 max_ongoing_requests=max(s.max_batch_size, 2 * s.clients),
                 autoscaling={"min_replicas": 1, "max_replicas": 1})
    models_url = url.replace("/v1/caption", "/v1/models")
    load = Load(url, body, s.clients)
    load.start()
    memory = []
    start = time.perf_counter()
    end = start + s.soak_minutes * 60
    while time.perf_counter() < end:
        time.sleep(min(5.0, max(0.5, end - time.perf_counter())))
        info = requests.get(models_url, timeout=60).json()["models"][0]["stats"]
        memory.append((round(time.perf_counter() - start, 1), info["rss_mb"]))
    load.stop()
    rows = load.done
    errors = sum(1 for _, _, status in rows if status != 200)
    half = [m for m in memory if m[0] >= (memory[-1][0] / 2)] if memory else []
    slope = None
    if len(half) >= 2 and all(m[1] is not None for m in half):
        ts, ms = [m[0] / 60 for m in half], [m[1] for m in half]
        slope = round(statistics.linear_regression(ts, ms).slope, 2)
    result = {"minutes": s.soak_minutes, **summarise(rows, time.perf_counter() - start), "errors": errors,
              "rss_mb_first": memory[0][1] if memory else None, "rss_mb_last": memory[-1][1] if memory else None,
              "rss_mb_max": max((m[1] for m in memory if m[1] is not None), default=None),
              "rss_slope_mb_per_min_second_half": slope, "memory": memory}
    print(f"  soak {s.soak_minutes} min: {len(rows)} requests, {errors} errors, RSS {result['rss_mb_first']} -> "
          f"{result['rss_mb_last']} MiB (second-half slope {slope} MiB/min)", flush=True)
    return result


# =============================================================================================================


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("all", "batching", "autoscaling", "soak"), default="all")
    p.add_argument("--quick", action="store_true", help="ofa-micro and short phases (a minute or two)")
    p.add_argument("--model", help="bundle directory or models:/ URI (default: a random --arch bundle)")
    p.add_argument("--arch", help="size of the random bundle (default ofa-tiny; --quick: ofa-micro)")
    p.add_argument("--clients", type=int, help="concurrent closed-loop clients (default 16; --quick: 8)")
    p.add_argument("--soak-minutes", type=float, help="soak length (default 5; --quick: 0.25)")
    p.add_argument("--cpus", type=float, help="logical CPUs of the local Ray (default: max(4, cores))")
    p.add_argument("--output", default=str(ROOT / "tmp" / "serve_bench"), help="directory for JSON and PNGs")
    args = p.parse_args(argv or [])
    s = settings(args)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    import ray
    from ray import serve

    from pipelines.local.ray_settings import init_local_ray
    from pipelines.local.s3 import free_ports

    model = args.model or str(make_bundle(s.arch, s.image_size, output))
    body = caption_body(s.image_size)
    init_local_ray(s.cpus)  # the object store at Ray's default
    [port] = free_ports(1)
    results: dict = {"settings": s.__dict__, "model": model, "cores": os.cpu_count()}
    try:
        if args.part in ("all", "batching"):
            results["batching"] = batching(s, model, port, body)
        if args.part in ("all", "autoscaling"):
            results["autoscaling"] = autoscaling(s, model, port, body, output)
        if args.part in ("all", "soak"):
            results["soak"] = soak(s, model, port, body)
    finally:
        serve.shutdown()
        ray.shutdown()
    path = output / "serve_bench.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
