"""Ray Serve application end to end: real `serve.run` on the shared local Ray, an ofa-micro bundle, real HTTP.

Three applications share one Serve instance (one HTTP port), deployed together by the `apps` fixture:
* "main" at /: a fallback model (a bundle directory, with a custom task) and a VQA model from the registry
  (`models:/...@champion`), batching with a 0.2 s window so concurrent requests meet in one model call;
* "guarded" at /guarded: an API key (read from a file) and a queue of one (max_ongoing_requests=1,
  max_queued_requests=1), for 401 and 503;
* "swap" at /swap: deployed from a config (as `serve deploy` does) so that changing only the model's
  user_config switches the version in place through `reconfigure`.
The fault tests add applications of their own beside them: a real MLflow server (`mlflow_server`) stopped and
started again under a model (the registry down at start, during a switch, during a replica's replacement), raw
sockets as slow clients, a killed replica, a wrong source.
`jobs.serve` runs in a subprocess with its own Ray (2 logical GPUs, no CUDA) for GPU placement and shutdown.
Answers are compared with `OFAPredictor` on the same bundle: strings exactly, floats to 1e-4 (a batch's
composition may change their last bits).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from mlflow import MlflowClient

from ofa_model import OFAModel, Vocabulary, get_config, save_bundle
from ofa_model.predictor import OFAPredictor, PredictorLimits
from ofa_model.preprocess import PreprocessConfig
from pipelines.local.ray_settings import LOCAL_RAY_ENV
from pipelines.local.s3 import free_ports
from pipelines.tracking.registry import promote_if_better, register_bundle
from tests.test_predictor import huge_header_png, png

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
REGISTERED = "ofa-micro-serve"
API_KEY = "k3y-" + "0123456789abcdef" * 2
KEEP_ALIVE_S = 5  # the proxy's keep_alive_timeout_s ("main" starts Serve, so its config sets it)
BODY_S = 3.0  # body_timeout_s of the "slow" application
CUSTOM = {"describe": "[IMAGE:img] describe the picture -> [TEXT:caption]"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


IMG, IMG2 = png(), png((64, 48), (20, 160, 40))
SHORT = {"max_len_b": 6}


def same(a, b, path="result"):
    """Equal structure, strings and ints exactly, floats within 1e-4."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: {sorted(a)} != {sorted(b)}"
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """Two ofa-micro bundles of different weights ("a" with a custom task)."""
    root = tmp_path_factory.mktemp("serve-bundles")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        out[name] = save_bundle(root / name, OFAModel(get_config("ofa-micro")), Vocabulary.gpt2(),
                                preprocess=PreprocessConfig(patch_image_size=64),
                                custom_tasks=CUSTOM if name == "a" else None)
    return out


@pytest.fixture(scope="module")
def predictors(bundles) -> dict[str, OFAPredictor]:
    """The predictors the served answers are compared with (the server's default limits: 8 items a call)."""
    return {name: OFAPredictor.from_bundle(path, max_batch_size=8, limits=PredictorLimits(max_items=8))
            for name, path in bundles.items()}


@pytest.fixture(scope="module")
def registry(bundles, tmp_path_factory) -> str:
    """sqlite MLflow: bundle a is version 1 (the champion, vqa_score 0.5), bundle b version 2 (0.4)."""
    root = tmp_path_factory.mktemp("serve-mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("serve", artifact_location=str(root / "artifacts"))
    for name, score in (("a", 0.5), ("b", 0.4)):
        run = client.create_run(exp)
        client.log_artifacts(run.info.run_id, str(bundles[name]), "bundle")
        v = register_bundle(REGISTERED, f"{run.info.artifact_uri}/bundle", run_id=run.info.run_id,
                            metric="vqa_score", value=score, split="val", data_fingerprint="fp", tags={"task": "vqa"},
                            tracking=uri)
        promote_if_better(REGISTERED, v, tracking=uri)
    return uri


def base_args(bundles, registry, tmp: Path, **over) -> dict:
    """ServeConfig data for a test application: small CPU shares, one torch thread per replica."""
    args = {"models": {"default": {"source": str(bundles["a"])}}, "num_cpus": 0.1, "torch_threads": 1,
            "ingress": {"num_cpus": 0.05}, "tracking_uri": registry, "model_cache": str(tmp / "cache"),
            "max_body_bytes": 256 * 1024, "request_timeout_s": 60}
    args.update(over)
    return args


class Http:
    """requests against one application of the Serve instance."""

    def __init__(self, base: str, headers: dict | None = None) -> None:
        self.base, self.headers = base, headers or {}

    def post(self, path: str, body=None, *, headers=None, **kw) -> requests.Response:
        return requests.post(f"{self.base}{path}", json=body, headers={**self.headers, **(headers or {})},
                             timeout=60, **kw)

    def get(self, path: str, *, headers=None) -> requests.Response:
        return requests.get(f"{self.base}{path}", headers={**self.headers, **(headers or {})}, timeout=60)

    def models(self) -> dict[str, dict]:
        r = self.get("/v1/models")
        assert r.status_code == 200, r.text
        return {m["name"]: m for m in r.json()["models"]}


def swap_config(args: dict, source: str):
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate({"applications": [{
        "name": "swap", "route_prefix": "/swap", "import_path": "serve_app.app:build_app", "args": args,
        "deployments": [{"name": "model-default", "user_config": {"source": source}}]}]})


@pytest.fixture(scope="module")
def apps(ray_cluster, bundles, registry, tmp_path_factory):
    """The three applications on one Serve instance; yields {"port", "main", "guarded", "swap", ...}.

    "main" and "guarded" start through `serve_app.app.start` (which waits for each to be healthy), "swap" through
    Serve's declarative deploy, as `serve deploy` does."""
    from ray import serve
    from ray.serve._private import api as serve_private

    from serve_app.app import start
    from serve_app.serve_config import serve_config

    tmp = tmp_path_factory.mktemp("serve-apps")
    key_file = tmp / "api_key"
    key_file.write_text(API_KEY + "\n")
    [port] = free_ports(1)
    main = serve_config(data=base_args(
        bundles, registry, tmp, batch_wait_timeout_s=0.2, app_name="main", port=port, keep_alive_timeout_s=KEEP_ALIVE_S,
        models={"default": {"source": str(bundles["a"])},
                "vqa": {"source": f"models:/{REGISTERED}@champion", "tasks": ["vqa"]}}))
    guarded = serve_config(data=base_args(
        bundles, registry, tmp, api_key_file=str(key_file), max_batch_size=1, batch_wait_timeout_s=0.0,
        max_ongoing_requests=1, max_queued_requests=1, retry_after_s=2, app_name="guarded", port=port,
        route_prefix="/guarded"))
    try:
        base = start(main)
        # Serve's own client: no public API deploys a ServeDeploySchema without the dashboard (off in the tests)
        client = serve_private.serve_start()
        swap_args = base_args(bundles, registry, tmp, models={"default": {"source": f"models:/{REGISTERED}/1"}},
                              batch_wait_timeout_s=0.05)
        client.deploy_apps(swap_config(swap_args, f"models:/{REGISTERED}/1"))  # declarative, as `serve deploy`
        assert start(guarded) == f"{base}/guarded"
        deadline = time.monotonic() + 120
        while (status := serve.status().applications["swap"]).status != "RUNNING":
            assert status.status in ("NOT_STARTED", "DEPLOYING"), status
            assert time.monotonic() < deadline, f"swap application not running in 120 s: {status}"
            time.sleep(0.2)
        yield {"port": port, "client": client, "swap_args": swap_args, "main": Http(base),
               "guarded": Http(f"{base}/guarded"), "swap": Http(f"{base}/swap")}
    finally:
        serve.shutdown()


# ---------------------------------------------------------------------------------------------- endpoints


CASES = [  # route, body, task, local inputs (what OFAPredictor gets)
    ("/v1/caption", {"items": [{"image": b64(IMG), "decoding": SHORT}, {"image": b64(IMG2)}]}, "caption",
     [{"image": IMG, "decoding": SHORT}, {"image": IMG2}]),
    ("/v1/vqa", {"items": [{"image": b64(IMG), "text": "what color is it?", "decoding": SHORT},
                           {"image": b64(IMG), "text": "what?", "candidates": ["red", "dark green"],
                            "mode": "allcand"}]}, "vqa",
     [{"image": IMG, "text": "what color is it?", "decoding": SHORT},
      {"image": IMG, "text": "what?", "candidates": ["red", "dark green"], "mode": "allcand"}]),
    ("/v1/grounding", {"items": [{"image": b64(IMG), "text": "the red thing"}]}, "grounding",
     [{"image": IMG, "text": "the red thing"}]),
    ("/v1/entailment", {"items": [{"image": b64(IMG), "text": "it is red"}]}, "visual_entailment",
     [{"image": IMG, "text": "it is red"}]),
    ("/v1/classify", {"items": [{"image": "data:image/png;base64," + b64(IMG),
                                 "candidates": ["red square", "blue circle"]}]}, "image_classification",
     [{"image": IMG, "candidates": ["red square", "blue circle"]}]),
    ("/v1/text", {"task": "glue_mnli", "items": [{"text": "a man runs", "text2": "a person moves"}]}, "glue_mnli",
     [{"text": "a man runs", "text2": "a person moves"}]),
    ("/v1/text", {"task": "summarization", "items": [{"text": "the quick brown fox", "decoding": SHORT}]},
     "summarization", [{"text": "the quick brown fox", "decoding": SHORT}]),
    ("/v1/predict", {"task": "grounded_caption", "items": [{"image": b64(IMG), "box": [10, 10, 40, 40],
                                                            "decoding": SHORT}]}, "grounded_caption",
     [{"image": IMG, "box": [10, 10, 40, 40], "decoding": SHORT}]),
    ("/v1/predict", {"task": "describe", "items": [{"img": b64(IMG), "decoding": SHORT}]}, "describe",
     [{"img": IMG, "decoding": SHORT}]),
]


@pytest.mark.slow
def test_every_endpoint_answers_as_the_predictor(apps, predictors):
    main = apps["main"]
    for route, body, task, local in CASES:
        r = main.post(route, body)
        assert r.status_code == 200, (route, r.text)
        got = r.json()
        model, version = ("vqa", "1") if task == "vqa" else ("default", None)  # vqa: the registry's champion
        assert (got["model"], got["version"], got["task"]) == (model, version, task), route
        assert got["request_id"] and got["request_id"] == r.headers["x-request-id"]
        assert 0 < got["latency_ms"] < 60_000
        same(got["results"], predictors["a"].predict(task, local), route)
    r = main.post("/v1/caption", CASES[0][1], headers={"X-Request-Id": "client-id-1"})
    assert r.json()["request_id"] == r.headers["x-request-id"] == "client-id-1"  # a client's id is kept


@pytest.mark.slow
def test_images_as_multipart_uploads(apps, predictors):
    main = apps["main"]
    files = [("image", ("a.png", IMG, "image/png")), ("image", ("b.png", IMG2, "image/png"))]
    r = requests.post(f"{main.base}/v1/caption", files=files, timeout=60)  # no json field: one item per file
    assert r.status_code == 200, r.text
    same(r.json()["results"], predictors["a"].predict("caption", [{"image": IMG}, {"image": IMG2}]))
    doc = {"items": [{"text": "what color is it?", "decoding": SHORT}]}
    r = requests.post(f"{main.base}/v1/vqa", files=[("image", ("a.png", IMG, "image/png"))],
                      data={"json": json.dumps(doc)}, timeout=60)
    assert r.status_code == 200, r.text
    same(r.json()["results"], predictors["a"].predict(
        "vqa", [{"image": IMG, "text": "what color is it?", "decoding": SHORT}]))


@pytest.mark.slow
def test_models_docs_and_registry_source(apps):
    main = apps["main"]
    models = main.models()
    assert set(models) == {"default", "vqa"}
    vqa, default = models["vqa"], models["default"]
    assert (vqa["registered_name"], vqa["version"], vqa["task"]) == (REGISTERED, "1", "vqa")
    assert vqa["source"] == f"models:/{REGISTERED}@champion" and vqa["tasks"] == ["vqa"]
    assert vqa["metrics"] == {"vqa_score": 0.5}
    assert default["version"] is None and default["metrics"] == {} and default["device"] == "cpu"
    assert "caption" in default["tasks"] and "describe" in default["tasks"] and "vqa" not in default["tasks"]
    assert main.get("/healthz").json() == {"status": "ok", "models": {"default": None, "vqa": "1"},
                                           "states": {"default": "serving", "vqa": "serving"}, "reasons": {}}
    assert not default["pending_source"] and not vqa["pending_source"]
    assert main.get("/docs").status_code == 200
    spec = main.get("/openapi.json").json()
    body = spec["paths"]["/v1/caption"]["post"]["requestBody"]["content"]
    assert body["application/json"]["example"]["items"][0]["image"] and "multipart/form-data" in body
    assert {"CaptionRequest", "PredictRequest", "VqaItem"} <= set(spec["components"]["schemas"])


# ---------------------------------------------------------------------------------------------- bad requests


def _bad_matrix(big: int) -> list:
    """(what, route, kwargs for requests.post, status, reason, words the message must hold)."""
    img = b64(IMG)
    return [
        ("malformed JSON", "/v1/caption", {"data": b"{items: [", "headers": {"content-type": "application/json"}},
         400, "malformed_body", "not valid JSON"),
        ("wrong type", "/v1/caption", {"json": {"items": "x"}}, 422, "bad_type", "items"),
        ("missing field", "/v1/caption", {"json": {}}, 422, "missing_field", "items: field required"),
        ("a field the route does not take", "/v1/caption", {"json": {"items": [{"image": img, "text": "x"}]}},
         422, "bad_type", "items.0.text"),
        ("a number for text", "/v1/vqa", {"json": {"items": [{"image": img, "text": 5}]}}, 422, "bad_type",
         "items.0.text"),
        ("no items", "/v1/caption", {"json": {"items": []}}, 422, "bad_type", "items"),
        ("bad base64", "/v1/caption", {"json": {"items": [{"image": "%%%not base64"}]}}, 422, "bad_image",
         "not valid base64"),
        ("an image URL", "/v1/caption", {"json": {"items": [{"image": "http://169.254.169.254/x.png"}]}}, 422,
         "bad_image", "never fetched"),
        ("bytes that are not an image", "/v1/caption", {"json": {"items": [{"image": b64(b"hello " * 20)}]}},
         422, "not_an_image", ""),
        ("oversized body", "/v1/caption", {"json": {"items": [{"image": "A" * big}]}}, 413, "body_too_large",
         "over the limit of 262144 bytes"),
        ("too many pixels", "/v1/caption", {"json": {"items": [{"image": b64(huge_header_png())}]}}, 413,
         "image_too_large", ""),
        ("unknown task", "/v1/predict", {"json": {"task": "poetry", "items": [{"text": "x"}]}}, 422,
         "unknown_task", "unknown task 'poetry'"),
        ("text too long", "/v1/vqa", {"json": {"items": [{"image": img, "text": "why " * 2000}]}}, 422,
         "limit_exceeded", "over the limit of 4096"),
        ("decoding over the limits", "/v1/caption",
         {"json": {"items": [{"image": img, "decoding": {"beam_size": 64, "max_len_b": 4096, "min_len": 4096}}]}},
         422, "limit_exceeded", "decoded tokens"),
        ("a decoding setting of the wrong type", "/v1/caption",
         {"json": {"items": [{"image": img, "decoding": {"beam_size": "5"}}]}}, 422, "bad_setting", "beam_size"),
        ("an unknown decoding setting", "/v1/caption", {"json": {"items": [{"image": img, "decoding": {"beam": 2}}]}},
         422, "bad_setting", "unknown decoding settings ['beam']"),
        ("too many items", "/v1/caption", {"json": {"items": [{"image": img}] * 9}}, 422, "limit_exceeded",
         "9 inputs in one call, over the limit of 8"),
        ("unknown model", "/v1/caption", {"json": {"model": "nope", "items": [{"image": img}]}}, 422,
         "unknown_model", "model 'nope' is not configured"),
        ("missing image", "/v1/caption", {"json": {"items": [{"decoding": SHORT}]}}, 422, "missing_field",
         "'image' is missing"),
        ("text task without text", "/v1/text", {"json": {"task": "glue_sst2", "items": [{}]}}, 422,
         "missing_field", "'text' is missing"),
        ("an image on a text route", "/v1/text", {"json": {"task": "glue_sst2", "items": [{"image": img}]}}, 422,
         "bad_type", "items.0.image"),
        ("another content type", "/v1/caption", {"data": b"x", "headers": {"content-type": "text/plain"}}, 415,
         "unsupported_media_type", "text/plain"),
        ("an image as a form text field", "/v1/caption", {"files": {"image": (None, "abc")}}, 422, "bad_type",
         "multipart field 'image'"),
        ("a file the route does not take", "/v1/text",
         {"files": {"image": ("a.png", IMG)}, "data": {"json": '{"task": "glue_sst2", "items": [{"text": "x"}]}'}},
         422, "bad_type", "/v1/text items take no such field"),
    ]


@pytest.mark.slow
def test_bad_requests_are_4xx_with_the_reason_and_the_replica_stays_healthy(apps):
    main = apps["main"]
    for what, route, kw, status, reason, words in _bad_matrix(300 * 1024):
        r = requests.post(f"{main.base}{route}", timeout=60, **kw)
        assert r.status_code == status, (what, r.status_code, r.text[:500])
        err = r.json()["error"]
        assert err["reason"] == reason and words in err["message"], (what, err)
        assert r.json()["request_id"], what
    r = main.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["reason"] == "not_found"
    # one bad item among good ones: the others are answered, the bad one says why, in a 200
    r = main.post("/v1/caption", {"items": [{"image": b64(IMG), "decoding": SHORT}, {"image": "@@"},
                                            {"image": b64(IMG), "decoding": {"beam": 1}}]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert "text" in results[0] and "error" not in r.json()
    assert [x["error"]["reason"] for x in results[1:]] == ["bad_image", "bad_setting"]
    assert main.get("/healthz").status_code == 200
    assert main.post("/v1/caption", {"items": [{"image": b64(IMG), "decoding": SHORT}]}).status_code == 200


@pytest.mark.slow
def test_an_over_limit_body_is_refused_with_a_413_that_python_clients_read(apps):
    """urllib and requests send the whole body before they read: the Guard reads and drops a refused body (up to
    DRAIN_BYTES) before answering, so they read the 413 instead of a reset connection (urllib's was, at 20 MB)."""
    from bench.chaos import urllib_post
    from serve_app.api import DRAIN_BYTES

    url = f"{apps['main'].base}/v1/caption"
    json_type = {"content-type": "application/json"}
    for size in (300 * 1024, 20 * 2**20):  # over the limit of 256 KiB; 20 MB reset urllib's connection
        body = b'{"items": [{"image": "' + b"A" * size + b'"}]}'
        chunks = (body[i:i + 2**20] for i in range(0, len(body), 2**20))  # no Content-Length: chunked
        got = {"urllib": urllib_post(url, body, json_type),
               "urllib, chunked": urllib_post(url, chunks, {**json_type, "Transfer-Encoding": "chunked"})}
        for how, kw in (("requests", {}), ("requests, Connection: close", {"headers": {"Connection": "close"}})):
            r = requests.post(url, data=body, timeout=60, **{"headers": json_type, **kw})
            got[how] = r.status_code, r.json()
        for how, (status, answer) in got.items():
            assert status == 413 and answer["error"]["reason"] == "body_too_large", (size, how, status, answer)
            assert "over the limit of 262144 bytes" in answer["error"]["message"], (size, how, answer)
    # declared past DRAIN_BYTES: answered at once, unread; requests (keeping its connection) reads it
    huge = b"A" * (DRAIN_BYTES + 2**20)
    r = requests.post(url, data=huge, headers=json_type, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["reason"] == "body_too_large"
    # a refusal for the key reads the body too
    status, answer = urllib_post(f"{apps['guarded'].base}/v1/caption", b"{" + b" " * 20 * 2**20 + b"}", json_type)
    assert status == 401 and answer["error"]["reason"] == "unauthorized"
    assert apps["main"].get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------------- batching


@pytest.mark.slow
def test_concurrent_requests_meet_in_one_model_call(apps, predictors):
    main = apps["main"]
    before = main.models()["default"]["stats"]
    body = {"items": [{"image": b64(IMG), "decoding": SHORT}]}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: main.post("/v1/caption", body), range(6)))
    assert [r.status_code for r in responses] == [200] * 6
    want = predictors["a"].predict("caption", [{"image": IMG, "decoding": SHORT}])
    for r in responses:
        same(r.json()["results"], want)
    after = main.models()["default"]["stats"]
    assert after["requests"] - before["requests"] == 6
    assert after["batches"] - before["batches"] < 6, after  # some requests shared a model call
    assert after["predictor_calls"] - before["predictor_calls"] < 6
    assert max(after["recent_batches"][-(after["batches"] - before["batches"]):]) >= 2, after


# ---------------------------------------------------------------------------------------------- access, backpressure


@pytest.mark.slow
def test_api_key_is_required_and_never_logged(apps):
    import ray

    guarded = apps["guarded"]
    body = {"items": [{"image": b64(IMG), "decoding": SHORT}]}
    for headers in ({}, {"X-API-Key": "wrong" + API_KEY[5:]}, {"Authorization": "Bearer nope"}):
        r = guarded.post("/v1/caption", body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["reason"] == "unauthorized", r.text
    assert guarded.get("/v1/models").status_code == 401
    assert guarded.get("/healthz").status_code == 200  # for load balancers: no key
    assert guarded.get("/v1/nope").status_code == 401  # every other path needs the key
    ok = guarded.post("/v1/caption", body, headers={"X-API-Key": API_KEY})
    assert ok.status_code == 200, ok.text
    assert guarded.post("/v1/caption", body, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    rid = ok.json()["request_id"]
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    time.sleep(0.5)
    texts = [p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 50e6]
    assert not any(API_KEY in t for t in texts)
    lines = [json.loads(line[line.index("{"):]) for t in texts for line in t.splitlines()
             if '"event": "request"' in line and rid in line]
    assert lines and lines[0]["status"] == 200 and lines[0]["task"] == "caption" and lines[0]["model"] == "default"
    assert not any(b64(IMG)[:40] in t for t in texts)  # no image bytes in the logs


@pytest.mark.slow
def test_a_full_queue_answers_503_with_retry_after(apps):
    guarded = apps["guarded"]
    body = {"items": [{"image": b64(IMG), "decoding": {"max_len_b": 16, "min_len": 16}}] * 8}
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: guarded.post("/v1/caption", body, headers={"X-API-Key": API_KEY}),
                                  range(10)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["Retry-After"] == "2" and busy.json()["error"]["reason"] == "overloaded"
    assert guarded.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------------- faults


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_replica_killed_under_load_costs_no_request(apps, bundles, registry, tmp_path):
    """8 clients against two model replicas; one replica's process is SIGKILLed. The requests it held are sent
    once more, to the other replica: no client sees an error or hangs, and the deployment is back to two running
    replicas within 30 s."""
    from ray import serve

    from bench.chaos import replica_kill, replica_pids
    from serve_app.app import start
    from serve_app.serve_config import serve_config

    cfg = serve_config(data=base_args(bundles, registry, tmp_path, app_name="chaos", port=apps["port"],
                                      route_prefix="/chaos", batch_wait_timeout_s=0.01,
                                      autoscaling={"min_replicas": 2, "max_replicas": 2}))
    try:
        url = start(cfg) + "/v1/caption"
        got = replica_kill(url, {"items": [{"image": b64(IMG), "decoding": SHORT}]}, "chaos", clients=8,
                           before_s=4.0, recover_limit_s=45.0, after_s=4.0, timeout_s=60.0)
        print("replica kill:", got)
        assert got["failed"] == 0 and got["hung"] == 0, got
        assert got["recovery_s"] is not None and got["recovery_s"] <= 30.0, got
        assert got["requests"] >= 16, got  # the load went on
        pids = replica_pids("chaos")
        assert len(pids) == 2 and got["killed_pid"] not in pids
        assert requests.get(f"{url.rsplit('/v1/', 1)[0]}/healthz", timeout=30).status_code == 200
    finally:
        serve.delete("chaos")


@pytest.fixture(scope="module")
def mlflow_server(bundles, tmp_path_factory):
    """A real MLflow server whose registry holds REGISTERED: bundle a as version 1 (the champion), b as version 2;
    artifacts travel through the server (mlflow-artifacts:/), so a replica downloads them over HTTP."""
    from bench.chaos import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("serve-mlflow-server"))
    server.start()
    try:
        server.register(REGISTERED, [bundles["a"], bundles["b"]])
        yield server
    finally:
        server.stop()


def _wait(what: str, check, limit_s: float, every_s: float = 0.3):
    """`check()`'s first truthy value within `limit_s` seconds, and the seconds it took."""
    began = time.monotonic()
    while not (got := check()):
        assert time.monotonic() - began < limit_s, f"{what}: not within {limit_s} s"
        time.sleep(every_s)
    return got, time.monotonic() - began


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_model_whose_registry_is_down_at_start_is_served_once_it_is_back(apps, bundles, predictors, mlflow_server,
                                                                          tmp_path):
    """The tracking server is stopped (its port closed) when the application starts: it starts anyway, /healthz
    answers 503 naming the model and the cause, a request is answered 503 model_not_loaded with Retry-After
    (never 500); started again, the registry is found by the replica's backoff, with no redeploy, and the same
    replica serves the champion within load_retry_max_s + a load."""
    import ray
    from ray import serve

    from bench.chaos import registry_down_at_start
    from serve_app.serve_config import serve_config

    source = f"models:/{REGISTERED}@champion"
    cfg = serve_config(data=base_args(bundles, mlflow_server.url, tmp_path, app_name="regstart", port=apps["port"],
                                      route_prefix="/regstart", models={"default": {"source": source}},
                                      load_retry_max_s=2, registry_timeout_s=2, retry_after_s=3))
    body = {"items": [{"image": b64(IMG), "decoding": SHORT}]}
    try:
        got = registry_down_at_start(cfg, mlflow_server, body)
        print("registry down at start:", {k: v for k, v in got.items() if not isinstance(v, dict)})
        health = got["health"]
        assert got["healthz"] == 503 and health["states"] == {"default": "waiting"}, health
        assert health["models"] == {"default": "not loaded"}, health
        reason = health["reasons"]["default"]
        assert source in reason and f"the registry at {mlflow_server.url} did not answer" in reason, reason
        assert "trying again in" in reason, reason
        assert got["request"] == 503 and got["retry_after"] == "3", got["answer"]
        err = got["answer"]["error"]
        assert err["reason"] == "model_not_loaded" and "model default is not loaded" in err["message"], err
        assert source in err["message"] and "did not answer" in err["message"], err
        waiting = got["waiting_info"]
        assert waiting["pending_source"] == source and waiting["version"] is None, waiting
        assert "did not answer" in waiting["reconfigure_error"], waiting
        # served once the registry is back, by the replica that was waiting (no restart, no redeploy)
        assert got["served_s"] is not None and got["served_s"] <= 30, got["served_s"]
        assert got["after"] == 200 and got["after_answer"]["version"] == "1", got["after_answer"]
        same(got["after_answer"]["results"], predictors["a"].predict("caption", [{"image": IMG, "decoding": SHORT}]))
        served = got["served_info"]
        assert served["stats"]["replica"] == waiting["stats"]["replica"], (served, waiting)
        assert served["source"] == source and not served["pending_source"] and not served["reconfigure_error"]
        assert requests.get(f"{got['base']}/healthz", timeout=30).json() == {
            "status": "ok", "models": {"default": "1"}, "states": {"default": "serving"}, "reasons": {}}
        # each try is in the replica's log, and the one that loaded
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        text = "\n".join(p.read_text(errors="replace") for p in logs.rglob("replica_regstart_*") if p.is_file())
        assert f"try 1: cannot reach {source}: SourceUnreachable" in text, text[-3000:]
        assert f"{source} loaded at try" in text, text[-3000:]
    finally:
        serve.delete("regstart")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_reconfigure_with_the_registry_down_keeps_the_old_version_then_switches(apps, bundles, predictors,
                                                                                mlflow_server, tmp_path):
    """Version 1 serves from the real MLflow server; the server is stopped and the model switched to version 2
    (user_config only, as `serve deploy` does): version 1 keeps answering, /healthz stays 200 and says why the
    switch has not happened, /v1/models too. Started again, the server is found by the replica's backoff and
    version 2 serves, on the same replica, with no redeploy."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    args = base_args(bundles, mlflow_server.url, tmp_path, batch_wait_timeout_s=0.0, load_retry_max_s=2,
                     registry_timeout_s=2)

    def deploy(source: str) -> None:
        details = apps["client"].get_serve_details()["applications"]
        others = [a["deployed_app_config"] for name, a in details.items()  # a deploy replaces every declarative
                  if name != "regdown" and a.get("deployed_app_config")]  # app: keep the others as they are
        apps["client"].deploy_apps(ServeDeploySchema.model_validate({"applications": [*others, {
            "name": "regdown", "route_prefix": "/regdown", "import_path": "serve_app.app:build_app", "args": args,
            "deployments": [{"name": "model-default", "user_config": {"source": source}}]}]}))

    app = Http(f"{apps['main'].base.rstrip('/')}/regdown")
    body = {"items": [{"image": b64(IMG), "decoding": SHORT}]}
    new = f"models:/{REGISTERED}/2"
    try:
        deploy(f"models:/{REGISTERED}/1")
        _wait("regdown running", lambda: serve.status().applications["regdown"].status == "RUNNING", 120)
        before = app.models()["default"]
        assert before["version"] == "1" and not before["reconfigure_error"], before
        mlflow_server.stop()
        deploy(new)
        codes = []

        def failed_switch():
            r = app.post("/v1/caption", body)
            codes.append(r.status_code)
            assert r.status_code == 200 and r.json()["version"] == "1", r.text
            return app.models()["default"]["reconfigure_error"]

        _wait("the failed switch shown in /v1/models", failed_switch, 60, every_s=0.0)
        info = app.models()["default"]
        assert new in info["reconfigure_error"] and "did not answer" in info["reconfigure_error"], info
        assert info["pending_source"] == new and info["version"] == "1", info
        assert info["stats"]["replica"] == before["stats"]["replica"]  # the same replica, never restarted
        health = app.get("/healthz")
        assert health.status_code == 200 and health.json()["states"] == {"default": "serving"}, health.text
        reason = health.json()["reasons"]["default"]
        assert "the switch failed" in reason and new in reason and "trying again in" in reason, reason

        mlflow_server.start()
        _, switched_s = _wait("version 2 once the registry was back",
                              lambda: app.post("/v1/caption", body).json().get("version") == "2", 60)
        print(f"switched {switched_s:.1f} s after the registry came back; {len(codes)} requests while it was down")
        info = app.models()["default"]
        assert info["stats"]["replica"] == before["stats"]["replica"] and not info["reconfigure_error"], info
        r = app.post("/v1/caption", body)
        same(r.json()["results"], predictors["b"].predict("caption", [{"image": IMG, "decoding": SHORT}]))
        assert app.get("/healthz").json()["reasons"] == {}
    finally:
        mlflow_server.start()
        serve.delete("regdown")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_replica_replaced_while_the_registry_is_down_costs_no_request(apps, bundles, mlflow_server, tmp_path):
    """Two replicas serve the champion from the MLflow server; the server is stopped and one replica SIGKILLed
    under load. Its replacement cannot reach the registry while its peer serves, so it does not start empty (it
    would answer its share of the requests 503): it fails to start, and Serve starts it again. No client sees an
    error; once the server is back the deployment is at two replicas again."""
    import ray
    from ray import serve

    from bench.chaos import Clients, replica_pids, running_replicas
    from serve_app.app import start
    from serve_app.serve_config import serve_config

    source = f"models:/{REGISTERED}@champion"
    cfg = serve_config(data=base_args(bundles, mlflow_server.url, tmp_path, app_name="regpeer", port=apps["port"],
                                      route_prefix="/regpeer", models={"default": {"source": source}},
                                      load_retry_max_s=2, registry_timeout_s=2, batch_wait_timeout_s=0.0,
                                      autoscaling={"min_replicas": 2, "max_replicas": 2}))
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"

    def refused_to_start_empty() -> bool:
        return any("while other replicas serve: not starting empty" in p.read_text(errors="replace")
                   for p in logs.rglob("replica_regpeer_*") if p.is_file())

    try:
        base = start(cfg)
        victim = replica_pids("regpeer")[0]
        mlflow_server.stop()
        load = Clients(f"{base}/v1/caption", {"items": [{"image": b64(IMG), "decoding": SHORT}]}, 3, 60.0)
        load.start()
        os.kill(victim, signal.SIGKILL)
        _, refused_s = _wait("the replacement refusing to start empty", refused_to_start_empty, 90, every_s=1.0)
        time.sleep(3)
        hung, rows = load.stop(65), load.rows()
        failures = [(status, reason) for _, _, status, reason in rows if status != 200]
        print(f"replacement refused {refused_s:.1f} s after the kill; {len(rows)} requests, failures {failures}")
        assert hung == 0 and not failures and len(rows) >= 10, (hung, failures, len(rows))
        assert requests.get(f"{base}/healthz", timeout=30).status_code == 200  # the peer serves
        mlflow_server.start()
        _, back_s = _wait("two replicas again", lambda: running_replicas("regpeer") == 2, 120, every_s=1.0)
        print(f"two replicas {back_s:.1f} s after the registry came back")
        assert len(replica_pids("regpeer")) == 2 and victim not in replica_pids("regpeer")
        assert requests.get(f"{base}/healthz", timeout=30).status_code == 200
    finally:
        mlflow_server.start()
        serve.delete("regpeer")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_wrong_source_fails_the_deploy_with_the_reason(apps, bundles, registry, tmp_path):
    """A bundle directory that does not exist is about the source, not an outage: the replica fails to start,
    and `start` (through `serve.run`) raises with the reason; it is never served as "waiting"."""
    from ray import serve

    from serve_app.app import start
    from serve_app.serve_config import serve_config

    missing = tmp_path / "no-such-bundle"
    cfg = serve_config(data=base_args(bundles, registry, tmp_path, app_name="wrong", port=apps["port"],
                                      route_prefix="/wrong", models={"default": {"source": str(missing)}}))
    began = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"no-such-bundle: not a bundle directory"):
            start(cfg, timeout_s=120)
        print(f"the deploy failed after {time.monotonic() - began:.1f} s")
    finally:
        serve.delete("wrong")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_slow_clients_hold_no_replica_and_are_dropped_after_the_timeouts(apps, bundles, registry, tmp_path):
    """Four slow clients on raw sockets (a body trickled a byte a second, the same with Serve's per-request
    timeout turned off by the client, headers and no body, an answer never read) while an ordinary client goes
    on: the body-less ones are answered 408 body_timeout and their connections closed at body_timeout_s, the
    unread answer's connection keep_alive_timeout_s after it; the ordinary client's latency stays as it was, and
    the model replica sees only complete requests."""
    from ray import serve

    from bench.chaos import SLOW_KINDS, slow_clients
    from serve_app.app import start
    from serve_app.serve_config import serve_config

    cfg = serve_config(data=base_args(bundles, registry, tmp_path, app_name="slow", port=apps["port"],
                                      route_prefix="/slow", body_timeout_s=BODY_S, batch_wait_timeout_s=0.0))
    body = {"items": [{"image": b64(IMG), "decoding": SHORT}]}
    try:
        app = Http(start(cfg))
        seen_before = app.models()["default"]["stats"]["requests"]
        got = slow_clients(f"{app.base}/v1/caption", body, SLOW_KINDS, limit_s=30, baseline_s=4)
        print("slow clients:", got)
        clients = {c["kind"]: c for c in got["clients"]}
        for kind in ("trickle", "trickle, no proxy timeout", "headers only"):
            c = clients[kind]
            assert c["status"] == 408 and c["reason"] == "body_timeout", c
            assert c["closed_s"] is not None and BODY_S - 0.5 <= c["closed_s"] <= BODY_S + 3, c
        never = clients["never reads"]
        assert never["status"] == 200 and never["closed_s"] is not None, never
        assert KEEP_ALIVE_S - 0.5 <= never["closed_s"] <= KEEP_ALIVE_S + 4, never
        before, during = got["before"], got["during"]
        assert before["failed"] == during["failed"] == 0 and during["requests"] >= 3, got
        assert during["p50_ms"] <= 2 * before["p50_ms"] + 250, (before, during)
        # the model answered the ordinary client and the never-reading one, and saw nothing of the slow bodies
        assert app.models()["default"]["stats"]["requests"] - seen_before == got["fast_requests"] + 1
    finally:
        serve.delete("slow")


class _DyingModel:
    """A model handle whose first `deaths` calls lose their replica (Ray's ActorDiedError)."""

    def __init__(self, deaths: int) -> None:
        self.deaths, self.calls = deaths, 0
        self.predict = self

    def remote(self, task: str, items: list[dict]):
        self.calls += 1
        return _Answer(self.calls <= self.deaths)


class _Answer:
    def __init__(self, dies: bool) -> None:
        self.dies = dies

    def __await__(self):
        from ray.exceptions import ActorDiedError

        yield from asyncio.sleep(0).__await__()
        if self.dies:
            raise ActorDiedError()
        return {"version": "1", "results": [{"text": "a"}]}

    def cancel(self) -> None:
        pass


def test_a_request_is_sent_once_more_when_its_replica_dies_then_503_replica_lost(monkeypatch):
    import serve_app.api
    from serve_app.api import Ingress
    from serve_app.schemas import ApiError
    from serve_app.serve_config import serve_config

    monkeypatch.setattr(serve_app.api, "Metrics", lambda: None)  # Ray's metrics need a Ray worker
    cfg = serve_config(data={"models": {"default": {"source": "unused"}}, "retry_after_s": 3})
    once = Ingress(cfg, {"default": _DyingModel(deaths=1)})
    assert asyncio.run(once._call("default", "caption", [{}])) == {"version": "1", "results": [{"text": "a"}]}
    assert once.models["default"].calls == 2
    twice = Ingress(cfg, {"default": _DyingModel(deaths=2)})
    with pytest.raises(ApiError) as caught:
        asyncio.run(twice._call("default", "caption", [{}]))
    err = caught.value
    assert (err.status, err.reason, err.headers) == (503, "replica_lost", {"Retry-After": "3"})
    assert twice.models["default"].calls == 2  # once more, not forever


@pytest.mark.slow
def test_prometheus_metrics_are_exported_through_ray(apps):
    import re

    import ray

    main = apps["main"]
    assert main.post("/v1/caption", {"items": [{"image": "@@"}]}).status_code == 422
    assert main.post("/v1/caption", {"items": [{"image": b64(IMG), "decoding": SHORT}]}).status_code == 200
    url = f"http://127.0.0.1:{ray._private.worker._global_node.metrics_export_port}/metrics"
    want = {"ofa_serve_requests": ['task="caption"', 'status="200"', 'status="422"'],
            "ofa_serve_request_latency_ms_bucket": ['task="caption"'],
            "ofa_serve_errors": ['reason="bad_image"'],
            "ofa_serve_batch_requests_bucket": ['model="default"'],
            "ofa_serve_batch_items_bucket": ['model="default"'],
            "ofa_serve_queue_length": ['model="default"']}
    deadline, missing = time.monotonic() + 40, want
    while missing and time.monotonic() < deadline:  # Ray's metrics agent exports every few seconds
        lines = requests.get(url, timeout=10).text.splitlines()
        missing = {name: [label for label in labels if not any(
            re.match(rf"ray_{name}(_total)?{{", line) and label in line for line in lines)]
            for name, labels in want.items()}
        missing = {k: v for k, v in missing.items() if v}
        time.sleep(1)
    assert not missing, missing


# ---------------------------------------------------------------------------------------------- model switch


@pytest.mark.slow
def test_reconfigure_switches_the_version_in_place_without_dropping_requests(apps, predictors):
    swap = apps["swap"]
    before = swap.models()["default"]
    assert before["version"] == "1"
    body = {"items": [{"image": b64(IMG), "decoding": SHORT}]}
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            r = swap.post("/v1/caption", body)
            json_body = r.headers.get("content-type", "").startswith("application/json")
            seen.append((r.status_code, r.json().get("version") if json_body else r.text[:300]))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        apps["client"].deploy_apps(swap_config(apps["swap_args"], f"models:/{REGISTERED}/2"))
        deadline = time.monotonic() + 90
        while not any(v == "2" for _, v in seen):
            assert time.monotonic() < deadline, "the new version never answered"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert seen and all(code == 200 for code, _ in seen), [s for s in seen if s[0] != 200][:5]
    assert {v for _, v in seen} == {"1", "2"} and seen[-1][1] == "2"
    after = swap.models()["default"]
    assert after["version"] == "2" and after["stats"]["replica"] == before["stats"]["replica"]  # same replica
    r = swap.post("/v1/caption", body)
    same(r.json()["results"], predictors["b"].predict("caption", [{"image": IMG, "decoding": SHORT}]))
    # a source that does not load leaves the replica serving what it had, and says why
    apps["client"].deploy_apps(swap_config(apps["swap_args"], f"models:/{REGISTERED}/99"))
    deadline = time.monotonic() + 60
    while not (info := swap.models()["default"])["reconfigure_error"]:
        assert time.monotonic() < deadline, info
        time.sleep(0.3)
    assert f"models:/{REGISTERED}/99" in info["reconfigure_error"] and info["version"] == "2", info
    assert swap.post("/v1/caption", body).status_code == 200 and swap.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------------- jobs.serve


@pytest.mark.slow
def test_jobs_serve_places_gpu_replicas_runs_on_cpu_and_stops_on_sigterm(bundles):
    """`python -m jobs.serve` on its own local Ray with 2 logical GPUs: 2 replicas of num_gpus=0.5 each hold
    half a GPU, see no CUDA, run on CPU and say so; SIGTERM shuts everything down with status 0."""
    [port] = free_ports(1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(LOCAL_RAY_ENV, PYTHONUNBUFFERED="1")  # a throwaway cluster: no token auth
    cmd = [sys.executable, "-m", "jobs.serve", "--model", str(bundles["a"]), "--port", str(port),
           "--num-cpus", "4", "--num-gpus", "2", "num_gpus=0.5", "num_cpus=0.1", "torch_threads=1",
           "autoscaling.min_replicas=2", "autoscaling.max_replicas=2", "ingress.num_cpus=0.05"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 150
        while not any(line.startswith("serving default at") for line in lines):
            assert proc.poll() is None, "jobs.serve exited:\n" + "".join(lines[-60:])
            assert time.monotonic() < deadline, "jobs.serve not serving in 150 s:\n" + "".join(lines[-60:])
            time.sleep(0.3)
        assert f"http://127.0.0.1:{port}" in next(line for line in lines if line.startswith("serving"))
        http = Http(f"http://127.0.0.1:{port}")
        replicas = {}
        while len(replicas) < 2:  # requests reach either replica
            assert time.monotonic() < deadline, f"saw replicas {list(replicas)}"
            info = http.models()["default"]
            replicas[info["stats"]["replica"]] = info
        for info in replicas.values():
            assert info["stats"]["resources"]["GPU"] == 0.5 and len(info["stats"]["gpu_ids"]) == 1, info
            assert info["device"].startswith("cpu (num_gpus=0.5 was requested but no CUDA device"), info
        assert http.post("/v1/caption", {"items": [{"image": b64(IMG), "decoding": SHORT}]}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, "".join(lines[-60:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    reader.join(10)
    out = "".join(lines)
    assert "no CUDA device is visible: running on CPU" in out  # the replica's log, streamed to the driver
    assert "shutting down" in out and "\nstopped\n" in out, out[-2000:]


# ---------------------------------------------------------------------------------------------- no cluster


def test_batches_group_same_task_and_decoding_and_split_answers_back(predictors):
    from serve_app.model import Call, run_calls

    p = predictors["a"]
    calls = [Call("caption", [{"image": IMG, "decoding": SHORT}]),
             Call("caption", [{"image": b64(IMG2), "decoding": SHORT}, {"image": "@@", "decoding": SHORT}]),
             Call("caption", [{"image": IMG}]),  # other decoding settings: its own predictor call
             Call("vqa", [{"image": IMG, "text": "what?", "decoding": SHORT}]),
             Call("poetry", [{"text": "x"}]),
             Call("caption", [{"image": IMG, "decoding": SHORT}] * 9)]  # over max_items (8): refused whole
    answers, n_predict = run_calls(p, calls)
    assert n_predict == 5  # caption+SHORT (calls 0, 1), caption, vqa, poetry, the oversized call alone
    same(answers[0]["results"], p.predict("caption", [{"image": IMG, "decoding": SHORT}]))
    assert answers[1]["results"][1]["error"]["reason"] == "bad_image"
    same(answers[1]["results"][0], p.predict("caption", [{"image": IMG2, "decoding": SHORT}])[0])
    same(answers[2]["results"], p.predict("caption", [{"image": IMG}]))
    assert answers[4]["error"]["reason"] == "unknown_task"
    assert answers[5]["error"]["reason"] == "limit_exceeded"


def test_serve_config_yaml_and_device_choice():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import deployment_name, proxy_options
    from serve_app.model import pick_device
    from serve_app.serve_config import config_from_args

    deploy = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve_config.yaml").read_text()))
    [app] = deploy.applications
    cfg = config_from_args(app.args)
    assert app.import_path == "serve_app.app:build_app" and deploy.http_options.host == "127.0.0.1"
    assert deploy.http_options.model_dump(include={"request_timeout_s", "keep_alive_timeout_s"}) == {
        k: proxy_options(cfg)[k] for k in ("request_timeout_s", "keep_alive_timeout_s")}
    assert [d.name for d in app.deployments] == [deployment_name(m) for m in cfg.models]
    assert app.deployments[0].user_config == {"source": cfg.models["default"].source}
    assert pick_device("auto", 0.5, cuda_available=True) == ("cuda", None)
    assert pick_device("auto", 0.0, cuda_available=True) == ("cpu", None)  # no GPU given: never take one
    assert pick_device("auto", 0.5, cuda_available=False)[0] == "cpu"
    assert "no CUDA device" in pick_device("auto", 0.5, cuda_available=False)[1]
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        pick_device("cuda", 1, cuda_available=False)


def test_a_model_source_on_s3_loads_in_the_replica(bundles, predictors, s3_server, tmp_path):
    """models.<name>.source: s3://bucket/prefix passes the config, stays a URI for the replicas and loads
    (into model_cache) the same predictor as the bundle directory."""
    from pipelines import storage
    from serve_app.app import absolute_paths
    from serve_app.model import load_model
    from serve_app.serve_config import serve_config

    prefix = s3_server.uri("serve/a")
    for f in bundles["a"].iterdir():
        storage.write_bytes(storage.join(prefix, f.name), f.read_bytes())
    cfg = absolute_paths(serve_config(model=prefix, overrides=[f"model_cache={tmp_path / 'cache'}"]))
    assert cfg.models["default"].source == prefix
    loaded = load_model("default", prefix, cfg, "cpu")
    assert loaded.predictor.tasks.keys() == predictors["a"].tasks.keys()
    want = predictors["a"].predict("caption", [{"image": IMG}])
    assert loaded.predictor.predict("caption", [{"image": IMG}])[0]["text"] == want[0]["text"]


def test_config_errors_name_the_key(tmp_path, monkeypatch):
    from ofa_model.errors import ConfigError
    from serve_app.serve_config import config_from_args, read_api_key, serve_config

    cases = [({"model": "x", "autoscaling.maxreplicas": "3"}, "autoscaling.maxreplicas: unknown key"),
             ({"models": {"a": {"source": "x", "task": ["vqa"]}}}, "models.a.task: unknown key"),
             ({"models": {"a": {"source": "x"}, "b": {"source": "y"}}}, "at most one model may be the fallback"),
             ({"models": {"a": {"source": "x", "tasks": ["vqa"]}, "b": {"source": "y", "tasks": ["vqa"]}}},
              "task 'vqa' is routed to both models a and b"),
             ({"model": "x", "max_batch_size": "32"}, "must be >= max_batch_size"),
             ({"model": "x", "api_key_env": "A", "api_key_file": "b"}, "not both"),
             ({}, "no model"),
             ({"model": "x", "port": "'8000'"}, "port: Input should be a valid integer"),  # a string, not a number
             ({"model": "x", "num_gpus": True}, "num_gpus: Input should be a valid number")]
    for args, words in cases:
        with pytest.raises(ConfigError, match=words):
            config_from_args(args)
    cfg = config_from_args({"model": "bundles/x", "port": "8001", "num_gpus": "0.5",
                            "batch_wait_timeout_s": "1e-3", "autoscaling.max_replicas": "3"})
    assert (cfg.port, cfg.num_gpus, cfg.host, cfg.fallback()) == (8001, 0.5, "127.0.0.1", "default")
    assert (cfg.batch_wait_timeout_s, cfg.autoscaling.max_replicas) == (0.001, 3)
    assert read_api_key(cfg) is None
    monkeypatch.setenv("OFA_TEST_KEY", " " + API_KEY + "\n")
    assert read_api_key(serve_config(model="x", overrides=["api_key_env=OFA_TEST_KEY"])) == API_KEY
    monkeypatch.setenv("OFA_TEST_KEY", "short")
    with pytest.raises(ConfigError, match="too short") as info:
        read_api_key(serve_config(model="x", overrides=["api_key_env=OFA_TEST_KEY"]))
    assert "short" not in str(info.value).replace("too short", "")  # never the key itself
    with pytest.raises(ConfigError, match="cannot read"):
        read_api_key(serve_config(model="x", overrides=[f"api_key_file={tmp_path / 'missing'}"]))


def test_serve_limits_set_every_predictor_limit():
    """Serve's limits section names every PredictorLimits field (a new predictor limit must get a Serve default)
    and hands each one through unchanged."""
    import dataclasses

    from serve_app.serve_config import LimitsSection

    section = LimitsSection(max_items=3, max_images=5, max_samples=2)
    limits = section.predictor_limits()
    for f in dataclasses.fields(PredictorLimits):
        assert getattr(limits, f.name) == getattr(section, f.name), f.name
    assert (limits.max_items, limits.max_images, limits.max_samples) == (3, 5, 2)
