"""The model deployment: one `OFAPredictor` per replica, fed by `@serve.batch`, swapped by `reconfigure`.

    OFAModelServer.options(name="model-vqa", user_config={"source": "models:/ofa-vqa@champion"}).bind("vqa", cfg)

* Batching: `@serve.batch` hands a replica the requests that arrived together (`max_batch_size`,
  `batch_wait_timeout_s`). `run_calls` groups the compatible ones (same task, same decoding settings and mode)
  into one `OFAPredictor.predict` call of at most `limits.max_items` inputs, then hands each request its own
  results back. The predictor runs in a worker thread, so the replica keeps accepting requests (they form the
  next batch) while a batch runs.
* Model switch: `reconfigure({"source": ...})` (Serve calls it at start and whenever the deployment's
  `user_config` changes) loads the new model in a thread and swaps one reference; a batch already running
  keeps the model it started with, so no request is dropped or answered by a half-loaded model.
* The only work here besides the predictor is transport: base64 image fields become bytes (a bad one fails its
  item alone). Prompts, preprocessing, boxes and limits are the predictor's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from ofa_model.errors import BAD_IMAGE, InputError, error_dict
from ofa_model.predictor import OFAPredictor
from serve_app.schemas import INTERNAL
from serve_app.serve_config import ServeConfig

log = logging.getLogger(f"ray.serve.{__name__}")  # under Serve's logger: replica log files and stderr

_DATA_URL = re.compile(r"^data:[\w.+\-/]*;base64,", re.IGNORECASE)
USER_CONFIG_KEYS = frozenset({"source", "revision"})  # revision: bump it to reload the same source (a moved alias)


# ---------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedModel:
    """A predictor and where it came from."""

    predictor: OFAPredictor
    source: str
    registered_name: str | None
    version: str | None
    tags: dict[str, str] = field(default_factory=dict)
    loaded_at: float = 0.0

    def describe(self) -> str:
        registered = f" ({self.registered_name} version {self.version})" if self.registered_name else ""
        return f"{self.source}{registered}"

    @property
    def metrics(self) -> dict[str, float]:
        """The registered version's validation metrics (its `metric.<name>` tags)."""
        out = {}
        for key, value in self.tags.items():
            if key.startswith("metric."):
                try:
                    out[key[len("metric."):]] = float(value)
                except ValueError:
                    log.warning("tag %s=%r of %s is not a number", key, value, self.source)
        return out


def pick_device(setting: str, num_gpus: float, cuda_available: bool) -> tuple[str, str | None]:
    """(device, note): "auto" is CUDA when the replica was given GPUs and sees a CUDA device, else CPU (with a
    note saying why when GPUs were given)."""
    if setting == "cuda":
        if not cuda_available:
            raise RuntimeError("device: cuda is configured but this replica sees no CUDA device; "
                               "set device: auto or cpu, or give the replicas GPUs (num_gpus)")
        return "cuda", None
    if setting == "cpu" or num_gpus == 0:
        return "cpu", None
    if cuda_available:
        return "cuda", None
    return "cpu", f"num_gpus={num_gpus} was requested but no CUDA device is visible: running on CPU"


def load_model(name: str, source: str, cfg: ServeConfig, device: str) -> LoadedModel:
    """The predictor of `source` (a bundle directory or models:/ URI) with the limits of `cfg`."""
    from ofa_model.bundle import load_bundle
    from pipelines.tracking.registry import resolve_model  # imports mlflow: only where a model is loaded

    resolved = resolve_model(source, tracking=cfg.tracking_uri, cache_dir=cfg.model_cache)
    bundle = load_bundle(resolved.path, device=device)
    preprocess = dataclasses.replace(bundle.preprocess, max_image_bytes=cfg.limits.max_image_bytes,
                                     max_image_pixels=cfg.limits.max_image_pixels)
    predictor = OFAPredictor(bundle.model, bundle.vocab, preprocess, device=device, tasks=bundle.tasks,
                             answer_sets=bundle.answer_sets, max_batch_size=cfg.max_batch_size,
                             limits=cfg.limits.predictor_limits(), precision=cfg.precision,
                             memory_format=cfg.memory_format, image_tokenizer=bundle.image_tokenizer)
    unknown = sorted(set(cfg.models[name].tasks) - set(predictor.tasks))
    if unknown:
        raise ValueError(f"models.{name}.tasks: {unknown} are not tasks of {source} (it has: "
                         f"{', '.join(sorted(predictor.tasks))})")
    return LoadedModel(predictor, source, resolved.name, resolved.version, dict(resolved.tags), time.time())


# ---------------------------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class Call:
    """One request to the model: a task and its inputs (dicts of the predictor's fields)."""

    task: str
    items: list[dict[str, Any]]


def compat_key(call: Call) -> tuple[str, str]:
    """Calls with equal keys go into one predictor call: the task and the set of (mode, decoding) they use."""
    settings = {json.dumps([it.get("mode"), it.get("decoding")], sort_keys=True, default=repr)
                for it in call.items if isinstance(it, Mapping)}
    return call.task, json.dumps(sorted(settings))


def decode_image_field(value: Any, name: str) -> Any:
    """Bytes of a base64 string (an optional data: URL prefix is dropped); any other value unchanged."""
    if not isinstance(value, str):
        return value
    if value.startswith(("http://", "https://", "ftp://", "file:")):
        raise InputError(f"field {name!r} is a URL; image URLs are never fetched: send the image bytes as base64 "
                         "or as a multipart file", BAD_IMAGE)
    text = _DATA_URL.sub("", value, count=1)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"field {name!r} is not valid base64 ({exc})", BAD_IMAGE) from None


def _prepare(predictor: OFAPredictor, call: Call) -> tuple[list[dict], dict[int, dict]]:
    """(the inputs the predictor gets, {position: error} of the items that failed before it)."""
    spec = predictor.tasks.get(call.task) if isinstance(call.task, str) else None
    if spec is None or spec.image_field is None or len(call.items) > predictor.limits.max_items:
        return list(call.items), {}  # the predictor refuses the call or there is no image to decode
    inputs, errors = [], {}
    for pos, item in enumerate(call.items):
        if not isinstance(item, Mapping) or spec.image_field not in item:
            inputs.append(item)
            continue
        try:
            inputs.append({**item, spec.image_field: decode_image_field(item[spec.image_field], spec.image_field)})
        except InputError as exc:
            errors[pos] = error_dict(exc)
    return inputs, errors


def _pack(members: list[int], sizes: Sequence[tuple[int, int]], limits: tuple[int, int]) -> list[list[int]]:
    """Consecutive runs of `members` whose sizes (inputs, images to generate) add up to at most `limits`
    (max_items, max_images) in each; a larger one alone. A request within the limits is never refused because
    others arrived with it."""
    chunks: list[list[int]] = []
    total = (0, 0)
    for m in members:
        grown = (total[0] + sizes[m][0], total[1] + sizes[m][1])
        if chunks and grown[0] <= limits[0] and grown[1] <= limits[1]:
            chunks[-1].append(m)
            total = grown
        else:
            chunks.append([m])
            total = sizes[m]
    return chunks


def internal_error(message: str = "internal error") -> dict:
    return {"error": {"type": "InternalError", "reason": INTERNAL, "message": message}}


def run_calls(predictor: OFAPredictor, calls: Sequence[Call]) -> tuple[list[dict], int]:
    """One answer per call, `{"results": [...]}` (one per item) or `{"error": {...}}` for a call the predictor
    refuses whole; and how many predictor calls were made."""
    answers: list[dict | None] = [None] * len(calls)
    prepared = [_prepare(predictor, c) for c in calls]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(calls):
        groups.setdefault(compat_key(c), []).append(i)
    sizes = [(len(p[0]), predictor.images_asked(c.task, p[0])) for c, p in zip(calls, prepared, strict=True)]
    n_predict = 0
    for (task, _), members in groups.items():
        for chunk in _pack(members, sizes, (predictor.limits.max_items, predictor.limits.max_images)):
            inputs = [x for i in chunk for x in prepared[i][0]]
            n_predict += 1
            try:
                results = predictor.predict(task, inputs)
            except InputError as exc:
                for i in chunk:
                    answers[i] = error_dict(exc)
                continue
            except Exception:  # a bug: answer 500 for these calls, keep the rest of the batch
                log.exception("predictor failed on task %r (%d inputs)", task, len(inputs))
                for i in chunk:
                    answers[i] = internal_error()
                continue
            pos = 0
            for i in chunk:
                inputs_i, errors_i = prepared[i]
                mine = iter(results[pos:pos + len(inputs_i)])
                pos += len(inputs_i)
                answers[i] = {"results": [errors_i[k] if k in errors_i else next(mine)
                                          for k in range(len(calls[i].items))]}
    return answers, n_predict  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- deployment


def rss_mb() -> float | None:
    """This process's resident memory in MiB (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


@dataclass
class BatchStats:
    """What one replica has batched (for GET /v1/models and the batching test)."""

    batches: int = 0
    requests: int = 0
    items: int = 0
    predictor_calls: int = 0
    largest_batch: int = 0
    recent_batches: collections.deque = field(default_factory=lambda: collections.deque(maxlen=32))

    def add(self, calls: Sequence[Call], n_predict: int) -> None:
        self.batches += 1
        self.requests += len(calls)
        self.items += sum(len(c.items) for c in calls)
        self.predictor_calls += n_predict
        self.largest_batch = max(self.largest_batch, len(calls))
        self.recent_batches.append(len(calls))

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "requests": self.requests, "items": self.items,
                "predictor_calls": self.predictor_calls, "largest_batch": self.largest_batch,
                "recent_batches": list(self.recent_batches)}


@serve.deployment
class OFAModelServer:
    """One configured model: `predict(task, items)` is batched with other requests to this replica."""

    def __init__(self, name: str, cfg: ServeConfig) -> None:
        import ray
        import torch
        from ray.serve.metrics import Gauge, Histogram

        self.name, self.cfg = name, cfg
        torch.set_flush_denormal(True)  # the process owner's call: denormals slow CPU matmuls (bench/model.py)
        if cfg.torch_threads is not None:
            torch.set_num_threads(cfg.torch_threads)
        self.device, note = pick_device(cfg.device, cfg.num_gpus, torch.cuda.is_available())
        self.device_note = note
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.resources = {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        if note:
            log.warning("model %s replica %s: %s (assigned GPU ids %s)", name, self.replica, note, self.gpu_ids)
        log.info("model %s replica %s on %s, resources %s", name, self.replica, self.device, self.resources)
        self._model: LoadedModel | None = None
        self.reconfigure_error: str | None = None  # why the last switch failed (the old model still serves)
        self._pending = 0
        self.stats = BatchStats()
        self.predict_batch.set_max_batch_size(cfg.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._m_batch = Histogram("ofa_serve_batch_requests", "requests per model batch",
                                  boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("model",))
        self._m_items = Histogram("ofa_serve_batch_items", "inputs per model batch",
                                  boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=("model",))
        self._m_batch_ms = Histogram("ofa_serve_batch_latency_ms", "model time per batch (ms)",
                                     boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
                                     tag_keys=("model",))
        self._m_queue = Gauge("ofa_serve_queue_length", "requests in this replica, waiting or running",
                              tag_keys=("model",))
        self._m_load_s = Gauge("ofa_serve_model_load_seconds", "seconds this replica took to load the model it "
                               "serves", tag_keys=("model",))
        for m in (self._m_batch, self._m_items, self._m_batch_ms, self._m_queue, self._m_load_s):
            m.set_default_tags({"model": name})

    async def reconfigure(self, user_config: dict) -> None:
        """Load the model of `user_config["source"]` and switch to it; running batches finish on the old one.
        A source that fails to load leaves a serving replica on its model (logged, and shown by /v1/models)."""
        if not isinstance(user_config, Mapping) or not isinstance(user_config.get("source"), str):
            raise ValueError(f"model {self.name}: user_config must be {{source: <bundle dir or models:/ URI>}}, "
                             f"got {user_config!r}")
        unknown = sorted(set(user_config) - USER_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"model {self.name}: unknown user_config keys {unknown}; known: "
                             f"{sorted(USER_CONFIG_KEYS)}")
        started = time.perf_counter()
        try:
            loaded = await asyncio.to_thread(load_model, self.name, user_config["source"], self.cfg, self.device)
        except Exception as exc:
            if self._model is None:
                raise  # nothing to serve: the replica fails to start, and `serve status` says why
            # A bad new source must not take down a serving replica: keep the model, say so loudly.
            self.reconfigure_error = f"{user_config['source']}: {type(exc).__name__}: {exc}"
            log.error("model %s replica %s: cannot switch to %s; still serving %s", self.name, self.replica,
                      self.reconfigure_error, self._model.describe())
            return
        old, self._model, self.reconfigure_error = self._model, loaded, None
        seconds = time.perf_counter() - started
        self._m_load_s.set(seconds)
        log.info("model %s replica %s: serving %s after %.1f s; was %s", self.name, self.replica, loaded.describe(),
                 seconds, old.describe() if old else "nothing")

    async def predict(self, task: str, items: list[dict]) -> dict:
        """`{"results": [...]} | {"error": ...}` plus the model name and version that answered."""
        self._pending += 1
        self._m_queue.set(self._pending)
        try:
            return await self.predict_batch(Call(task, items))
        finally:
            self._pending -= 1
            self._m_queue.set(self._pending)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # reset from the config in __init__
    async def predict_batch(self, calls: list[Call]) -> list[dict]:
        model = self._model  # this batch's model, whatever reconfigure does meanwhile
        if model is None:
            raise RuntimeError(f"model {self.name}: no model loaded (reconfigure was never called)")
        started = time.perf_counter()
        answers, n_predict = await asyncio.to_thread(run_calls, model.predictor, calls)
        self.stats.add(calls, n_predict)
        self._m_batch.observe(len(calls))
        self._m_items.observe(sum(len(c.items) for c in calls))
        self._m_batch_ms.observe((time.perf_counter() - started) * 1000)
        log.debug("model %s: batch of %d requests, %d predictor calls", self.name, len(calls), n_predict)
        return [{**a, "model": self.name, "version": model.version} for a in answers]

    async def ping(self) -> str | None:
        """The version served (for /healthz); raises while no model is loaded."""
        if self._model is None:
            raise RuntimeError(f"model {self.name}: not loaded")
        return self._model.version

    async def info(self) -> dict[str, Any]:
        """What GET /v1/models shows of this replica."""
        m = self._model
        return {"name": self.name, "source": m.source if m else None,
                "registered_name": m.registered_name if m else None, "version": m.version if m else None,
                "task": m.tags.get("task") if m else None, "known_tasks": sorted(m.predictor.tasks) if m else [],
                "metrics": m.metrics if m else {}, "device": self.device, "device_note": self.device_note,
                "replica": self.replica, "resources": self.resources, "gpu_ids": self.gpu_ids,
                "pending": self._pending, "rss_mb": rss_mb(), "reconfigure_error": self.reconfigure_error,
                "stats": self.stats.as_dict()}

    def check_health(self) -> None:
        if self._model is None:
            raise RuntimeError(f"model {self.name}: no model loaded")
