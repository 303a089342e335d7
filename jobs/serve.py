"""Serve OFA models over HTTP: a local Ray (or the cluster of RAY_ADDRESS) plus the Serve application.

    python -m jobs.serve --model bundles/ofa-tiny
    python -m jobs.serve --model models:/ofa-vqa@champion --port 8001 autoscaling.max_replicas=2
    python -m jobs.serve --config serve.yaml [key=value ...]      # ServeConfig keys (serve_app/serve_config.py)

Prints the URL, then serves until Ctrl-C or SIGTERM, and shuts down what it started: Serve and the local Ray, or
on a joined cluster only the application. It binds 127.0.0.1 unless --host (or `host:`) says otherwise. The API key
is read from the environment variable or file the config names (api_key_env / api_key_file), never from here.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from jobs._cli import Parser, fail, setup_logging

PROG = "python -m jobs.serve"
log = logging.getLogger("jobs.serve")


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n")[0],
               epilog="Overrides reach nested keys: max_batch_size=16 autoscaling.max_replicas=4 num_gpus=0.5.")
    p.add_argument("--model", help="a bundle directory, s3://bucket/prefix or models:/name@alias (one model serving every task)")
    p.add_argument("--config", help="ServeConfig YAML (models, limits, scaling, ...)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--num-cpus", type=float, help="logical CPUs of the local Ray this starts (default: all)")
    p.add_argument("--num-gpus", type=float, help="logical GPUs of the local Ray this starts (default: detected)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of config keys")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    from ofa_model.errors import ConfigError
    from serve_app.serve_config import LOOPBACK, serve_config

    try:
        cfg = serve_config(args.config, args.overrides, model=args.model, host=args.host, port=args.port)
    except ConfigError as exc:
        fail(PROG, exc)
    joined = bool(os.environ.get("RAY_ADDRESS"))
    if joined and (args.num_cpus is not None or args.num_gpus is not None):
        fail(PROG, "--num-cpus/--num-gpus size a local Ray; RAY_ADDRESS names a running cluster")

    import ray

    from pipelines.local.ray_settings import init_local_ray
    from serve_app.app import start

    started_ray = not ray.is_initialized() and not joined
    if started_ray:
        init_local_ray(args.num_cpus, num_gpus=args.num_gpus, throwaway=False)  # token auth on: others may reach it
    elif not ray.is_initialized():
        ray.init(address=os.environ["RAY_ADDRESS"])
    stop = threading.Event()  # after ray.init, which installs a SIGTERM handler of its own (it aborts)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        try:
            url = start(cfg)
        except ConfigError as exc:
            fail(PROG, exc)
        print(f"serving {', '.join(cfg.models)} at {url}  (docs: {url}/docs; Ctrl-C stops)", flush=True)
        if cfg.host not in LOOPBACK:
            log.warning("bound to %s: reachable from other machines (API key required)", cfg.host)
        stop.wait()
        print("shutting down", flush=True)
    finally:
        _shut_down(cfg.app_name, own_cluster=started_ray)
    print("stopped", flush=True)


def _shut_down(app_name: str, *, own_cluster: bool) -> None:
    """On a cluster this started: Serve (application, controller, proxies) and Ray. On a joined cluster: only
    the application (Serve may serve others there)."""
    import ray
    from ray import serve

    try:
        if own_cluster:
            serve.shutdown()
        else:
            serve.delete(app_name)
    finally:
        if own_cluster:
            ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
