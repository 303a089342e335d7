"""The try-it page (GET / on the Serve app) in a real browser: headless Chromium from the system's packages
(`chromium`, `chromium-driver`), driven by Selenium, against the application on the session's local Ray with an
ofa-micro bundle.

Two applications share one Serve instance: "page" at / and "keyed" at /keyed (an API key). Each test opens the
page and uses it as a person would: picks a task, gives an image (a bundled example, a file upload, a drop),
types the text, presses Run, and reads what the page shows. What it shows is compared with a direct HTTP call to
the same endpoint with the same image and fields. Screenshots go to test-artifacts/page/ (one per task on
success, FAILED-<test>.png on failure). Nothing downloads a browser: Selenium gets the system's chromedriver and
chromium by path, and its driver manager is switched off.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import requests

from pipelines.local.s3 import free_ports
from tests.conftest import BROWSER_SKIPPED
from tests.serving import micro_bundle
from tests.test_predictor import png

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "serve_app" / "page" / "examples"
ARTIFACTS = REPO / "test-artifacts" / "page"
API_KEY = "page-" + "0123456789abcdef" * 2
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        return ("no chromium or chromedriver on PATH: install Debian's packages "
                "(apt-get install chromium chromium-driver; .ci/run does it)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    return None


if (_why := _missing()) is not None:
    pytest.skip(f"{BROWSER_SKIPPED}: {_why}", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """The "page" application at / and the "keyed" one at /keyed on one Serve instance; yields their base URLs."""
    from ray import serve

    from serve_app.app import start
    from serve_app.serve_config import serve_config

    tmp = tmp_path_factory.mktemp("page")
    bundle = micro_bundle(tmp / "bundle")
    key_file = tmp / "api_key"
    key_file.write_text(API_KEY + "\n")
    [port] = free_ports(1)

    def config(**over):
        return serve_config(data={"models": {"default": {"source": str(bundle)}}, "num_cpus": 0.1,
                                  "torch_threads": 1, "ingress": {"num_cpus": 0.05}, "port": port,
                                  "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "batch_wait_timeout_s": 0.0,
                                  "request_timeout_s": 60, **over})

    try:
        base = start(config(app_name="page"))
        keyed = start(config(app_name="keyed", route_prefix="/keyed", api_key_file=str(key_file)))
        yield {"page": base, "keyed": keyed}
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def driver():
    """Headless Chromium through the system's chromedriver (never Selenium's driver manager)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # were Selenium Manager ever asked, it must not download anything
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1280,1000", "--force-device-scale-factor=1", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def page(driver, served, request):
    """The page of the "page" application, opened afresh; a failed test leaves a screenshot and the console."""
    driver.set_window_size(1280, 1000)
    p = Page(driver, served["page"])
    yield p
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / f"FAILED-{request.node.name}.png"
        driver.save_screenshot(str(shot))
        console = "\n".join(f"{e['level']} {e['message']}" for e in driver.get_log("browser"))
        print(f"screenshot of the failed page: {shot}\nbrowser console:\n{console}")


# ---------------------------------------------------------------------------------------------- the page, as a user


class Page:
    """What a person does on the page, and what they read there."""

    def __init__(self, driver, base: str) -> None:
        self.driver, self.base = driver, base

    def open(self, *, loaded: bool = True) -> Page:
        self.driver.get(f"{self.base}/")
        if loaded:
            self.wait(lambda d: not self.find("#model").get_attribute("disabled"), "the models never loaded")
        return self

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def visible(self, css: str) -> bool:
        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return bool(found) and found[0].is_displayed()

    def wait(self, until, what: str, timeout: float = 30):
        return WebDriverWait(self.driver, timeout).until(until, message=what)

    def task(self, name: str) -> Page:
        self.find(f'#tasks button[data-task="{name}"]').click()
        return self

    def example(self, file: str) -> Page:
        self.find(f'.example[data-src="page/examples/{file}"]').click()
        self.wait(lambda d: self.image_loaded(), "the example image never showed")
        return self

    def upload(self, path: Path) -> Page:
        self.find("#file").send_keys(str(path))
        self.wait(lambda d: self.image_loaded(), "the uploaded image never showed")
        return self

    def drop(self, data: bytes, name: str) -> Page:
        """Drop a file on the drop zone, as a drag from the desktop does (a DataTransfer holding the file)."""
        self.driver.execute_script(
            """const [b64, name, zone] = arguments;
               const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
               const data = new DataTransfer();
               data.items.add(new File([bytes], name, {type: "image/png"}));
               zone.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));""",
            base64.b64encode(data).decode(), name, self.find("#drop"))
        self.wait(lambda d: self.image_loaded(), "the dropped image never showed")
        return self

    def image_loaded(self) -> bool:
        return self.driver.execute_script("const i = document.getElementById('preview');"
                                          "return i.complete && i.naturalWidth > 0")

    def type(self, field: str, text: str) -> Page:
        box = self.find(f"#{field}")
        box.clear()
        box.send_keys(text)
        return self

    def run(self) -> dict:
        """Press Run, wait for the answer or the error; what the page shows."""
        self.find("#run").click()
        self.wait(lambda d: not self.visible("#busy") and (self.visible("#result") or self.visible("#error")),
                  "neither an answer nor an error appeared")
        shown = {"latency": self.find("#latency").text, "request_id": self.find("#request-id").text}
        if self.visible("#error"):
            shown["error"] = {"reason": self.find("#error-reason").text, "message": self.find("#error-message").text}
        else:
            shown.update(answer_key=self.find("#answer-key").get_attribute("textContent"),  # .text: capitals
                         answer=self.find("#answer").text,
                         score=self.find("#score").text,
                         scores=[li.text.split("\n") for li in self.driver.find_elements(By.CSS_SELECTOR,
                                                                                          "#scores li")])
        return shown

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


def direct(base: str, route: str, image: bytes, item: dict, headers: dict | None = None) -> requests.Response:
    """The same request as the page's, made here: the image as a file part, the fields in the json part."""
    return requests.post(f"{base}/{route}", files=[("image", ("image.png", image, "image/png"))],
                         data={"json": json.dumps({"model": "default", "items": [item]})}, headers=headers,
                         timeout=60)


def answered(base: str, route: str, image: bytes, item: dict) -> dict:
    r = direct(base, route, image, item)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.timeout(240)  # the first test also starts Ray, Serve and both applications
def test_caption_of_a_bundled_example_with_latency_and_the_logged_request_id(page, served):
    import ray

    page.open()
    assert page.find("#model").text.startswith("default")
    assert [b.get_attribute("data-task") for b in page.driver.find_elements(By.CSS_SELECTOR, "#tasks button")] \
        == ["caption", "vqa", "grounding", "visual_entailment", "image_classification"]
    shown = page.task("caption").example("red-circle-blue-square.png").run()
    want = answered(served["page"], "v1/caption", (EXAMPLES / "red-circle-blue-square.png").read_bytes(), {})
    assert "error" not in shown, shown
    assert (shown["answer_key"], shown["answer"]) == ("text", want["text"])
    assert float(shown["score"]) == pytest.approx(want["score"], abs=1e-3)
    assert re.fullmatch(r"\d+\.\d ms on the server · \d+ ms round trip", shown["latency"]), shown
    raw = json.loads(page.find("#raw").get_attribute("textContent"))
    assert shown["request_id"] == raw["request_id"] and shown["request_id"]
    # the id the page shows is the one in the server's request log
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    deadline, lines = time.monotonic() + 10, []
    while not lines and time.monotonic() < deadline:
        lines = [line for p in logs.rglob("*.log") if p.stat().st_size < 50e6
                 for line in p.read_text(errors="replace").splitlines()
                 if '"event": "request"' in line and shown["request_id"] in line]
        time.sleep(0.3)
    assert lines and json.loads(lines[0][lines[0].index("{"):])["route"] == "/v1/caption"
    page.screenshot("caption")


def test_vqa_question_on_an_uploaded_file_open_and_with_candidates(page, served, tmp_path):
    image = png((96, 64), (30, 90, 200))
    path = tmp_path / "blue.png"
    path.write_bytes(image)
    page.open().task("vqa").upload(path).type("text", "what color is it?")
    shown = page.run()
    want = answered(served["page"], "v1/vqa", image, {"text": "what color is it?"})
    assert (shown["answer_key"], shown["answer"]) == ("answer", want["answer"]), shown
    assert float(shown["score"]) == pytest.approx(want["score"], abs=1e-3)
    shown = page.type("candidates", "red, blue , green").run()
    want = answered(served["page"], "v1/vqa", image, {"text": "what color is it?",
                                                      "candidates": ["red", "blue", "green"], "mode": "allcand"})
    assert shown["answer"] == want["answer"] and float(shown["score"]) == pytest.approx(want["score"], abs=1e-3)
    ranked = sorted(want["scores"].items(), key=lambda kv: -kv[1])
    assert [row[0] for row in shown["scores"]] == [name for name, _ in ranked]
    assert [float(row[-1]) for row in shown["scores"]] == pytest.approx([p for _, p in ranked], abs=1e-3)
    page.screenshot("vqa")


def test_grounding_draws_the_box_over_a_dropped_image(page, served):
    image = (EXAMPLES / "yellow-square-purple-circle.png").read_bytes()
    page.open().task("grounding").drop(image, "shapes.png").type("text", "the yellow square")
    shown = page.run()
    want = answered(served["page"], "v1/grounding", image, {"text": "the yellow square"})
    assert shown["answer_key"] == "box" and "error" not in shown, shown
    assert shown["answer"] == ", ".join(page.driver.execute_script(
        "return arguments[0].map((v) => v.toFixed(1))", want["box"]))
    [box] = page.driver.find_elements(By.CSS_SELECTOR, "#boxes .box")
    assert json.loads(box.get_attribute("data-box")) == pytest.approx(want["box"])
    assert box.text == "the yellow square"  # the phrase labels the box
    img = page.find("#preview")
    b, i = box.rect, img.rect
    assert b["width"] > 0 and b["height"] > 0, b
    assert i["x"] - 1 <= b["x"] and b["x"] + b["width"] <= i["x"] + i["width"] + 1, (b, i)
    assert i["y"] - 1 <= b["y"] and b["y"] + b["height"] <= i["y"] + i["height"] + 1, (b, i)
    x0, y0, x1, y1 = want["box"]  # image pixels, scaled to the image as displayed
    natural_w, natural_h = 320, 240
    assert b["x"] - i["x"] == pytest.approx(x0 * i["width"] / natural_w, abs=2)
    assert b["y"] - i["y"] == pytest.approx(y0 * i["height"] / natural_h, abs=2)
    assert b["width"] == pytest.approx((x1 - x0) * i["width"] / natural_w, abs=2)
    assert b["height"] == pytest.approx((y1 - y0) * i["height"] / natural_h, abs=2)
    page.screenshot("grounding")


def test_entailment_and_classification(page, served):
    image = (EXAMPLES / "green-triangle.png").read_bytes()
    page.open().task("visual_entailment").example("green-triangle.png").type("text", "there is a triangle")
    shown = page.run()
    want = answered(served["page"], "v1/entailment", image, {"text": "there is a triangle"})
    assert (shown["answer_key"], shown["answer"]) == ("label", want["label"]), shown
    assert sorted(row[0] for row in shown["scores"]) == sorted(want["scores"])
    page.screenshot("visual_entailment")
    shown = page.task("image_classification").type("candidates", "triangle, circle, square").run()
    want = answered(served["page"], "v1/classify", image, {"candidates": ["triangle", "circle", "square"]})
    assert (shown["answer_key"], shown["answer"]) == ("label", want["label"]), shown
    assert float(shown["score"]) == pytest.approx(want["score"], abs=1e-3)
    assert len(shown["scores"]) == 3
    page.screenshot("image_classification")


def test_a_bad_image_shows_the_apis_reason_and_message(page, served, tmp_path):
    path = tmp_path / "not-an-image.png"
    path.write_bytes(b"hello " * 20)
    page.open().task("caption")  # no Page.upload: the preview cannot show these bytes
    page.find("#file").send_keys(str(path))
    page.wait(lambda d: not page.find("#run").get_attribute("disabled"), "Run never became possible")
    shown = page.run()
    r = direct(served["page"], "v1/caption", path.read_bytes(), {})
    assert r.status_code == 422, r.text
    assert shown["error"] == {"reason": r.json()["error"]["reason"], "message": r.json()["error"]["message"]}
    assert shown["error"]["reason"] == "not_an_image"
    assert shown["request_id"] and shown["request_id"] != r.json()["request_id"]
    assert not page.visible("#result") and "cannot show it" in page.find("#placeholder").text
    page.screenshot("error")


def test_with_an_api_key_the_page_asks_for_it_and_keeps_it_in_the_tab(page, served):
    page.open().driver.execute_script("sessionStorage.clear()")  # one origin: the tab starts without a key
    keyed = Page(page.driver, served["keyed"]).open(loaded=False)
    keyed.wait(lambda d: keyed.visible("#key-panel"), "the page never asked for the key")
    assert keyed.find("#model").get_attribute("disabled") and not keyed.visible("#result")
    keyed.type("api-key", "wrong-" + API_KEY).find("#key-form button").click()
    keyed.wait(lambda d: "refused" in keyed.find("#key-note").text, "a wrong key was not refused")
    assert "missing or wrong API key" in keyed.find("#key-note").text
    keyed.screenshot("api_key")
    keyed.type("api-key", API_KEY).find("#key-form button").click()
    keyed.wait(lambda d: not keyed.find("#model").get_attribute("disabled"), "the key did not unlock the models")
    assert not keyed.visible("#key-panel")
    shown = keyed.task("caption").example("green-triangle.png").run()
    r = direct(served["keyed"], "v1/caption", (EXAMPLES / "green-triangle.png").read_bytes(), {},
               headers={"X-API-Key": API_KEY})
    assert r.status_code == 200 and shown["answer"] == r.json()["results"][0]["text"], shown
    stored = keyed.driver.execute_script(
        "return [sessionStorage.getItem('ofa-api-key'), localStorage.length, document.cookie]")
    assert stored == [API_KEY, 0, ""]  # the tab only: no localStorage, no cookie
    keyed.driver.execute_script("sessionStorage.clear()")


def test_phone_width(page, served):
    page.driver.set_window_size(390, 844)
    page.open().task("caption").example("red-circle-blue-square.png")
    shown = page.run()
    assert shown.get("answer") is not None, shown
    sizes = page.driver.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]")
    assert sizes[0] <= sizes[1], f"the page is wider than the phone: {sizes}"
    cards = page.driver.find_elements(By.CSS_SELECTOR, ".grid > .card")
    assert cards[1].rect["y"] >= cards[0].rect["y"] + cards[0].rect["height"]  # one column
    page.driver.execute_script("document.getElementById('result').scrollIntoView({block: 'center'})")
    page.screenshot("phone")


def test_page_files_are_open_the_api_is_not(served):
    keyed = served["keyed"]
    r = requests.get(f"{keyed}/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.text[:300]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for asset in ("page/app.js", "page/style.css", "page/examples/green-triangle.png"):
        assert requests.get(f"{keyed}/{asset}", timeout=30).status_code == 200, asset
    assert requests.get(f"{keyed}/v1/models", timeout=30).status_code == 401
    host, prefix = keyed.removeprefix("http://").split("/", 1)
    conn = http.client.HTTPConnection(host, timeout=30)  # sends the path as written (no dot-segment removal)
    for path in ("page/../v1/models", "page/%2e%2e/v1/models"):
        conn.request("GET", f"/{prefix}/{path}")
        response = conn.getresponse()
        response.read()
        assert response.status == 401, path  # a page path never opens the API
    conn.close()
    r = requests.get(keyed, timeout=30, allow_redirects=False)  # /keyed -> /keyed/: relative links stay under it
    assert r.status_code == 307 and r.headers["location"] == f"{keyed}/"
    assert requests.get(keyed, timeout=30).url == f"{keyed}/"
