"""The HTTP ingress: a FastAPI app built in each ingress replica, in front of one model deployment per model.

    POST /v1/caption /v1/vqa /v1/grounding /v1/entailment /v1/classify   (the task is the route's)
    POST /v1/text-to-image                                                 (text_to_image: base64 PNGs, ranked)
    POST /v1/text /v1/predict                                              (the task is the body's)
    GET  /v1/models /healthz /docs /openapi.json
    GET  /   (the try-it page: serve_app/page/, its files under /page/; it only calls the routes above)

A request is JSON (`{"items": [...]}` with base64 images) or a multipart form (a `json` field holding the
same document, and file parts: the k-th file named `image` is item k's image; without `json`, one item per
file). The ingress checks the body's size (413) and JSON types (400/422), picks the model (the body's `model`,
else the one the config routes the task to), and passes the items to it. Answers:

* 200 with one result per item when at least one item was answered; a bad item has `{"error": ...}` in place.
* 4xx with `{"error": {"type", "reason", "message"}}` when nothing could be answered (`schemas.status_of`).
* 503 + Retry-After when the model's queue is full, or it is not loaded yet (`model_not_loaded`: its registry
  is down; /healthz says why), 408 (and the connection closed) for a body that has not arrived body_timeout_s
  after the headers, 504 past request_timeout_s, 500 only for our bugs.

Inference is idempotent, so a request whose model replica dies under it (a killed process, a lost node) is sent
once more, to another replica; only when that one dies too is it answered 503 `replica_lost` with Retry-After.

Every response carries the request id (Serve's, also in the `x-request-id` header) and, for inference, the model
name and version and the server-side latency. Each request is logged as one JSON line (never bodies or keys).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import typing
from collections import Counter
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ofa_model.errors import BAD_TYPE, UNKNOWN_TASK
from serve_app.schemas import (
    BODY_TIMEOUT,
    BODY_TOO_LARGE,
    INTERNAL,
    MALFORMED_BODY,
    NOT_FOUND,
    OVERLOADED,
    REPLICA_LOST,
    ROUTES,
    TIMEOUT,
    UNAUTHORIZED,
    UNKNOWN_MODEL,
    UNSUPPORTED_MEDIA_TYPE,
    ApiError,
    ErrorResponse,
    HealthResponse,
    ModelsResponse,
    PredictResponse,
    Route,
    status_of,
    validation_error,
)
from serve_app.serve_config import ServeConfig, read_api_key

log = logging.getLogger(f"ray.serve.{__name__}")  # under Serve's logger: replica log files and stderr

LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
INFO_TIMEOUT_S = 10.0  # /v1/models and /healthz wait this long for a model replica
OPEN_PATHS = frozenset({"/", "/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})  # no API key
DRAIN_BYTES = 64 * 2**20  # a refused body is read (and dropped) up to this many bytes before the answer ...
DRAIN_S = 10.0  # ... and for this long at most (see Guard)
PAGE = Path(__file__).with_name("page")  # the try-it page: index.html, app.js, style.css, examples/
PAGE_PREFIX = "/page/"  # its files, open like OPEN_PATHS (the page asks for the key before calling the API)
# The page runs only its own files and talks only to this server.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                           "base-uri 'self'; frame-ancestors 'none'",
                "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}


def request_id() -> str:
    """Serve's id of the request being handled (the proxy takes a client's X-Request-Id or makes one)."""
    # A private call on purpose: Ray 2.60 has no public accessor for it. `serve.get_replica_context()` names the
    # replica, not the request, and the request's headers carry X-Request-Id only when the client sent one; an id
    # the proxy made (the one it returns in the response's X-Request-Id) lives only in this context. A Ray that
    # renames it fails tests/test_serve.py, which compares the body's request_id with that header.
    return serve.context._get_serve_request_context().request_id


def _path(scope: dict) -> str:
    root = scope.get("root_path", "")
    path = scope.get("path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path  # /prefix is the app's /


def _open(path: str) -> bool:
    """Whether a path is served without the API key."""
    return path in OPEN_PATHS or (path.startswith(PAGE_PREFIX) and ".." not in path.split("/"))


class Metrics:
    """The ingress's Prometheus metrics (through Ray's metrics agent), created in the replica."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter as RayCounter
        from ray.serve.metrics import Histogram

        self.requests = RayCounter("ofa_serve_requests", "HTTP requests by task, model and status",
                                   tag_keys=("task", "model", "status"))
        self.latency = Histogram("ofa_serve_request_latency_ms", "server-side request latency (ms)",
                                 boundaries=LATENCY_MS, tag_keys=("task",))
        self.errors = RayCounter("ofa_serve_errors", "refused requests and failed items by reason",
                                 tag_keys=("task", "reason"))


class Guard:
    """ASGI middleware: the API key on every path but OPEN_PATHS (401), the body size (413, never buffered past
    the limit) and the body's time (408 when it has not all arrived `body_timeout_s` after the headers, with
    `Connection: close`, so Serve's proxy closes the connection); starts the latency clock. The request is handed
    on with its body already read, so no model replica waits for a slow client.

    A refused request's body is read and dropped (`_drain`) before the answer, up to DRAIN_BYTES and DRAIN_S:
    Python's urllib and requests send the whole body before they read, and a proxy that closes the connection
    with the body half sent (urllib always asks it to: `Connection: close`) leaves them a reset connection
    instead of the answer. A body declared over DRAIN_BYTES is answered at once, and a client that asked for the
    connection to close may see a reset (measured: urllib at 20 MB); requests, keeping the connection, reads it.
    The drain also ends at the body's deadline; a refusal whose body did not arrive in time closes the connection.

    What this cannot bound (Serve's proxy, uvicorn, has no header or write timeout, and this middleware only
    runs once the headers are in): a client that never finishes its headers, the rest of a body declared over
    DRAIN_BYTES (uvicorn reads and drops it while the connection lives), and a client that never reads a
    response larger than the socket buffers. Each holds one proxy connection until the client leaves, and no
    replica (bench/chaos.py --part slow measures them).
    """

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, body_timeout_s: float, on_refusal) -> None:
        self.app, self.max_body_bytes, self.on_refusal = app, max_body_bytes, on_refusal
        self.body_timeout_s = body_timeout_s
        self._key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["started"] = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s  # for the whole body, used or dropped
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self._key is not None and not _open(_path(scope)) and not self._authorised(headers):
            await self._refuse(scope, receive, send, ApiError(
                UNAUTHORIZED, "missing or wrong API key: send it in the X-API-Key header", type_="AuthError",
                headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"'}), deadline=deadline)
            return
        declared = headers.get("content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > self.max_body_bytes):
            await self._refuse(scope, receive, send, self._too_large(declared.decode("latin-1")), deadline=deadline)
            return
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                await self._refuse(scope, receive, send, ApiError(
                    BODY_TIMEOUT, f"the body did not arrive within body_timeout_s={self.body_timeout_s:g} s "
                                  f"({size} bytes of {declared.decode('latin-1') if declared else 'an unknown length'}"
                                  " came)", headers={"Connection": "close"}), deadline=deadline, done=True)
                return
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                more = message.get("more_body", False)
                await self._refuse(scope, receive, send, self._too_large(f"more than {size}"), read=size,
                                   done=not more, deadline=deadline)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorised(self, headers: dict[str, bytes]) -> bool:
        given = headers.get("x-api-key")
        if given is None:
            auth = headers.get("authorization", b"")
            given = auth[7:].strip() if auth[:7].lower() == b"bearer " else None
        # compare_digest takes the same time wherever the first difference is
        return given is not None and hmac.compare_digest(given.strip(), self._key)

    def _too_large(self, size: str) -> ApiError:
        return ApiError(BODY_TOO_LARGE, f"the body ({size} bytes) is over the limit of {self.max_body_bytes} "
                                        "bytes (max_body_bytes)")

    async def _refuse(self, scope, receive, send, err: ApiError, *, deadline: float, read: int = 0,
                      done: bool = False) -> None:
        """Answer `err`, after the rest of the body (`read` bytes of it already read; `done` if all of it, or if
        no more is wanted) until `deadline` (the loop's clock); a body still coming then closes the connection."""
        rid = request_id()
        headers = dict(err.headers)
        if not done and await _drain(scope, receive, read, deadline) == "slow":
            headers["Connection"] = "close"
        self.on_refusal(_path(scope), err, time.perf_counter() - scope["state"]["started"])
        response = JSONResponse({"error": err.error(), "request_id": rid}, err.status, headers=headers)
        await response(scope, receive, send)


async def _drain(scope: dict, receive, read: int, deadline: float) -> str:
    """Read and drop the rest of a refused request's body, `read` bytes of it already read, up to DRAIN_BYTES in
    all, for DRAIN_S at most and until `deadline`: "read" (to its end), "skipped" (declared or found longer than
    DRAIN_BYTES), "slow" (not all there in time) or "gone" (the client went away)."""
    declared = dict(scope.get("headers", [])).get(b"content-length", b"").strip()
    if declared.isdigit() and int(declared) > DRAIN_BYTES:
        return "skipped"
    loop = asyncio.get_running_loop()
    deadline = min(deadline, loop.time() + DRAIN_S)
    while read <= DRAIN_BYTES:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
        except TimeoutError:
            return "slow"
        if message["type"] != "http.request":  # the client went away
            return "gone"
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return "read"
    return "skipped"


class Ingress:
    """The ingress's state and request handling, apart from Serve (the deployment below wraps it)."""

    def __init__(self, cfg: ServeConfig, models: dict[str, DeploymentHandle]) -> None:
        self.cfg, self.models = cfg, models
        self.route, self.fallback = cfg.route(), cfg.fallback()
        self.api_key = read_api_key(cfg)
        self.metrics = Metrics()
        self.retry_after = str(max(1, math.ceil(cfg.retry_after_s)))

    # ------------------------------------------------------------------------------------------ requests

    async def infer(self, route: Route, request: Request) -> Response:
        rid = request_id()
        record: dict[str, Any] = {"route": route.path, "task": route.task}
        try:
            req, files = await self._parse(route, request)
            task = route.task or req.task
            record["task"] = task
            name = self._choose(req.model, task)
            record["model"] = name
            items = [item.model_dump(exclude_none=True) for item in req.items]
            self._attach(route, files, items)
            record["items"] = len(items)
            answer = await self._call(name, task, items)
            record["version"] = answer.get("version")
            if "error" in answer:  # the predictor refused the whole call, or the model is not loaded yet
                e = answer["error"]
                retry = {"Retry-After": self.retry_after} if status_of(e["reason"]) == 503 else None
                raise ApiError(e["reason"], e["message"], type_=e["type"], headers=retry)
            results = answer["results"]
            failed = [r["error"] for r in results if r.keys() == {"error"}]
            record["item_errors"] = dict(Counter(e["reason"] for e in failed))
            body = {"model": name, "version": answer["version"], "task": task, "request_id": rid,
                    "latency_ms": self._elapsed_ms(request), "results": results}  # PredictResponse
            status = 200
            if failed and len(failed) == len(results):  # nothing answered: the first item's error decides
                body["error"], status = failed[0], status_of(failed[0]["reason"])
            return self._respond(request, record, status, body)
        except ApiError as err:
            record["reason"] = err.reason
            return self._respond(request, record, err.status, {"error": err.error(), "request_id": rid},
                                 err.headers)
        except Exception:
            log.exception("request %s on %s failed", rid, route.path)
            record["reason"] = INTERNAL
            err = ApiError(INTERNAL, f"internal error; the server log has request id {rid}", type_="InternalError")
            return self._respond(request, record, err.status, {"error": err.error(), "request_id": rid})

    async def _parse(self, route: Route, request: Request) -> tuple[BaseModel, dict[str, list[bytes]]]:
        """The validated request, and the uploaded files by field name."""
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype == "application/json" or ctype.endswith("+json"):
            try:
                return route.schema.model_validate_json(await request.body()), {}
            except ValidationError as exc:
                raise validation_error(exc) from None
        if ctype != "multipart/form-data":
            raise ApiError(UNSUPPORTED_MEDIA_TYPE, f"content type {ctype!r}: send application/json or "
                                                   "multipart/form-data")
        try:
            form = await request.form(max_files=self.cfg.limits.max_items, max_fields=8,
                                      max_part_size=self.cfg.max_body_bytes)
        except StarletteHTTPException as exc:
            raise ApiError(MALFORMED_BODY, f"multipart form: {exc.detail}") from None
        files: dict[str, list[bytes]] = {}
        document: str | None = None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.setdefault(key, []).append(await value.read())
            elif key == "json" and document is None:
                document = value
            else:
                raise ApiError(BAD_TYPE, f"multipart field {key!r}: a form takes one 'json' field (the JSON "
                                         "request) and file parts")
        if document is None:
            if not files:
                raise ApiError(MALFORMED_BODY, "multipart form: no 'json' field and no files")
            data: Any = {"items": [{} for _ in range(max(len(v) for v in files.values()))]}
            try:
                return route.schema.model_validate(data), files
            except ValidationError as exc:
                raise validation_error(exc, "multipart form without a 'json' field") from None
        try:
            return route.schema.model_validate_json(document), files
        except ValidationError as exc:
            raise validation_error(exc, "multipart field 'json'") from None

    @staticmethod
    def _attach(route: Route, files: dict[str, list[bytes]], items: list[dict]) -> None:
        """The k-th file of each name becomes item k's field of that name."""
        item_model = typing.get_args(route.schema.model_fields["items"].annotation)[0]
        for name, blobs in files.items():
            if item_model.model_config.get("extra") != "allow" and name not in item_model.model_fields:
                raise ApiError(BAD_TYPE, f"file part {name[:100]!r}: {route.path} items take no such field")
            if len(blobs) > len(items):
                raise ApiError(BAD_TYPE, f"{len(blobs)} files named {name!r} for {len(items)} items")
            for k, blob in enumerate(blobs):
                if name in items[k]:
                    raise ApiError(BAD_TYPE, f"items.{k}.{name}: given both in 'json' and as a file")
                items[k][name] = blob

    def _choose(self, requested: str | None, task: str) -> str:
        if requested is not None:
            if requested not in self.models:
                raise ApiError(UNKNOWN_MODEL, f"model {requested[:100]!r} is not configured; configured: "
                                              f"{', '.join(sorted(self.models))}")
            return requested
        name = self.route.get(task, self.fallback)
        if name is None:
            raise ApiError(UNKNOWN_TASK, f"no model here serves task {task[:100]!r}; served: "
                                         f"{', '.join(sorted(self.route))}")
        return name

    async def _call(self, name: str, task: str, items: list[dict]) -> dict:
        """The model's answer; sent once more when the replica dies with it (RayActorError: Ray's ActorDiedError,
        or ActorUnavailableError for a replica that stopped answering), all within request_timeout_s."""
        deadline = time.monotonic() + self.cfg.request_timeout_s
        for attempt in (1, 2):
            response = self.models[name].predict.remote(task, items)
            try:
                return await asyncio.wait_for(_awaited(response), max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                response.cancel()
                raise ApiError(TIMEOUT, f"model {name} did not answer within request_timeout_s="
                                        f"{self.cfg.request_timeout_s} s") from None
            except BackPressureError:
                raise ApiError(OVERLOADED, f"model {name} is at capacity (max_queued_requests="
                                           f"{self.cfg.max_queued_requests}); retry after {self.retry_after} s",
                               headers={"Retry-After": self.retry_after}) from None
            except DeploymentUnavailableError:
                raise ApiError(OVERLOADED, f"model {name} is unavailable; retry after {self.retry_after} s",
                               headers={"Retry-After": self.retry_after}) from None
            except RayActorError as exc:
                log.warning("request %s: a replica of model %s was lost with it (attempt %d of 2): %s",
                            request_id(), name, attempt, type(exc).__name__)
        raise ApiError(REPLICA_LOST, f"model {name} lost its replica with this request, twice; retry after "
                                     f"{self.retry_after} s", headers={"Retry-After": self.retry_after})

    # ------------------------------------------------------------------------------------------ service routes

    async def model_infos(self) -> list[dict]:
        infos = await asyncio.gather(*(asyncio.wait_for(_awaited(h.info.remote()), INFO_TIMEOUT_S)
                                       for h in self.models.values()))
        out = []
        for name, info in zip(self.models, infos, strict=True):
            tasks = self.cfg.models[name].tasks
            routed = list(tasks) if tasks else sorted(set(info["known_tasks"]) - set(self.route))
            note = f" ({info['device_note']})" if info["device_note"] else ""
            out.append({"name": name, "source": info["source"], "pending_source": info["pending_source"],
                        "registered_name": info["registered_name"],
                        "version": info["version"], "task": info["task"], "tasks": routed,
                        "metrics": info["metrics"], "device": info["device"] + note,
                        "reconfigure_error": info["reconfigure_error"],
                        "stats": {**info["stats"], "replica": info["replica"], "resources": info["resources"],
                                  "gpu_ids": info["gpu_ids"], "pending": info["pending"],
                                  "rss_mb": info["rss_mb"]}})
        return out

    async def health(self) -> tuple[int, dict]:
        """(200 when every model serves, else 503; HealthResponse): each model's version and state, and why a
        model does not serve its configured source (not loaded yet, a switch that failed, a replica that is
        down; the model replicas log each failed load)."""
        async def one(handle: DeploymentHandle) -> dict:
            return await asyncio.wait_for(_awaited(handle.ping.remote()), INFO_TIMEOUT_S)

        got = await asyncio.gather(*(one(h) for h in self.models.values()), return_exceptions=True)
        models, states, reasons = {}, {}, {}
        for name, g in zip(self.models, got, strict=True):
            if isinstance(g, BaseException):
                models[name], states[name] = f"down: {type(g).__name__}", "down"
                reasons[name] = (f"its replica did not answer within {INFO_TIMEOUT_S:g} s" if isinstance(g, TimeoutError)
                                 else f"its replica failed to answer: {type(g).__name__}: {str(g)[:300]}")
                continue
            models[name] = g["version"] if g["loaded"] else "not loaded"
            states[name] = g["state"]
            if g["reason"]:
                reasons[name] = g["reason"]
        ok = all(state == "serving" for state in states.values())
        return (200 if ok else 503), {"status": "ok" if ok else "unavailable", "models": models, "states": states,
                                      "reasons": reasons}

    # ------------------------------------------------------------------------------------------ answers

    def _elapsed_ms(self, request: Request) -> float:
        return round((time.perf_counter() - request.scope["state"]["started"]) * 1000, 3)

    def _respond(self, request: Request, record: dict, status: int, body: dict,
                 headers: dict[str, str] | None = None) -> JSONResponse:
        self.log_request(record, status, self._elapsed_ms(request) / 1000)
        return JSONResponse(body, status, headers=headers)

    def log_request(self, record: dict, status: int, seconds: float) -> None:
        """One JSON log line and the metrics of a finished request."""
        record = {"event": "request", "request_id": request_id(), **record, "status": status,
                  "latency_ms": round(seconds * 1000, 3)}
        log.info("%s", json.dumps(record, sort_keys=True, default=str))
        task = str(record.get("task") or "")
        self.metrics.requests.inc(tags={"task": task, "model": str(record.get("model") or ""),
                                        "status": str(status)})
        self.metrics.latency.observe(seconds * 1000, tags={"task": task})
        if record.get("reason"):
            self.metrics.errors.inc(tags={"task": task, "reason": record["reason"]})
        for reason, n in (record.get("item_errors") or {}).items():
            self.metrics.errors.inc(n, tags={"task": task, "reason": reason})

    def refusal(self, path: str, err: ApiError, seconds: float) -> None:
        self.log_request({"route": path, "reason": err.reason}, err.status, seconds)


async def _awaited(response):
    return await response


def create_api(ingress: Ingress) -> FastAPI:
    """The FastAPI app of one ingress replica."""
    api = FastAPI(title="OFA inference", version="1",
                  description="Captioning, VQA, grounding, entailment, classification, text tasks and "
                              "text-to-image with OFA models. Items are answered one by one: a bad item gets an "
                              "error in its place.")
    errors = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503, 504)}

    def endpoint(route: Route):
        async def infer(request: Request) -> Response:
            return await ingress.infer(route, request)

        infer.__name__ = route.path.rsplit("/", 1)[-1]
        return infer

    for route in ROUTES:
        api.add_api_route(route.path, endpoint(route), methods=["POST"], summary=route.summary,
                          response_model=None, responses={200: {"model": PredictResponse}, **errors},
                          openapi_extra={"requestBody": _request_body(route)})

    @api.get("/v1/models", response_model=ModelsResponse, summary="The models served")
    async def models() -> dict:
        return {"models": await ingress.model_infos(), "request_id": request_id()}

    @api.get("/healthz", response_model=HealthResponse, summary="200 when every model answers",
             responses={503: {"model": HealthResponse}})
    async def healthz() -> Response:
        status, body = await ingress.health()
        return JSONResponse(body, status)

    @api.get("/", include_in_schema=False)  # /prefix redirects here (Starlette's redirect_slashes), so the
    async def page() -> Response:           # page's relative links resolve under the prefix
        return FileResponse(PAGE / "index.html", headers=PAGE_HEADERS)

    api.mount(PAGE_PREFIX.rstrip("/"), StaticFiles(directory=PAGE), name="page")

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = NOT_FOUND if exc.status_code in (404, 405) else MALFORMED_BODY
        err = ApiError(reason, str(exc.detail), type_="HTTPError", status=exc.status_code)
        ingress.log_request({"route": _path(request.scope), "reason": reason}, exc.status_code, 0.0)
        return JSONResponse({"error": err.error(), "request_id": request_id()}, exc.status_code,
                            headers=getattr(exc, "headers", None))

    api.openapi = lambda: _openapi(api)  # type: ignore[method-assign]
    api.add_middleware(Guard, api_key=ingress.api_key, max_body_bytes=ingress.cfg.max_body_bytes,
                       body_timeout_s=ingress.cfg.body_timeout_s,
                       on_refusal=ingress.refusal)
    return api


def _request_body(route: Route) -> dict:
    files = {"type": "array", "items": {"type": "string", "format": "binary"},
             "description": "image files: the k-th is item k's image"}
    return {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{route.schema.__name__}"},
                             "example": route.example},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "json": {"type": "string", "description": f"the JSON request ({route.schema.__name__}); items may "
                                                      "leave out the image they get as a file"},
            "image": files}}},
    }}


def _openapi(api: FastAPI) -> dict:
    """FastAPI's schema plus the request models (the routes read their bodies themselves)."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        _, defs = models_json_schema([(r.schema, "validation") for r in ROUTES],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        api.openapi_schema = schema
    return api.openapi_schema


@serve.deployment
@serve.ingress()
class OFAIngress:
    """The HTTP ingress deployment; its FastAPI app is built in the replica (`__serve_build_asgi_app__`)."""

    def __init__(self, cfg: ServeConfig, models: dict[str, DeploymentHandle]) -> None:
        self.ingress = Ingress(cfg, models)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.ingress)
