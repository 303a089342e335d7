"""`ServeConfig`: everything the online-inference application needs, as nested frozen dataclasses.

Loaded by `serve_config(path, overrides, model=...)`: YAML (1.2 scalars) plus dotted `key=value` overrides,
validated strictly (an unknown key, or a string or boolean for a number, is a ConfigError naming the dotted key),
as `pipelines.job_config` does for the jobs (`serve_app` reaches `pipelines` only through the registry). The same
fields are the `args:` of `serve_config.yaml` and the `key=value` arguments of `serve run
serve_app.app:build_app` and `python -m jobs.serve`.

    models:                      # one Serve deployment per model
      vqa: {source: "models:/ofa-vqa@champion", tasks: [vqa]}
      default: {source: bundles/ofa-tiny}       # no tasks: serves every task the others do not
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import ConfigDict

from ofa_model.config_text import ConfigError, merge, parse_overrides, read_config_file
from ofa_model.config_text import check as _check
from ofa_model.config_text import check_finite as _finite
from ofa_model.predictor import PredictorLimits

_FORBID = ConfigDict(extra="forbid")  # `serve_config`: an unknown key is an error
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")  # model and application names
MIN_KEY_CHARS = 16  # an API key shorter than this is refused as guessable


@dataclass(frozen=True)
class ModelSection:
    """source: a bundle directory or `models:/name@alias` / `models:/name/version`. tasks: the tasks routed to
    this model; empty: every task no other model lists (at most one model may be this fallback)."""

    __pydantic_config__ = _FORBID

    source: str
    tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(bool(self.source.strip()), "models.<name>.source must be a bundle directory or a models:/ URI")
        _check(len(set(self.tasks)) == len(self.tasks), f"models.<name>.tasks lists a task twice: {self.tasks}")


@dataclass(frozen=True)
class AutoscalingSection:
    """Serve's autoscaler for each model deployment: replicas between min and max, aiming at
    `target_ongoing_requests` per replica (with batching, about max_batch_size keeps a replica busy)."""

    __pydantic_config__ = _FORBID

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0  # the window ongoing requests are averaged over

    def __post_init__(self) -> None:
        _check(0 <= self.min_replicas <= self.max_replicas <= 1024,
               f"autoscaling: need 0 <= min_replicas <= max_replicas <= 1024, got {self.min_replicas}, "
               f"{self.max_replicas}")
        _check(self.max_replicas >= 1, "autoscaling.max_replicas must be >= 1")
        _finite("autoscaling.target_ongoing_requests", self.target_ongoing_requests, 0.01, 1e6)
        _finite("autoscaling.upscale_delay_s", self.upscale_delay_s, 0.0, 86400.0)
        _finite("autoscaling.downscale_delay_s", self.downscale_delay_s, 0.0, 86400.0)
        _finite("autoscaling.look_back_period_s", self.look_back_period_s, 0.1, 86400.0)


@dataclass(frozen=True)
class LimitsSection:
    """The most work one request may ask for (`ofa_model.predictor.PredictorLimits`) and the image limits that
    replace the bundle's (`PreprocessConfig.max_image_bytes` / `max_image_pixels`). The defaults keep one
    request to a few seconds of CPU on ofa-tiny."""

    __pydantic_config__ = _FORBID

    max_items: int = 8
    max_beam_tokens: int = 1024
    max_return_sequences: int = 8
    max_candidates: int = 1000
    max_text_chars: int = 4096
    max_image_bytes: int = 8 * 2**20
    max_image_pixels: int = 25_000_000

    def __post_init__(self) -> None:
        _check(1 <= self.max_image_bytes <= 2**30, f"limits.max_image_bytes must lie in [1, 2**30], "
                                                  f"got {self.max_image_bytes}")
        _check(1 <= self.max_image_pixels <= 2**31, f"limits.max_image_pixels must lie in [1, 2**31], "
                                                    f"got {self.max_image_pixels}")
        self.predictor_limits()  # checks the rest

    def predictor_limits(self) -> PredictorLimits:
        return PredictorLimits(max_items=self.max_items, max_beam_tokens=self.max_beam_tokens,
                               max_return_sequences=self.max_return_sequences, max_candidates=self.max_candidates,
                               max_text_chars=self.max_text_chars)


@dataclass(frozen=True)
class IngressSection:
    """The HTTP ingress deployment (FastAPI; parsing and routing only, so it needs little CPU)."""

    __pydantic_config__ = _FORBID

    replicas: int = 1
    num_cpus: float = 0.25
    max_ongoing_requests: int = 256
    max_queued_requests: int = 1024

    def __post_init__(self) -> None:
        _check(1 <= self.replicas <= 1024, f"ingress.replicas must lie in [1, 1024], got {self.replicas}")
        _finite("ingress.num_cpus", self.num_cpus, 0.0, 1024.0)
        _check(self.max_ongoing_requests >= 1, "ingress.max_ongoing_requests must be >= 1")
        _check(self.max_queued_requests >= -1, "ingress.max_queued_requests must be >= -1 (-1: unbounded)")


@dataclass(frozen=True)
class ServeConfig:
    """host/port: where `jobs.serve` binds HTTP (127.0.0.1 unless configured). max_batch_size /
    batch_wait_timeout_s: `@serve.batch` of each model replica (requests per model call, and how long the first
    waits for company). num_cpus / num_gpus: per model replica (fractions allowed). max_ongoing_requests: per
    model replica; max_queued_requests: requests waiting for a replica, the excess answered 503 with
    Retry-After: retry_after_s. request_timeout_s: a request's time in the model deployment before it is
    answered 504. max_body_bytes: request bodies over it are answered 413 unread. device: "auto" is CUDA where
    the replica sees a CUDA device, else CPU (logged). precision / memory_format: passed to `OFAPredictor`; the
    defaults (fp32, channels-last, BatchNorms folded) keep plain fp32's answers, bf16 is faster on AMX/AVX-512
    BF16 CPUs and Ampere+ GPUs but changes some beam outputs (bench/inference.py fidelity).
    torch_threads: torch's intra-op threads per replica (None: torch's default). api_key_env / api_key_file:
    where the replicas read the API key (never from the command line); none: no key required. tracking_uri:
    MLflow for models:/ sources (None: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working
    directory). model_cache: where registry versions are downloaded (None: the registry's default).
    log_encoding: Serve's replica log format."""

    __pydantic_config__ = _FORBID

    models: dict[str, ModelSection]
    app_name: str = "ofa"
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    autoscaling: AutoscalingSection = field(default_factory=AutoscalingSection)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 16
    max_queued_requests: int = 64
    retry_after_s: float = 1.0
    request_timeout_s: float = 30.0
    max_body_bytes: int = 16 * 2**20
    limits: LimitsSection = field(default_factory=LimitsSection)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    torch_threads: int | None = None
    api_key_env: str | None = None
    api_key_file: str | None = None
    tracking_uri: str | None = None
    model_cache: str | None = None
    log_encoding: Literal["TEXT", "JSON"] = "TEXT"
    ingress: IngressSection = field(default_factory=IngressSection)

    def __post_init__(self) -> None:
        _check(bool(self.models), "models must name at least one model (name: {source: ...})")
        for name in self.models:
            _check(bool(NAME.match(name)), f"models.{name}: a model name is 1-64 letters, digits, '_', '.', '-'")
        fallbacks = [name for name, m in self.models.items() if not m.tasks]
        _check(len(fallbacks) <= 1, f"models {fallbacks} all list no tasks; at most one model may be the fallback")
        owner: dict[str, str] = {}
        for name, m in self.models.items():
            for task in m.tasks:
                _check(task not in owner, f"task {task!r} is routed to both models {owner.get(task)} and {name}")
                owner[task] = name
        _check(bool(NAME.match(self.app_name)), f"app_name {self.app_name!r}: 1-64 letters, digits, '_', '.', '-'")
        _check(bool(self.host.strip()), "host must be an address to bind, such as 127.0.0.1")
        _check(1 <= self.port <= 65535, f"port must lie in [1, 65535], got {self.port}")
        _check(self.route_prefix.startswith("/"), f"route_prefix must start with '/', got {self.route_prefix!r}")
        _check(1 <= self.max_batch_size <= 1024, f"max_batch_size must lie in [1, 1024], got {self.max_batch_size}")
        _finite("batch_wait_timeout_s", self.batch_wait_timeout_s, 0.0, 60.0)
        _finite("num_cpus", self.num_cpus, 0.0, 1024.0)
        _finite("num_gpus", self.num_gpus, 0.0, 64.0)
        _check(self.max_ongoing_requests >= self.max_batch_size,
               f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
               f"({self.max_batch_size}), or batches never fill")
        _check(self.max_queued_requests >= -1, "max_queued_requests must be >= -1 (-1: unbounded)")
        _finite("retry_after_s", self.retry_after_s, 0.0, 3600.0)
        _finite("request_timeout_s", self.request_timeout_s, 0.01, 86400.0)
        _check(1024 <= self.max_body_bytes <= 2**31, f"max_body_bytes must lie in [1024, 2**31], "
                                                     f"got {self.max_body_bytes}")
        _check(self.torch_threads is None or 1 <= self.torch_threads <= 1024, "torch_threads must be >= 1 or null")
        _check(not (self.api_key_env and self.api_key_file), "set api_key_env or api_key_file, not both")
        if self.api_key_env is not None:
            _check(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env)),
                   f"api_key_env must be an environment variable name, got {self.api_key_env!r}")

    def route(self) -> dict[str, str]:
        """task -> model name, for the tasks models list."""
        return {task: name for name, m in self.models.items() for task in m.tasks}

    def fallback(self) -> str | None:
        """The model that serves every task no other model lists, if any."""
        return next((name for name, m in self.models.items() if not m.tasks), None)


def _validate(raw: Mapping[str, Any], source: str) -> ServeConfig:
    """Strict, JSON-typed validation: no unknown key, no string or boolean taken for a number."""
    try:
        text = json.dumps(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: values must be plain YAML/JSON data ({exc})") from None
    try:
        return pydantic.TypeAdapter(ServeConfig).validate_json(text, strict=True)
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
            ctx = err.get("ctx", {}).get("error")
            unknown = err["type"] in ("extra_forbidden", "unexpected_keyword_argument")
            msg = "unknown key" if unknown else ctx if ctx is not None else err["msg"]
            problems.append(f"{loc or '(top level)'}: {msg}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def serve_config(path: str | Path | None = None, overrides: Sequence[str] = (), *,
                 data: Mapping[str, Any] | None = None, model: str | None = None, host: str | None = None,
                 port: int | None = None) -> ServeConfig:
    """The config from a YAML file (or `data`), then `overrides` (dotted `key=value`, values parsed as YAML),
    then the shortcuts: `model` replaces `models` with one fallback model of that source; `host` and `port`
    replace theirs. Any problem is a ConfigError naming the dotted key."""
    source = str(path) if path is not None else "<args>"
    raw = merge(merge(read_config_file(path, source), data or {}), parse_overrides(overrides))
    if model is not None:
        raw["models"] = {"default": {"source": model}}
    if host is not None:
        raw["host"] = host
    if port is not None:
        raw["port"] = port
    if "models" not in raw:
        raise ConfigError(f"{source}: no model: pass model=<bundle dir or models:/name@alias> or a models section")
    return _validate(raw, source)


def config_from_args(args: Mapping[str, Any]) -> ServeConfig:
    """The config from application arguments: `serve run ... model=x port=8001 autoscaling.max_replicas=4`
    (strings, parsed as YAML) or a config file's `args:` mapping (typed values); `config=<path>` reads a YAML
    file first, `model=<source>` is the one-model shortcut."""
    args = dict(args)
    path = args.pop("config", None)
    model = args.pop("model", None)
    overrides = [f"{k}={v}" for k, v in args.items() if isinstance(v, str)]
    data = {k: v for k, v in args.items() if not isinstance(v, str)}
    return serve_config(path, overrides, data=data, model=model)


def read_api_key(cfg: ServeConfig) -> str | None:
    """The API key from `api_key_env` or `api_key_file` (surrounding whitespace stripped); None when neither is
    configured. A configured but missing, unreadable or short key is a ConfigError (the key is never in it)."""
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "").strip()
        where = f"environment variable {cfg.api_key_env}"
    elif cfg.api_key_file:
        where = f"file {cfg.api_key_file}"
        try:
            key = Path(cfg.api_key_file).expanduser().read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"API key {where}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    else:
        return None
    if len(key) < MIN_KEY_CHARS:
        raise ConfigError(f"API key {where}: {'empty or unset' if not key else 'too short'}; "
                          f"use at least {MIN_KEY_CHARS} random characters")
    return key
