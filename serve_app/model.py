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
* A source that cannot be reached (the registry or the store is down) does not stop the replica: it starts
  without a model (or keeps the one it serves) and tries again in the background with backoff; see
  `OFAModelServer.reconfigure` for which failures are tried again and which fail the replica.
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
from serve_app.schemas import INTERNAL, NOT_LOADED
from serve_app.serve_config import ServeConfig

log = logging.getLogger(f"ray.serve.{__name__}")  # under Serve's logger: replica log files and stderr

_DATA_URL = re.compile(r"^data:[\w.+\-/]*;base64,", re.IGNORECASE)
PEER_WAIT_S = 5.0  # how long a replica that cannot reach its source asks whether another one serves
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


async def _awaited(response):
    return await response


def unreachable(exc: BaseException) -> bool:
    """Whether a load failed because its source did not answer (`SourceUnreachable`), not because it is wrong."""
    from pipelines.tracking.registry import SourceUnreachable  # imports mlflow: only where a model is loaded

    return isinstance(exc, SourceUnreachable)


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
        self._wanted: str | None = None  # the configured source while it is not the one serving
        self.reconfigure_error: str | None = None  # why _wanted is not serving (the old model, if any, still is)
        self._retry: asyncio.Task | None = None  # trying _wanted again while its source is unreachable
        self._next_try: float | None = None  # when (time.monotonic) that task tries next
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

        Which failures are tried again, and which are not:
        * The source cannot be reached (`SourceUnreachable`: the tracking server or the S3 endpoint refused,
          timed out or answered 5xx). The replica starts anyway, without a model (its requests are answered 503
          `model_not_loaded` with Retry-After, /healthz 503 with the reason), or keeps serving its model, and
          tries the source again in the background: after 1 s, the wait doubling up to `load_retry_max_s`, for
          as long as the source stays unreachable. Each try is logged; the first that reaches the source loads
          it, with no redeploy. A try takes at most about `registry_timeout_s` per registry call (MLflow's own
          retries are off in the replicas, `serve_app.app.build`), so the model serves within
          load_retry_max_s + one load of the registry's return. One exception: a starting replica (a
          replacement, or one the autoscaler adds) whose peers already serve fails to start instead, as before,
          and Serve starts it again later: started empty, it would still be routed its share of the requests,
          only to answer them 503.
        * Anything else is about the source itself (no such model, alias or version; not a bundle; a bundle that
          does not load; tasks it lacks), and the same try would fail the same way. At the first load it fails
          the replica: the deploy fails with the reason in `serve status` (and `serve_app.app.start` raises), so a
          wrong config is never mistaken for an outage. On a serving replica the old model keeps serving and
          the reason is shown (/healthz, /v1/models, the log); it is not tried again until the config changes
          (bump `revision` to retry the same source). The same holds when a source that was unreachable answers
          at last with such an error: tries stop, the reason stays in /healthz.
        """
        if not isinstance(user_config, Mapping) or not isinstance(user_config.get("source"), str):
            raise ValueError(f"model {self.name}: user_config must be {{source: <bundle dir or models:/ URI>}}, "
                             f"got {user_config!r}")
        unknown = sorted(set(user_config) - USER_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"model {self.name}: unknown user_config keys {unknown}; known: "
                             f"{sorted(USER_CONFIG_KEYS)}")
        if self._retry is not None:  # a new config replaces the source that was being tried
            self._retry.cancel()
            self._retry = self._next_try = None
        source = user_config["source"]
        self._wanted = source
        try:
            await self._load(source)
        except Exception as exc:
            if unreachable(exc) and self._model is None and await self._peers_serve():
                # the others serve: started empty, it would only answer its share of requests 503
                log.warning("model %s replica %s: cannot reach %s while other replicas serve: not starting empty "
                            "(Serve starts this replica again): %s", self.name, self.replica, source, exc)
                raise
            if unreachable(exc):
                self._failed(source, exc, tries=1)
                self._retry = asyncio.get_running_loop().create_task(self._keep_trying(source))
            elif self._model is None:
                raise  # a wrong source: the replica fails to start, and `serve status` says why
            else:
                self._failed(source, exc)

    async def _peers_serve(self) -> bool:
        """Whether another replica of this deployment serves a model, asked through the deployment's own handle
        (this replica, still starting, is not routed to); False when none runs, none answers within
        PEER_WAIT_S, or Serve cannot be asked (logged)."""
        ctx = serve.get_replica_context()
        response = None
        try:
            status = (await asyncio.to_thread(serve.status)).applications.get(ctx.app_name)
            deployment = status.deployments.get(ctx.deployment) if status else None
            if deployment is None or not deployment.replica_states.get("RUNNING", 0):
                return False
            response = serve.get_deployment_handle(ctx.deployment, ctx.app_name).ping.remote()
            return bool((await asyncio.wait_for(_awaited(response), PEER_WAIT_S))["loaded"])
        except Exception as exc:  # none answered in time, or Serve could not be asked: start as the only one
            if response is not None:
                response.cancel()
            log.warning("model %s replica %s: no peer said whether it serves (%s: %s)", self.name, self.replica,
                        type(exc).__name__, exc)
            return False

    async def _load(self, source: str) -> None:
        """Load `source` (in a thread) and serve it."""
        started = time.perf_counter()
        loaded = await asyncio.to_thread(load_model, self.name, source, self.cfg, self.device)
        old, self._model = self._model, loaded
        self._wanted = self.reconfigure_error = None
        seconds = time.perf_counter() - started
        self._m_load_s.set(seconds)
        log.info("model %s replica %s: serving %s after %.1f s; was %s", self.name, self.replica, loaded.describe(),
                 seconds, old.describe() if old else "nothing")

    async def _keep_trying(self, source: str) -> None:
        """Try `source` again while it is unreachable: 1 s after the first try, doubling to load_retry_max_s."""
        wait, tries = 1.0, 1
        while True:
            self._next_try = time.monotonic() + wait
            await asyncio.sleep(wait)
            tries += 1
            try:
                await self._load(source)
            except Exception as exc:
                if not unreachable(exc):
                    self._failed(source, exc)
                    break
                wait = min(2 * wait, self.cfg.load_retry_max_s)
                self._failed(source, exc, tries=tries, next_s=wait)
                continue
            log.info("model %s replica %s: %s loaded at try %d", self.name, self.replica, source, tries)
            break
        self._retry = self._next_try = None

    def _failed(self, source: str, exc: Exception, *, tries: int | None = None, next_s: float = 1.0) -> None:
        """Keep why `source` is not serving, and log it (`tries`: it is being tried again)."""
        self.reconfigure_error = f"{source}: {type(exc).__name__}: {exc}"
        serving = f"still serving {self._model.describe()}" if self._model else "serving nothing yet"
        if tries is None:
            log.error("model %s replica %s: cannot load %s; %s; not tried again until the config changes",
                      self.name, self.replica, self.reconfigure_error, serving)
        else:
            log.warning("model %s replica %s: try %d: cannot reach %s; %s; trying again in %.0f s", self.name,
                        self.replica, tries, self.reconfigure_error, serving, next_s)

    def state(self) -> tuple[str, str | None]:
        """("serving" | "waiting" | "failed", why the configured source is not serving, or None when it is)."""
        if self.reconfigure_error is None:
            return ("serving", None) if self._model else ("waiting", "not loaded yet")
        if self._retry is not None and self._next_try is not None:
            why = (f"{self.reconfigure_error}; trying again in {max(self._next_try - time.monotonic(), 0):.0f} s "
                   f"(load_retry_max_s={self.cfg.load_retry_max_s:g})")
        else:
            why = f"{self.reconfigure_error}; not tried again until the config changes"
        if self._model is None:
            return ("waiting" if self._retry is not None else "failed"), f"not loaded: {why}"
        return "serving", f"serving {self._model.describe()}; the switch failed: {why}"

    async def predict(self, task: str, items: list[dict]) -> dict:
        """`{"results": [...]} | {"error": ...}` plus the model name and version that answered."""
        if self._model is None:
            _, why = self.state()
            return {"error": {"type": "ModelNotLoaded", "reason": NOT_LOADED,
                              "message": f"model {self.name} is {why}"}, "model": self.name, "version": None}
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

    async def ping(self) -> dict[str, Any]:
        """What /healthz shows of this replica: the version served (None for a bundle directory), the state
        (`state()`) and why the configured source is not serving, if it is not."""
        state, why = self.state()
        return {"version": self._model.version if self._model else None, "loaded": self._model is not None,
                "state": state, "reason": why}

    async def info(self) -> dict[str, Any]:
        """What GET /v1/models shows of this replica."""
        m = self._model
        return {"name": self.name, "source": m.source if m else self._wanted, "pending_source": self._wanted,
                "registered_name": m.registered_name if m else None, "version": m.version if m else None,
                "task": m.tags.get("task") if m else None, "known_tasks": sorted(m.predictor.tasks) if m else [],
                "metrics": m.metrics if m else {}, "device": self.device, "device_note": self.device_note,
                "replica": self.replica, "resources": self.resources, "gpu_ids": self.gpu_ids,
                "pending": self._pending, "rss_mb": rss_mb(), "reconfigure_error": self.reconfigure_error,
                "stats": self.stats.as_dict()}

    def check_health(self) -> None:
        """A replica without a model is healthy while it waits for its source (Serve would only restart it into
        the same wait); it fails only if the retry task died of a bug."""
        task = self._retry
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"model {self.name}: retrying {self._wanted} failed: {task.exception()!r}")
