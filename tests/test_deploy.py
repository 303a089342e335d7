"""What ships for clusters stays true (issue 23): the image (Dockerfile) and the KubeRay manifests
(deploy/kuberay/) agree with pyproject.toml's versions, run real `python -m jobs.*` commands with recipes that
load, hold no credential, pass KubeRay's own CRD schemas, and serve deploy/serve_config.cluster.yaml as it is;
.dockerignore and .gitignore keep weights, corpora, venvs and run output out of the image and of uploads.
Fast: no services, no Ray cluster."""

import importlib
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
CLUSTER_SERVE_CONFIG = ROOT / "deploy" / "serve_config.cluster.yaml"
CONFIGMAP, SECRET = "ofa-settings", "ofa-credentials"
# The ConfigMap's keys that entrypoints read, with the dummy values a test substitutes for them.
SETTINGS = {"DATA_URI": "s3://test/corpus", "MODEL_INIT": "models:/ofa-base@official",
            "STORAGE_URI": "s3://test/runs", "MLFLOW_TRACKING_URI": "http://mlflow.test:5000",
            # read by the job before it starts: a real (small) answer file
            "ANSWERS_URI": str(ROOT / "tests" / "data" / "vqa_answers.txt")}
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "OFA_API_KEY")
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL", re.IGNORECASE)


def documents() -> list[tuple[Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d is not None]


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in documents() if d["kind"] == kind]


def find_key(node, key: str) -> list:
    """Every value stored under `key`, at any depth."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [x for v in node.values() for x in find_key(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in find_key(v, key)]
    return []


def containers(doc: dict) -> list[dict]:
    return [c for group in find_key(doc, "containers") for c in group]


def pins() -> tuple[SpecifierSet, SpecifierSet]:
    """pyproject.toml's Ray pin and requires-python."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [ray] = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray"]
    return ray.specifier, SpecifierSet(project["requires-python"])


def test_versions_have_one_source():
    """The Dockerfile's base image, every manifest's rayVersion and every container's image tag name the Ray and
    Python versions that pyproject.toml pins."""
    ray_pin, python_pin = pins()
    froms = re.findall(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert len(froms) == 1, froms
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", froms[0])
    assert m, f"Dockerfile: FROM {froms[0]}: expected rayproject/ray:<version>-py<XY>-<gpu|cuXXX>"
    ray_version, python, variant = m[1], f"{m[2]}.{m[3]}", m[4]
    assert ray_version in ray_pin, f"Dockerfile's Ray {ray_version} is outside pyproject.toml's ray{ray_pin}"
    assert python_pin.contains(python), f"Dockerfile's Python {python} is outside requires-python {python_pin}"
    tag = f"{ray_version}-py{m[2]}{m[3]}-{variant}"

    ray_versions = [v for _, d in documents() for v in find_key(d, "rayVersion")]
    assert len(ray_versions) == len(of_kind("RayCluster")) + len(of_kind("RayService")) >= 2
    assert set(ray_versions) == {ray_version}, f"manifests' rayVersion {set(ray_versions)} != {ray_version}"
    images = {c["image"] for _, d in documents() for c in containers(d)}
    assert images == {f"ofa-ray:{tag}"}, f"every container runs the project's image ofa-ray:{tag}: {images}"


class Started(Exception):
    """Raised in place of the job's Ray start: everything before it (flags, recipe, checks) passed."""


def entrypoint_argv(entrypoint: str, monkeypatch) -> list[str]:
    """The entrypoint as the head's shell runs it, the ConfigMap's variables replaced by dummy values."""
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", entrypoint))
    assert used <= set(SETTINGS), f"entrypoint reads {sorted(used - set(SETTINGS))}, which no setting provides"
    for name, value in SETTINGS.items():
        monkeypatch.setenv(name, value)
    return shlex.split(os.path.expandvars(entrypoint))


@pytest.mark.parametrize("name", [d["metadata"]["name"] for d in of_kind("RayJob")])
def test_every_job_runs_a_real_module_with_a_recipe_that_loads(name, monkeypatch, capsys):
    """Each RayJob's entrypoint is `python -m jobs.<module> ...`; run to just before it starts Ray, its flags
    parse, every recipe it names exists and loads with the project's loader, with its overrides."""
    [job] = [d for d in of_kind("RayJob") if d["metadata"]["name"] == name]
    raw = job["spec"]["entrypoint"]
    assert "s3://" not in raw, "values the user supplies come from the ConfigMap, not the manifest"
    python, dash_m, module, *argv = entrypoint_argv(raw, monkeypatch)
    assert (python, dash_m) == ("python", "-m") and module.startswith("jobs."), raw
    assert (ROOT / Path(*module.split("."))).with_suffix(".py").is_file(), f"{module} is not a module under jobs/"
    recipes = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    assert recipes and all((ROOT / r).is_file() for r in recipes), recipes

    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, "init_ray", lambda env=None: (_ for _ in ()).throw(Started()))
    monkeypatch.chdir(ROOT)  # the image's working directory holds the same tree
    try:
        mod.main(argv)
    except Started:
        return
    except SystemExit as exc:
        pytest.fail(f"{name}: {module} exited {exc.code} before starting: {capsys.readouterr().err.strip()}")
    pytest.fail(f"{name}: {module} returned without starting Ray")


def test_settings_and_credentials_come_from_the_configmap_and_secret():
    """No credential in a manifest: every container reads the ConfigMap and the Secret through envFrom, no env
    entry or runtime_env sets a secret-looking or a settings variable by value, and nothing looks like a key."""
    for path, doc in documents():
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path.name}: an AWS access key id"
        assert "my-bucket" not in text, f"{path.name}: a real-looking placeholder"
        for c in containers(doc):
            refs = {(kind, ref["name"]) for source in c.get("envFrom", []) for kind, ref in source.items()}
            assert {("configMapRef", CONFIGMAP), ("secretRef", SECRET)} <= refs, f"{path.name}: {c['name']}"
            for var in c.get("env", []):
                plain = "value" in var and "valueFrom" not in var
                assert not (plain and (SECRET_NAME.search(var["name"]) or var["name"] in SETTINGS)), \
                    f"{path.name}: {c['name']} sets {var['name']} in plain text"
        for runtime_env in find_key(doc, "runtimeEnvYAML"):
            env_vars = (yaml.safe_load(runtime_env) or {}).get("env_vars", {})
            bad = [k for k in env_vars if SECRET_NAME.search(k) or k in SETTINGS]
            assert not bad, f"{path.name}: runtimeEnvYAML sets {bad}"
    [service] = of_kind("RayService")
    optional = [ref.get("optional", False) for c in containers(service) for ref in find_key(c, "secretRef")]
    assert optional and not any(optional), "Serve needs the Secret (its API key): it must not be optional"


def test_rayservice_serves_the_cluster_serve_config():
    """The RayService's serveConfigV2 is deploy/serve_config.cluster.yaml, and that config is a valid Serve config
    whose args load as a ServeConfig: proxies on every node, all interfaces only behind an API key."""
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import deployment_name, proxy_options
    from serve_app.serve_config import config_from_args

    [service] = of_kind("RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    expected = yaml.safe_load(CLUSTER_SERVE_CONFIG.read_text())
    assert embedded == expected, ("deploy/kuberay/rayservice.yaml's serveConfigV2 differs from "
                                  "deploy/serve_config.cluster.yaml: copy the file into it")
    deploy = ServeDeploySchema.model_validate(expected)
    assert deploy.proxy_location == "EveryNode" and deploy.http_options.host == "0.0.0.0"
    [app] = deploy.applications
    cfg = config_from_args(app.args)
    assert app.import_path == "serve_app.app:build_app"
    assert deploy.http_options.model_dump(include={"request_timeout_s", "keep_alive_timeout_s"}) == {
        k: proxy_options(cfg)[k] for k in ("request_timeout_s", "keep_alive_timeout_s")}
    assert cfg.api_key_env in SECRET_KEYS, "binding every interface needs an API key from the Secret"
    assert cfg.tracking_uri is None, "the tracking URI comes from MLFLOW_TRACKING_URI (the ConfigMap)"
    assert all(m.source.startswith("models:/") for m in cfg.models.values()), "cluster sources: the registry"
    assert {d.name: d.user_config for d in app.deployments} == {
        deployment_name(n): {"source": m.source} for n, m in cfg.models.items()}


def kube_validate() -> Path | None:
    """shared/tools/kube_validate.py beside the repository (CI's layout), or beside its parent (a worktree)."""
    for base in (ROOT.parent, ROOT.parent.parent):
        tool = base / "shared" / "tools" / "kube_validate.py"
        if tool.is_file():
            return tool
    return None


def test_every_manifest_passes_kuberays_crd_schemas():
    tool = kube_validate()
    if tool is None:
        pytest.skip("no shared/tools/kube_validate.py beside this checkout")
    run = subprocess.run([sys.executable, str(tool), *map(str, MANIFESTS)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("\nvalid: ") + run.stdout.startswith("valid: ") == len(documents()) >= 4, run.stdout
    assert f"{len(documents())} KubeRay documents checked against the CRD schemas, 0 invalid" in run.stdout


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for these files: a pattern matches the path or one of its parent directories,
    `*` within one path segment, `**/` any number of them; a later `!pattern` re-includes."""

    def regex(pattern: str) -> re.Pattern:
        out = re.escape(pattern.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        return re.compile(out.replace(r"\?", "[^/]"))

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for p in patterns:
        negate, p = p.startswith("!"), p.lstrip("!")
        if any(regex(p).fullmatch(x) for x in prefixes):
            ignored = not negate
    return ignored


LEFT_OUT = ["bundles/ofa-base/model.safetensors", "bundles/ofa-base/config.json", "corpora/vqa/part-0.parquet", ".venv/bin/python",
            "demo-work/report.md", "ray_results/vqa-base/checkpoint", "mlruns/0/meta.yaml", "tmp/x",
            "weights.safetensors", "somewhere/deep/model.safetensors"]
KEPT = ["pyproject.toml", "README.md", "ofa_model/model.py", "jobs/finetune.py", "configs/finetune/vqa.yaml",
        "configs/tune/vqa.yaml", "serve_app/app.py", "tune/search.py", "pipelines/train/train_config.py"]


def test_image_and_uploads_leave_out_weights_data_venvs_and_run_output():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert [p for p in LEFT_OUT if not dockerignored(p, patterns)] == [], ".dockerignore lets these in"
    assert [p for p in KEPT if dockerignored(p, patterns)] == [], ".dockerignore leaves out what the image needs"
    check = subprocess.run(["git", "check-ignore", "--no-index", "--stdin", "-v", "-n"],
                           input="\n".join(LEFT_OUT + KEPT), capture_output=True, text=True, cwd=ROOT)
    matched = {line.split("\t")[1]: line.split("\t")[0] for line in check.stdout.splitlines()}
    ignored = {path for path, rule in matched.items() if rule != "::"}
    assert set(LEFT_OUT) <= ignored, f".gitignore lets these into uploads: {sorted(set(LEFT_OUT) - ignored)}"
    assert not ignored & set(KEPT), f".gitignore leaves out {sorted(ignored & set(KEPT))}"


def test_readme_creates_every_setting_and_secret_the_manifests_read():
    section = (ROOT / "README.md").read_text().split("## Kubernetes (KubeRay)", 1)
    assert len(section) == 2, "README has no 'Kubernetes (KubeRay)' section"
    text = section[1].split("\n## ", 1)[0]
    for key in [*SETTINGS, *SECRET_KEYS]:
        assert f"--from-literal={key}=" in text, f"README's KubeRay section does not create {key}"
    for name in (CONFIGMAP, SECRET):
        assert name in text
    for path in MANIFESTS:
        assert f"deploy/kuberay/{path.name}" in text, f"README never applies {path.name}"
