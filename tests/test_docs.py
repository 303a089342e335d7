"""README.md stays true: its configuration reference is the one the dataclasses generate, and every
`python -m <module>` it names exists."""

import importlib.util
import re
from pathlib import Path

from jobs.apps.config_reference import README, current

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    block, fresh = current()
    assert block == fresh, "README.md's configuration reference is stale: run python -m jobs.config_reference"
    for key in ("`optim.lr`", "`data.batch_size`", "`run.precision`", "`scaling.num_workers`", "`space.<name>.loguniform`",
                "`autoscaling.max_replicas`", "`models.<name>.source`"):
        assert key in block


def test_every_module_the_readme_runs_exists():
    modules = set(re.findall(r"python -m ([a-z_]+(?:\.[a-z_]+)+)", README.read_text()))
    assert {"jobs.finetune", "jobs.demo", "jobs.sweep", "jobs.serve"} <= modules
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    assert not missing, f"README runs modules that do not exist: {missing}"


def test_every_runnable_module_runs_when_asked():
    """A module that README or its own docstring runs as `python -m` must act on it: a file without the
    `__main__` guard exits 0 having done nothing (bench/data.py once did)."""
    texts = [README.read_text()] + [p.read_text() for d in ("bench", "jobs", "tune", "pipelines", "tests")
                                    for p in (ROOT / d).glob("*.py")]
    modules = {m for t in texts for m in re.findall(r"python -m ([a-z_]+(?:\.[a-z_]+)+)", t)}
    assert {"bench.data", "bench.inference", "jobs.evaluate"} <= modules
    silent = []
    for m in sorted(modules):
        spec = importlib.util.find_spec(m)
        if spec is None or spec.origin is None or spec.submodule_search_locations:
            continue  # a package runs its __main__ module; missing ones are the test above's
        if '__name__ == "__main__"' not in Path(spec.origin).read_text():
            silent.append(m)
    assert not silent, f"modules run as `python -m` without a __main__ guard: {silent}"
