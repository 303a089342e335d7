"""The settings a job carries to every process (`pipelines.job_env`), and Serve's tracking URI and binding rules.
The two-node proof (a submitted job, nodes and shell without the settings) is tests/test_train_cluster.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import finetune
from ofa_model.errors import ConfigError
from pipelines.job_env import SETTINGS_VARS, SUBMITTED_JOB_VAR, job_env, runtime_env, s3_env
from pipelines.storage import S3Options
from serve_app.app import with_tracking
from serve_app.serve_config import serve_config

SETTINGS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
            "AWS_REGION", "AWS_DEFAULT_REGION")


@pytest.fixture
def bare_env(monkeypatch):
    """No tracking or S3 setting in this process's environment, but secrets that must never be copied."""
    for name in (*SETTINGS, SUBMITTED_JOB_VAR):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE12")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-never-copied")
    return monkeypatch


def test_the_configured_settings_become_the_jobs_environment_and_no_credential_does(bare_env):
    env = job_env("http://mlflow:5000", S3Options("http://s3.internal:8333", "eu-west-1"))
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_ENDPOINT_URL": "http://s3.internal:8333",
                   "MLFLOW_S3_ENDPOINT_URL": "http://s3.internal:8333", "AWS_REGION": "eu-west-1",
                   "AWS_DEFAULT_REGION": "eu-west-1"}
    assert set(env) <= set(SETTINGS_VARS)
    assert "s3cr3t" not in json.dumps(runtime_env(env))


def test_unconfigured_settings_come_from_the_drivers_environment(bare_env):
    bare_env.setenv("MLFLOW_TRACKING_URI", "http://from-node:5000")
    bare_env.setenv("AWS_ENDPOINT_URL", "http://node-s3:9000")
    bare_env.setenv("MLFLOW_S3_ENDPOINT_URL", "http://mlflow-s3:9000")  # MLflow's own store stays its own
    bare_env.setenv("AWS_DEFAULT_REGION", "us-west-2")
    assert job_env(None, None) == {"MLFLOW_TRACKING_URI": "http://from-node:5000",
                                   "AWS_ENDPOINT_URL": "http://node-s3:9000",
                                   "MLFLOW_S3_ENDPOINT_URL": "http://mlflow-s3:9000",
                                   "AWS_REGION": "us-west-2", "AWS_DEFAULT_REGION": "us-west-2"}
    # the config wins over the node
    assert job_env("http://cfg:5000", S3Options("http://cfg-s3:1", None))["AWS_ENDPOINT_URL"] == "http://cfg-s3:1"
    assert s3_env(None)["AWS_ENDPOINT_URL"] == "http://node-s3:9000"


def test_outside_a_submitted_job_the_default_is_sqlite_in_the_working_directory(bare_env, tmp_path):
    bare_env.chdir(tmp_path)
    assert job_env(None) == {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def test_a_submitted_job_without_a_tracking_uri_is_refused_naming_the_key(bare_env):
    bare_env.setenv(SUBMITTED_JOB_VAR, json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    with pytest.raises(ConfigError, match=r"^tracking\.tracking_uri is required in a job submitted to a cluster: "
                                          r"pass tracking\.tracking_uri=http://"):
        job_env(None)
    with pytest.raises(ConfigError, match=r"^train\.tracking\.tracking_uri is required"):
        job_env(None, tracking_key="train.tracking.tracking_uri")
    assert job_env("http://mlflow:5000")["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    bare_env.setenv("MLFLOW_TRACKING_URI", "http://node:5000")  # a node that has one (a ConfigMap)
    assert job_env(None)["MLFLOW_TRACKING_URI"] == "http://node:5000"


def test_the_submitters_runtime_env_variables_win_and_the_rest_are_added(bare_env, caplog):
    bare_env.setenv(SUBMITTED_JOB_VAR, json.dumps({"runtime_env": {"env_vars": {"AWS_REGION": "ap-south-1",
                                                                                 "OTHER": "1"}}}))
    env = {"MLFLOW_TRACKING_URI": "http://m:5000", "AWS_REGION": "eu-west-1"}
    assert runtime_env(env) == {"env_vars": {"MLFLOW_TRACKING_URI": "http://m:5000"}}
    assert "AWS_REGION: the job's runtime_env sets ap-south-1, the config eu-west-1" in caplog.text


def test_finetune_stops_before_ray_starts_when_submitted_without_a_tracking_uri(bare_env, capsys):
    bare_env.setenv(SUBMITTED_JOB_VAR, "{}")
    bare_env.setattr(finetune, "init_ray", lambda env=None: pytest.fail("Ray started"))
    with pytest.raises(SystemExit) as exc:
        finetune.main(["--config", "configs/finetune/vqa_easyvqa.yaml"])
    assert exc.value.code == 2
    assert "error: tracking.tracking_uri is required in a job submitted to a cluster" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Serve


def test_serve_resolves_the_tracking_uri_once_for_every_replica(bare_env, tmp_path):
    bare_env.chdir(tmp_path)
    registry = serve_config(data={"models": {"m": {"source": "models:/ofa-vqa@champion"}}})
    with pytest.raises(ConfigError, match=r"^tracking_uri: models\.m\.source is models:/ofa-vqa@champion, but no "
                                          r"tracking server is configured"):
        with_tracking(registry)
    (tmp_path / "mlflow.db").write_bytes(b"")  # a local registry here: the replicas get its absolute path
    assert with_tracking(registry).tracking_uri == f"sqlite:///{Path(tmp_path) / 'mlflow.db'}"
    bare_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # where the application is built
    assert with_tracking(registry).tracking_uri == "http://mlflow:5000"
    configured = serve_config(data={"models": {"m": {"source": "models:/x@a"}}, "tracking_uri": "http://t:1"})
    assert with_tracking(configured).tracking_uri == "http://t:1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5"])
def test_serve_binds_beyond_loopback_only_with_an_api_key(host):
    with pytest.raises(ConfigError, match=rf"host {host}: binding beyond this machine needs an API key"):
        serve_config(data={"models": {"m": {"source": "bundles/x"}}}, host=host)
    assert serve_config(data={"models": {"m": {"source": "bundles/x"}}, "api_key_env": "OFA_API_KEY"},
                        host=host).host == host
