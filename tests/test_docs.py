"""README.md stays true: its configuration reference is the one the dataclasses generate, and every
`python -m <module>` it names exists."""

import importlib.util
import re
from pathlib import Path

from pipelines.config_reference import README, current

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    block, fresh = current()
    assert block == fresh, "README.md's configuration reference is stale: run python -m pipelines.config_reference"
    for key in ("`optim.lr`", "`data.batch_size`", "`run.precision`", "`scaling.num_workers`", "`space.<name>.loguniform`",
                "`autoscaling.max_replicas`", "`models.<name>.source`"):
        assert key in block


def test_every_module_the_readme_runs_exists():
    modules = set(re.findall(r"python -m ([a-z_]+(?:\.[a-z_]+)+)", README.read_text()))
    assert {"jobs.finetune", "jobs.demo", "tune.sweep", "jobs.serve"} <= modules
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    assert not missing, f"README runs modules that do not exist: {missing}"
