"""The Serve application: an HTTP ingress (`serve_app.api`) and one model deployment per configured model
(`serve_app.model`), built from a `ServeConfig`.

    serve run serve_app.app:build_app model=bundles/ofa-tiny           # args: ServeConfig keys, key=value
    serve run serve_app.app:build_app config=serve.yaml autoscaling.max_replicas=4
    serve deploy serve_config.yaml                                     # args: under applications[0].args
    python -m jobs.serve --model models:/ofa-vqa@champion              # local Ray + the app, Ctrl-C stops both

`start(cfg)` is the one way this repository starts the application on a connected Ray (`jobs.serve`, the demo,
the Serve bench and tests): Serve's HTTP proxy on cfg.host:cfg.port, the app under cfg.route_prefix, healthy.

Each model deployment `model-<name>` gets `user_config: {source: ...}`; changing only that (in
serve_config.yaml's `deployments:` section, then `serve deploy`) switches the model in place through
`reconfigure`, without restarting replicas or dropping requests. Changing `args` restarts the replicas.

A model whose registry (or store) is down when the application starts does not stop it: the replicas start
without it, answer its requests 503 `model_not_loaded` with Retry-After, /healthz says why, and the model loads
once the registry answers (`serve_app.model.OFAModelServer.reconfigure`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from ofa_model.errors import ConfigError
from serve_app.api import OFAIngress
from serve_app.model import OFAModelServer
from serve_app.serve_config import ServeConfig, config_from_args, read_api_key

log = logging.getLogger(__name__)


def deployment_name(model: str) -> str:
    return f"model-{model}"


def absolute_paths(cfg: ServeConfig) -> ServeConfig:
    """Local paths (bundle sources, the key file, the model cache) made absolute where they exist here, so
    replicas, whatever their working directory, find them."""

    def absolute(p: str | None) -> str | None:
        if p is None or p.startswith("models:") or "://" in p:
            return p
        path = Path(p).expanduser()
        return str(path.resolve()) if path.exists() else p

    models = {name: dataclasses.replace(m, source=absolute(m.source)) for name, m in cfg.models.items()}
    return dataclasses.replace(cfg, models=models, api_key_file=absolute(cfg.api_key_file),
                               model_cache=absolute(cfg.model_cache))


def with_tracking(cfg: ServeConfig) -> ServeConfig:
    """`cfg` with its tracking URI resolved here, where the application is built (the configured one, else this
    process's MLFLOW_TRACKING_URI, else ./mlflow.db made absolute), so every replica, on any node, resolves
    models:/ sources on the same registry. A models:/ source with neither configured, and no ./mlflow.db here, is
    a ConfigError: the replicas would look in an empty registry."""
    from pipelines.tracking.registry import tracking_uri  # imports mlflow: only when an application is built

    uri = tracking_uri(cfg.tracking_uri)
    registry = sorted(name for name, m in cfg.models.items() if m.source.startswith("models:"))
    default = not cfg.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI")
    if registry and default and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"tracking_uri: models.{registry[0]}.source is {cfg.models[registry[0]].source}, but no "
                          f"tracking server is configured (tracking_uri, or MLFLOW_TRACKING_URI where the "
                          f"application is built) and there is no registry at {uri}")
    return dataclasses.replace(cfg, tracking_uri=uri)


def build(cfg: ServeConfig) -> Application:
    """The application of `cfg`: the ingress bound to one model deployment per model."""
    cfg = with_tracking(absolute_paths(cfg))
    read_api_key(cfg)  # a configured key must be readable now, not at the first request
    retry = BackpressureConfig(status_code=503, retry_after_s=float(math.ceil(max(cfg.retry_after_s, 1.0))))
    # MLflow's own HTTP retries (~4 minutes against a server that is down) off in the model replicas: the
    # replica's backoff tries again (load_retry_max_s), and each try ends within registry_timeout_s per call
    registry_env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(cfg.registry_timeout_s)}
    a = cfg.autoscaling
    handles = {}
    for name, m in cfg.models.items():
        handles[name] = OFAModelServer.options(
            name=deployment_name(name),
            ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus,
                               "runtime_env": {"env_vars": registry_env}},  # merged into the application's
            autoscaling_config={"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                "initial_replicas": max(a.min_replicas, 1),
                                "target_ongoing_requests": a.target_ongoing_requests,
                                "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
                                "look_back_period_s": a.look_back_period_s},
            max_ongoing_requests=cfg.max_ongoing_requests,
            max_queued_requests=cfg.max_queued_requests,
            backpressure_config=retry,
            user_config={"source": m.source},
            graceful_shutdown_timeout_s=cfg.request_timeout_s + 5,  # a replica going away finishes its requests
            logging_config={"encoding": cfg.log_encoding},
        ).bind(name, cfg)
    i = cfg.ingress
    return OFAIngress.options(
        num_replicas=i.replicas,
        ray_actor_options={"num_cpus": i.num_cpus},
        max_ongoing_requests=i.max_ongoing_requests,
        max_queued_requests=i.max_queued_requests,
        backpressure_config=retry,
        graceful_shutdown_timeout_s=cfg.request_timeout_s + 5,
        logging_config={"encoding": cfg.log_encoding},
    ).bind(cfg, handles)


def build_app(args: Mapping[str, Any]) -> Application:
    """Application builder for `serve run serve_app.app:build_app key=value ...` and `serve deploy`'s
    `import_path` (see `serve_app.serve_config.config_from_args` for the arguments)."""
    return build(config_from_args(args))


def proxy_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve's `http_options` for `cfg`: what `start` starts Serve with, and what a `serve deploy` file's
    http_options should say beside these args (tests check the repository's files). The request timeout is
    body_timeout_s + request_timeout_s + 10 s, so the ingress, not the proxy, answers a slow request."""
    return {"host": cfg.host, "port": cfg.port, "keep_alive_timeout_s": cfg.keep_alive_timeout_s,
            "request_timeout_s": cfg.body_timeout_s + cfg.request_timeout_s + 10}


def start(cfg: ServeConfig, *, timeout_s: float = 180.0) -> str:
    """Start Serve (if it is not running yet) with its HTTP proxy on `cfg.host`:`cfg.port`, run `build(cfg)` as
    application `cfg.app_name` at `cfg.route_prefix` (replacing an application of that name), and wait until its
    /healthz answers 200 (every model loaded and answering); returns the application's base URL.

    A model waiting for its source (/healthz state "waiting": the registry or store is down) does not hold the
    start: once every other model serves, this returns with a warning naming it and why; it loads when its
    source answers. Needs a connected Ray. The proxy's options (`proxy_options`) apply where this call starts
    Serve; a running Serve keeps its own. RuntimeError when /healthz has not answered 200 (or "waiting") after
    `timeout_s`; a model whose source is wrong fails `serve.run` itself.
    """
    serve.start(http_options=proxy_options(cfg))
    try:
        serve.run(build(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)  # once RUNNING
    except RuntimeError as exc:  # DEPLOY_FAILED: the application's message names no cause, its deployments' do
        raise RuntimeError(f"{exc}\n{_deployment_messages(cfg.app_name)}") from exc
    prefix = cfg.route_prefix.rstrip("/")
    health = _wait_healthy(f"http://{_reachable(cfg.host)}:{cfg.port}{prefix}/healthz", timeout_s)
    for name, reason in health.get("reasons", {}).items():
        log.warning("model %s: %s", name, reason)
    return f"http://{cfg.host}:{cfg.port}{prefix}"


def _deployment_messages(app_name: str) -> str:
    """Each of the application's deployments with Serve's message about it (a failed replica's traceback)."""
    status = serve.status().applications.get(app_name)
    if status is None:
        return "(no status)"
    return "\n".join(f"{name} {d.status}: {d.message}" for name, d in status.deployments.items() if d.message)


def _reachable(host: str) -> str:
    """How this process reaches a proxy bound to `host`: loopback for a wildcard address, IPv6 in brackets."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def _wait_healthy(url: str, timeout_s: float) -> dict:
    """/healthz's body once it answers 200, or 503 with every model serving or waiting for its source."""
    deadline = time.monotonic() + timeout_s
    status: int | str = "no answer"
    while time.monotonic() < deadline:
        body: dict = {}
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                status, body = resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                body = json.loads(exc.read())
            except ValueError:
                pass
        except OSError as exc:
            status = f"no answer ({exc})"
        states = body.get("states") if isinstance(body, dict) else None
        if status == 200 or (status == 503 and states and set(states.values()) <= {"serving", "waiting"}):
            return body
        time.sleep(0.5)
    raise RuntimeError(f"the Serve application is not healthy: {url} answered {status} for {timeout_s:.0f} s"
                       + (f": {body.get('reasons')}" if isinstance(body, dict) and body.get("reasons") else ""))
