"""The settings every process of a job needs, carried by the job itself rather than by the shell that submitted it.

A job's driver, its Ray Train workers, its Tune trials and the Ray Data tasks they start run on any node of the
cluster; `ray job submit` hands none of the submitting shell's environment to them. So a job resolves, once, in
its driver:

* the MLflow tracking URI: the config's (`tracking.tracking_uri`), else the driver's MLFLOW_TRACKING_URI (a
  node's environment: on Kubernetes the ConfigMap's), else a sqlite file in the working directory, which a
  submitted job refuses (it would be written into the job's temporary copy of the repository, and no other node
  would see it);
* the S3 endpoint and region: the config's (`data.s3`), else the driver's AWS_ENDPOINT_URL(_S3) / AWS_REGION,

and puts them in the job's `runtime_env` (`env_vars`), which every task and actor of the job inherits on every
node (`job_env`, `runtime_env`). MLflow's own S3 client reads MLFLOW_S3_ENDPOINT_URL, so that follows the S3
endpoint unless the driver's environment sets it.

Credentials never travel this way: a runtime_env is shown by the dashboard and stored with the job. Every node
reads them from its own environment or the SDK's chain (a Kubernetes Secret through `envFrom`, an IAM role,
~/.aws/credentials), as `pipelines.storage` says.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

from ofa_model.errors import ConfigError
from pipelines.storage import S3Options, redact
from pipelines.tracking.registry import tracking_uri

logger = logging.getLogger(__name__)

# Ray's job supervisor sets this in a submitted job's driver (the job's runtime_env and metadata, as JSON).
SUBMITTED_JOB_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# What `job_env` may set: settings, never credentials.
SETTINGS_VARS = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_REGION",
                 "AWS_DEFAULT_REGION")


def submitted_job() -> bool:
    """True in the driver of a job started with `ray job submit` (or a KubeRay RayJob)."""
    return SUBMITTED_JOB_VAR in os.environ


def job_tracking_uri(configured: str | None, key: str = "tracking.tracking_uri") -> str:
    """The tracking URI every process of this job uses (see the module docstring); ConfigError naming `key`
    when a submitted job would fall back to a sqlite file in its temporary working directory."""
    if not configured and not os.environ.get("MLFLOW_TRACKING_URI") and submitted_job():
        raise ConfigError(f"{key} is required in a job submitted to a cluster: pass {key}=http://<mlflow server> "
                          f"(without it the runs would go to a sqlite file in the job's temporary working "
                          f"directory, {os.getcwd()}, seen by no other node and deleted with the job)")
    return tracking_uri(configured)


def job_env(tracking: str | None, s3: S3Options | None = None, *,
            tracking_key: str = "tracking.tracking_uri") -> dict[str, str]:
    """The environment variables that carry a tracked job's settings to all its processes (see the module
    docstring). `tracking`: the configured tracking URI (None: the driver's), `s3`: the configured S3 endpoint
    and region."""
    return {"MLFLOW_TRACKING_URI": job_tracking_uri(tracking, tracking_key), **s3_env(s3)}


def s3_env(s3: S3Options | None) -> dict[str, str]:
    """The S3 endpoint and region of a job (the configured ones, else the driver's) as environment variables."""
    env = {}
    endpoint = ((s3.endpoint_url if s3 else None) or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
        env["MLFLOW_S3_ENDPOINT_URL"] = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or endpoint
    region = (s3.region if s3 else None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = region
    return env


def runtime_env(env: Mapping[str, str]) -> dict:
    """The `runtime_env` for `ray.init` in this driver: `env` as `env_vars`, less the variables the submitted
    job's own runtime_env already sets (`ray job submit --runtime-env-json`: the submitter's explicit choice wins,
    and Ray refuses the same variable from both)."""
    job = json.loads(os.environ.get(SUBMITTED_JOB_VAR, "{}")).get("runtime_env") or {}
    given = job.get("env_vars") or {}
    for name in sorted(set(env) & set(given)):
        if given[name] != env[name]:
            logger.warning("%s: the job's runtime_env sets %s, the config %s; the job's wins", name,
                           redact(given[name]), redact(env[name]))
    return {"env_vars": {k: v for k, v in env.items() if k not in given}}
