"""The package boundaries of style.md, checked on the source and on a fresh interpreter.

* `ofa_model` is plain PyTorch + tokenizers: it never imports ray, mlflow, fastapi, starlette or boto3, not at
  module top, not inside a function.
* The layers point one way: `ofa_model` <- `pipelines` <- `tune`, with `serve_app` beside `tune`, and the
  applications and command lines (`jobs`, `jobs.apps`) above them all:
  - `ofa_model` imports none of the project's other packages;
  - `pipelines` imports none of `tune`, `serve_app` or `jobs` (the applications live in `jobs.apps`);
  - `tune` imports neither `jobs` nor `serve_app`;
  - `serve_app` imports neither `tune` nor `jobs`, and from `pipelines` only `pipelines.tracking.registry`,
    the one module that resolves models from the MLflow registry.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_MODEL = ("ray", "mlflow", "fastapi", "starlette", "boto3", "botocore")
SERVE_MAY_IMPORT_FROM_PIPELINES = ("pipelines.tracking.registry",)
PROJECT_PACKAGES = ("ofa_model", "pipelines", "tune", "serve_app", "jobs")
# what each package must not import (top-level package names)
FORBIDDEN_LAYERS = {
    "ofa_model": ("pipelines", "tune", "serve_app", "jobs"),
    "pipelines": ("tune", "serve_app", "jobs"),
    "tune": ("serve_app", "jobs"),
    "serve_app": ("tune", "jobs"),
}


def imported_modules(source: str, module: str) -> set[str]:
    """Every absolute module name `source` (the text of `module`, dotted) imports, anywhere in the file.
    Relative imports are resolved against `module`; `from a import b` counts as both `a` and `a.b`."""
    package = module.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def model_violations(source: str, module: str) -> list[str]:
    return sorted(n for n in imported_modules(source, module) if _top(n) in FORBIDDEN_IN_MODEL)


def serve_violations(source: str, module: str) -> list[str]:
    bad = []
    for name in imported_modules(source, module):
        if _top(name) != "pipelines" or name == "pipelines":
            continue
        if any(ok.startswith(name + ".") for ok in SERVE_MAY_IMPORT_FROM_PIPELINES):
            continue  # the package above an allowed module (`from pipelines.tracking import registry`)
        if not any(name == ok or name.startswith(ok + ".") for ok in SERVE_MAY_IMPORT_FROM_PIPELINES):
            bad.append(name)
    # `from pipelines.tracking import registry` adds "pipelines.tracking" and "pipelines.tracking.registry":
    # allowed; `from pipelines import storage` adds "pipelines.storage": caught above.
    return sorted(bad)


def layer_violations(source: str, module: str) -> list[str]:
    """Project modules that `module` imports from a layer above (or beside) its own."""
    forbidden = FORBIDDEN_LAYERS.get(_top(module), ())
    return sorted(n for n in imported_modules(source, module) if _top(n) in forbidden)


def _modules(package: str) -> list[tuple[str, str]]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1] + ["__init__"]
        out.append((".".join(parts), path.read_text()))
    return out


def test_the_scanners_catch_what_they_must():
    """The checks below are only worth something if they can fail."""
    assert model_violations("import ray\n", "ofa_model.x") == ["ray"]
    assert model_violations("def f():\n    from mlflow.tracking import MlflowClient\n", "ofa_model.x") == [
        "mlflow.tracking",
        "mlflow.tracking.MlflowClient",
    ]
    assert model_violations("import importlib\nimportlib.import_module('boto3')\n", "ofa_model.x") == ["boto3"]
    assert model_violations("from starlette.requests import Request\n", "ofa_model.x")
    assert model_violations("import torch, tokenizers\nfrom ofa_model import errors\n", "ofa_model.x") == []
    assert model_violations("import rayon_like\n", "ofa_model.x") == []  # a prefix is not the package
    assert serve_violations("from pipelines.data.dataset import build_dataset\n", "serve_app.app") == [
        "pipelines.data.dataset",
        "pipelines.data.dataset.build_dataset",
    ]
    assert serve_violations("from pipelines import storage\n", "serve_app.app") == ["pipelines.storage"]
    # relative imports resolve: from serve_app/app.py, `..pipelines` is the top-level package
    assert serve_violations("from ..pipelines import storage\n", "serve_app.app") == ["pipelines.storage"]
    assert serve_violations("from pipelines.tracking.registry import resolve_model\n", "serve_app.app") == []
    assert serve_violations("from pipelines.tracking import registry\n", "serve_app.app") == []
    assert layer_violations("from tune.runner import run_sweep\n", "pipelines.x") == ["tune.runner",
                                                                                       "tune.runner.run_sweep"]
    assert layer_violations("def f():\n    from jobs.apps import report\n", "pipelines.data.x") == [
        "jobs.apps", "jobs.apps.report"]
    assert layer_violations("from jobs._cli import fail\n", "tune.sweep") == ["jobs._cli", "jobs._cli.fail"]
    assert layer_violations("import serve_app.api\n", "tune.runner") == ["serve_app.api"]
    assert layer_violations("from tune import search\n", "serve_app.app") == ["tune", "tune.search"]
    assert layer_violations("from pipelines import storage\n", "ofa_model.x") == ["pipelines", "pipelines.storage"]
    assert layer_violations("from pipelines.train import train\nfrom ofa_model import vocab\n",
                            "tune.trial") == []
    assert layer_violations("from tune.runner import run_sweep\nimport serve_app\n", "jobs.apps.demo") == []


@pytest.mark.parametrize("module,source", _modules("ofa_model"), ids=lambda v: v if "\n" not in v else "")
def test_ofa_model_imports_no_service_library(module, source):
    assert model_violations(source, module) == [], f"{module} imports a service library"


@pytest.mark.parametrize("module,source", _modules("serve_app"), ids=lambda v: v if "\n" not in v else "")
def test_serve_app_reaches_pipelines_only_through_the_registry(module, source):
    assert serve_violations(source, module) == [], f"{module} imports pipelines beyond pipelines.registry"


@pytest.mark.parametrize(
    "module,source",
    [m for package in FORBIDDEN_LAYERS for m in _modules(package)],
    ids=lambda v: v if "\n" not in v else "",
)
def test_imports_point_down_the_layers(module, source):
    assert layer_violations(source, module) == [], f"{module} imports from a layer above its own"


def test_every_command_line_lives_in_jobs():
    """`python -m X` entry points (a `__main__` guard or module) exist only under jobs/ (and bench/, the
    benchmarks' own runner)."""
    stray = [m for package in FORBIDDEN_LAYERS for m, src in _modules(package)
             if '__name__ == "__main__"' in src or m.endswith("__main__")]
    assert stray == []


def test_importing_every_ofa_model_module_loads_no_service_library():
    """What really gets loaded, transitive imports included (a dependency could pull ray in)."""
    mods = [m.removesuffix(".__init__") for m, _ in _modules("ofa_model")]
    code = (
        "import importlib, sys, json\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in {FORBIDDEN_IN_MODEL!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"loaded by importing ofa_model: {out.stdout}"
