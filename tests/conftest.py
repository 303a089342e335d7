"""Session fixtures shared by the whole suite: a real S3 server (SeaweedFS) and a small local Ray cluster.

* `s3_server`: `weed mini` (started by `pipelines.local.s3`, shared with the benchmarks) on 127.0.0.1,
  every port it opens chosen free, data in a temporary directory, bucket "test-bucket", credentials
  test/testsecret. For the session it sets AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
  AWS_REGION, so plain s3:// URIs (pyarrow, boto3, Ray workers) reach it; the previous environment is
  restored at the end.
* `ray_cluster`: a fresh local Ray (`pipelines.local.ray_settings.init_local_ray`: token auth, progress bars and
  Train's preemption watcher off) with 4 logical CPUs and a 300 MiB object store, started after `s3_server` so
  its workers inherit the S3 environment.

Both start lazily: a test run that uses neither never starts a server or a cluster. Every test ends with
flush-to-zero off (`_no_flush_to_zero`).

Two hooks: each test's reports are kept on it (`item.rep_setup`, `item.rep_call`, ...) so a fixture can see how
its test went (tests/test_page.py saves a screenshot of a failed test), and the end of the run says loudly
when the browser tests were skipped, and why.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipelines.local.ray_settings import LOCAL_RAY_ENV, TEST_OBJECT_STORE_BYTES, init_local_ray
from pipelines.local.s3 import CONFLICTING_ENV, S3Server, start_weed_retrying, stop_weed

BROWSER_SKIPPED = "BROWSER TESTS SKIPPED"  # starts the skip reason of tests/test_page.py


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the session, with the AWS_* environment pointing at it."""
    try:
        proc, server = start_weed_retrying(tmp_path_factory.mktemp("weed"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    with pytest.MonkeyPatch.context() as mp:
        for name in CONFLICTING_ENV:
            mp.delenv(name, raising=False)  # would override or disturb the test endpoint and keys
        for name, value in server.env().items():
            mp.setenv(name, value)
        try:
            yield server
        finally:
            stop_weed(proc)


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[None]:
    """A local Ray cluster for the session (4 logical CPUs, 300 MiB object store, no dashboard)."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        for name, value in LOCAL_RAY_ENV.items():
            mp.setenv(name, value)  # restored at the end (init_local_ray sets the same values)
        init_local_ray(4, object_store_bytes=TEST_OBJECT_STORE_BYTES)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(autouse=True)
def _no_flush_to_zero() -> Iterator[None]:
    """A job's entry point run in-process (`jobs.evaluate.main`) turns on flush-to-zero for the whole process
    (`torch.set_flush_denormal(True)`, as its command line should); off again after every test, or hypothesis's
    float strategies in later tests refuse to run (FloatingPointError: subnormals are flushed)."""
    yield
    import torch

    torch.set_flush_denormal(False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def pytest_terminal_summary(terminalreporter) -> None:
    """A red banner when the browser tests did not run (no Chromium, chromedriver or Selenium here)."""
    reasons = {str(r.longrepr[2]).removeprefix("Skipped: ") for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and BROWSER_SKIPPED in str(r.longrepr[2])}
    for reason in sorted(reasons):
        terminalreporter.write_sep("!", reason, red=True, bold=True)
