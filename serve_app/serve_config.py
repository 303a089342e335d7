"""`ServeConfig`: everything the online-inference application needs, as nested frozen dataclasses.

Loaded by `serve_config(path, overrides, model=...)` through the one loader of every config,
`ofa_model.config_files` (`read_config`, the shortcuts, then `build`): YAML (1.2 scalars) plus dotted `key=value`
overrides, validated strictly (an
unknown key, a value out of its range, or a string or boolean for a number, is a ConfigError naming the dotted
key). Ranges are on the fields; `__post_init__` holds the rules that relate several fields. The same
fields are the `args:` of `serve_config.yaml` and the `key=value` arguments of `serve run
serve_app.app:build_app` and `python -m jobs.serve`.

    models:                      # one Serve deployment per model
      vqa: {source: "models:/ofa-vqa@champion", tasks: [vqa]}
      default: {source: bundles/ofa-tiny}       # no tasks: serves every task the others do not
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from ofa_model.config_files import build, config_dataclass, read_config
from ofa_model.errors import ConfigError
from ofa_model.predictor import PredictorLimits

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]  # model and application names
Seconds = Annotated[float, Field(ge=0.0, le=86400.0)]
MIN_KEY_CHARS = 16  # an API key shorter than this is refused as guessable


@config_dataclass
class ModelSection:
    """source: a bundle directory, `s3://bucket/prefix` or `models:/name@alias` / `models:/name/version`. tasks:
    the tasks routed to this model; empty: every task no other model lists (at most one model may be this
    fallback)."""

    source: Annotated[str, Field(pattern=r"\S")]  # not blank
    tasks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks lists a task twice: {list(self.tasks)}")


@config_dataclass
class AutoscalingSection:
    """Serve's autoscaler for each model deployment: replicas between min and max, aiming at
    `target_ongoing_requests` per replica (with batching, about max_batch_size keeps a replica busy)."""

    min_replicas: Annotated[int, Field(ge=0, le=1024)] = 1
    max_replicas: Annotated[int, Field(ge=1, le=1024)] = 1
    target_ongoing_requests: Annotated[float, Field(ge=0.01, le=1e6)] = 8.0
    upscale_delay_s: Seconds = 30.0
    downscale_delay_s: Seconds = 600.0
    look_back_period_s: Annotated[float, Field(ge=0.1, le=86400.0)] = 30.0  # the window requests are averaged over

    def __post_init__(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas ({self.min_replicas}) must not exceed "
                             f"autoscaling.max_replicas ({self.max_replicas})")


@config_dataclass
class LimitsSection:
    """The most work one request may ask for (`ofa_model.predictor.PredictorLimits`) and the image limits that
    replace the bundle's (`PreprocessConfig.max_image_bytes` / `max_image_pixels`). The defaults keep one
    request to a few seconds of CPU on ofa-tiny."""

    max_items: Annotated[int, Field(ge=1)] = 8
    max_beam_tokens: Annotated[int, Field(ge=1)] = 1024
    max_return_sequences: Annotated[int, Field(ge=1)] = 8
    max_candidates: Annotated[int, Field(ge=1)] = 1000
    max_text_chars: Annotated[int, Field(ge=1)] = 4096
    max_samples: Annotated[int, Field(ge=1, le=64)] = 4  # images one text-to-image item asks for
    max_sample_codes: Annotated[int, Field(ge=1)] = 4 * 1024  # its samples x the model's code grid
    max_images: Annotated[int, Field(ge=1)] = 8  # images generated in one model call
    max_image_bytes: Annotated[int, Field(ge=1, le=2**30)] = 8 * 2**20
    max_image_pixels: Annotated[int, Field(ge=1, le=2**31)] = 25_000_000

    def predictor_limits(self) -> PredictorLimits:
        """The predictor's limits: every PredictorLimits field, as this section sets it (Serve's defaults are
        tighter than a batch job's)."""
        return PredictorLimits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PredictorLimits)})


@config_dataclass
class IngressSection:
    """The HTTP ingress deployment (FastAPI; parsing and routing only, so it needs little CPU)."""

    replicas: Annotated[int, Field(ge=1, le=1024)] = 1
    num_cpus: Annotated[float, Field(ge=0.0, le=1024.0)] = 0.25
    max_ongoing_requests: Annotated[int, Field(ge=1)] = 256
    max_queued_requests: Annotated[int, Field(ge=-1)] = 1024  # -1: unbounded


LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


@config_dataclass
class ServeConfig:
    """host/port: where `jobs.serve` binds HTTP (127.0.0.1 unless configured; another address needs an API key).
    max_batch_size / batch_wait_timeout_s: `@serve.batch` of each model replica (requests per model call, and how long the first
    waits for company). num_cpus / num_gpus: per model replica (fractions allowed). max_ongoing_requests: per
    model replica; max_queued_requests: requests waiting for a replica, the excess answered 503 with
    Retry-After: retry_after_s. request_timeout_s: a request's time in the model deployment before it is
    answered 504. max_body_bytes: request bodies over it are answered 413, never buffered (read and dropped up
    to 64 MiB first, so that clients read the answer). body_timeout_s: a request's whole body must arrive
    within this many seconds of its headers, else it is answered 408 and its connection closed (a client
    trickling its body holds no model replica, and the connection only this long; 30 s asks 16 MiB bodies for
    0.55 MB/s). keep_alive_timeout_s: Serve's proxy closes a connection idle this long after a response
    (Serve's default, 90, outlasts the 60 s idle timeout of common load balancers in front of it); with
    body_timeout_s and request_timeout_s it is applied by `serve_app.app.start` where that starts Serve
    (`serve deploy` takes it from the file's http_options). load_retry_max_s: a model source that cannot be
    reached (registry or store down) is tried again after 1 s, the wait doubling up to this.
    registry_timeout_s: one MLflow HTTP call's timeout in the model replicas, where MLflow's own retries are off
    (with its defaults a call to a server that is down takes ~4 minutes). device: "auto" is CUDA where the replica sees a CUDA
    device, else CPU (logged). precision / memory_format: passed to `OFAPredictor`; the
    defaults (fp32, channels-last, BatchNorms folded) keep plain fp32's answers, bf16 is faster on AMX/AVX-512
    BF16 CPUs and Ampere+ GPUs but changes some beam outputs (bench/inference.py fidelity).
    torch_threads: torch's intra-op threads per replica (None: torch's default). api_key_env / api_key_file:
    where the replicas read the API key (never from the command line); none: no key required. tracking_uri:
    MLflow for models:/ sources, resolved where the application is built and handed to every replica (None:
    MLFLOW_TRACKING_URI there, else its ./mlflow.db, which must exist). model_cache: where registry versions are downloaded (None: the registry's default).
    log_encoding: Serve's replica log format."""

    models: Annotated[dict[Name, ModelSection], Field(min_length=1)]  # name: {source: ...}
    app_name: Name = "ofa"
    host: Annotated[str, Field(pattern=r"\S")] = "127.0.0.1"  # an address to bind
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    route_prefix: Annotated[str, Field(pattern=r"^/")] = "/"
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = 8
    batch_wait_timeout_s: Annotated[float, Field(ge=0.0, le=60.0)] = 0.01
    autoscaling: AutoscalingSection = field(default_factory=AutoscalingSection)
    num_cpus: Annotated[float, Field(ge=0.0, le=1024.0)] = 1.0
    num_gpus: Annotated[float, Field(ge=0.0, le=64.0)] = 0.0
    max_ongoing_requests: Annotated[int, Field(ge=1)] = 16
    max_queued_requests: Annotated[int, Field(ge=-1)] = 64  # -1: unbounded
    retry_after_s: Annotated[float, Field(ge=0.0, le=3600.0)] = 1.0
    request_timeout_s: Annotated[float, Field(ge=0.01, le=86400.0)] = 30.0
    max_body_bytes: Annotated[int, Field(ge=1024, le=2**31)] = 16 * 2**20
    body_timeout_s: Annotated[float, Field(ge=0.1, le=3600.0)] = 30.0
    keep_alive_timeout_s: Annotated[int, Field(ge=1, le=3600)] = 90
    load_retry_max_s: Annotated[float, Field(ge=1.0, le=3600.0)] = 30.0
    registry_timeout_s: Annotated[int, Field(ge=1, le=600)] = 10
    limits: LimitsSection = field(default_factory=LimitsSection)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    torch_threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None  # a variable name
    api_key_file: str | None = None
    tracking_uri: str | None = None
    model_cache: str | None = None
    log_encoding: Literal["TEXT", "JSON"] = "TEXT"
    ingress: IngressSection = field(default_factory=IngressSection)

    def __post_init__(self) -> None:
        fallbacks = [name for name, m in self.models.items() if not m.tasks]
        if len(fallbacks) > 1:
            raise ValueError(f"models {fallbacks} all list no tasks; at most one model may be the fallback")
        owner: dict[str, str] = {}
        for name, m in self.models.items():
            for task in m.tasks:
                if task in owner:
                    raise ValueError(f"models.{name}.tasks: task {task!r} is routed to both models {owner[task]} "
                                     f"and {name}")
                owner[task] = name
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches never fill")
        if self.api_key_env and self.api_key_file:
            raise ValueError("api_key_env / api_key_file: set one, not both")
        if self.host not in LOOPBACK and not (self.api_key_env or self.api_key_file):
            raise ValueError(f"host {self.host}: binding beyond this machine needs an API key: set api_key_env "
                             f"(a variable name) or api_key_file")

    def route(self) -> dict[str, str]:
        """task -> model name, for the tasks models list."""
        return {task: name for name, m in self.models.items() for task in m.tasks}

    def fallback(self) -> str | None:
        """The model that serves every task no other model lists, if any."""
        return next((name for name, m in self.models.items() if not m.tasks), None)


def serve_config(path: str | Path | None = None, overrides: Sequence[str] = (), *,
                 data: Mapping[str, Any] | None = None, model: str | None = None, host: str | None = None,
                 port: int | None = None) -> ServeConfig:
    """The config from a YAML file (or `data`), then `overrides` (dotted `key=value`, values parsed as YAML),
    then the shortcuts: `model` replaces `models` with one fallback model of that source; `host` and `port`
    replace theirs. Any problem is a ConfigError naming the dotted key."""
    source = str(path) if path is not None else "<args>"
    shortcuts = {"models": None if model is None else {"default": {"source": model}}, "host": host, "port": port}
    raw = read_config(path, overrides, data=data, source=source)
    raw.update({key: value for key, value in shortcuts.items() if value is not None})
    if "models" not in raw:
        raise ConfigError(f"{source}: no model: pass model=<bundle dir or models:/name@alias> or a models section")
    return build(ServeConfig, raw, source)


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
