"""The Grafana dashboard and the Prometheus configs of deploy/ against a live scrape: the Serve app on the
session's local Ray with an ofa-micro bundle answers a few requests (good, bad, over capacity), then Ray's metrics
endpoint is scraped until every metric name that a dashboard query uses is there, so the dashboard cannot drift
from the code. The scrape configs are checked to point where Ray writes its targets.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from pathlib import Path

import pytest
import requests
import yaml

from pipelines.local.s3 import free_ports
from tests.serving import micro_bundle
from tests.test_predictor import png

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "ofa-serve.json"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
PODMONITOR = REPO / "deploy" / "prometheus" / "podmonitor.yaml"
PROMQL_WORDS = {"sum", "rate", "irate", "increase", "by", "without", "histogram_quantile", "max", "min", "avg",
                "count", "le", "clamp_min", "or", "and", "unless", "on", "ignoring", "group_left", "topk", "bool"}


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: its panels' and the metric its variables list labels of."""
    board = json.loads(DASHBOARD.read_text())
    variables = [re.fullmatch(r"label_values\((\w+), *\w+\)", v["definition"]).group(1)
                 for v in board["templating"]["list"] if v["type"] == "query"]
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])] + variables


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label names, matchers and functions left out)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    return {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)
            if w not in PROMQL_WORDS and not w.startswith("__") and not w.startswith("$")}


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    """The Serve app with one ofa-micro model and a queue of one (so that a burst gets 503s)."""
    from ray import serve

    from serve_app.app import start
    from serve_app.serve_config import serve_config

    tmp = tmp_path_factory.mktemp("dashboard")
    bundle = micro_bundle(tmp / "bundle")
    [port] = free_ports(1)
    cfg = serve_config(data={"models": {"default": {"source": str(bundle)}}, "num_cpus": 0.1, "torch_threads": 1,
                             "ingress": {"num_cpus": 0.05}, "port": port, "app_name": "dashboard",
                             "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "max_batch_size": 1,
                             "batch_wait_timeout_s": 0.0, "max_ongoing_requests": 1, "max_queued_requests": 1,
                             "request_timeout_s": 60})
    try:
        yield start(cfg)
    finally:
        serve.shutdown()


def test_every_metric_the_dashboard_queries_is_in_a_live_scrape(app):
    import ray

    image = base64_png()
    ok = {"items": [{"image": image, "decoding": {"max_len_b": 4}}]}
    assert requests.post(f"{app}/v1/caption", json=ok, timeout=60).status_code == 200
    assert requests.post(f"{app}/v1/caption", json={"items": [{"image": "@@"}]}, timeout=60).status_code == 422
    slow = {"items": [{"image": image, "decoding": {"max_len_b": 16, "min_len": 16}}] * 8}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # a queue of one: some of these get 503
        codes = list(pool.map(lambda _: requests.post(f"{app}/v1/caption", json=slow, timeout=60).status_code,
                              range(8)))
    assert 503 in codes, codes
    queries = dashboard_queries()
    wanted = set().union(*(metric_names(q) for q in queries))
    assert {"ray_ofa_serve_requests_total", "ray_ofa_serve_model_load_seconds"} <= wanted, wanted
    node = ray._private.worker._global_node
    url = f"http://127.0.0.1:{node.metrics_export_port}/metrics"
    deadline, missing = time.monotonic() + 60, wanted
    while missing and time.monotonic() < deadline:  # Ray's metrics agent exports every few seconds
        scraped = {line.split("{")[0].split(" ")[0] for line in requests.get(url, timeout=10).text.splitlines()
                   if line and not line.startswith("#")}
        missing = wanted - scraped
        time.sleep(1)
    assert not missing, f"the dashboard queries metrics that the app does not export: {sorted(missing)}"
    # the local Prometheus finds that endpoint in the file the head writes in Ray's temp dir
    prom = yaml.safe_load(PROMETHEUS.read_text())
    files = [f for job in prom["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    assert files == [str(Path(node.get_temp_dir_path()) / "prom_metrics_service_discovery.json")]


def test_dashboard_and_podmonitor_shapes():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(ray_x_bucket{a="b"}[$__rate_interval])))') \
        == {"ray_x_bucket"}
    monitor = yaml.safe_load(PODMONITOR.read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"  # the port KubeRay gives every Ray container (8080)


def base64_png() -> str:
    import base64

    return base64.b64encode(png()).decode()
