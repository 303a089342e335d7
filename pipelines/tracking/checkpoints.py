"""Converted official checkpoints in the registry: a bundle logged as the artifacts of an MLflow run and
registered as a version of a model, with an alias (`official`) that jobs then name.

    python -m jobs.convert_checkpoint --input ofa_base.pt --arch ofa-base ... --register ofa-base
    python -m jobs.finetune ... model.init=models:/ofa-base@official

The run (experiment `ofa-checkpoints`) and the version are tagged with the source checkpoint file's sha256, its
file name and the architecture. Converting the same checkpoint the same way again registers nothing new: a
version of the model whose checkpoint sha256 and bundle digest (config.json without the path the checkpoint was
read from: architecture, vocabulary, preprocessing, EMA) both match is reused, and only the alias is set on it.
A conversion with other preprocessing is another bundle, hence a new version. Two conversions registering the
same bundle in the same instant may both create a version (MLflow has no unique constraint on tags); either
serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException

from ofa_model.bundle import CONFIG_FILE
from pipelines.tracking.registry import MODELS_URI
from pipelines.tracking.runs import client_for, experiment_id

logger = logging.getLogger(__name__)

EXPERIMENT = "ofa-checkpoints"
OFFICIAL = "official"
SHA256_TAG, FILE_TAG, ARCH_TAG = "ofa.checkpoint_sha256", "ofa.checkpoint_file", "ofa.arch"
BUNDLE_TAG = "ofa.bundle_digest"  # sha256 of config.json without metadata.source
ARTIFACT_PATH = "bundle"
HASH_CHUNK = 8 * 2**20


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    alias: str
    uri: str  # models:/<name>@<alias>
    run_id: str | None
    reused: bool  # an existing version of the same bundle got the alias; nothing was logged


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_file(path: str | Path) -> Path:
    """The file a conversion read: `path` itself, or in a directory (the HF port) its model.safetensors or
    pytorch_model.bin (`ofa_model.safe_load.read_state_file`'s order)."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin inside")
    return path


def bundle_digest(bundle_dir: str | Path) -> str:
    """sha256 of the bundle's config.json as canonical JSON, without `metadata.source` (where it was read from)."""
    cfg = json.loads((Path(bundle_dir) / CONFIG_FILE).read_text())
    cfg.get("metadata", {}).pop("source", None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def models_uri(name: str, alias: str) -> str:
    """`models:/<name>@<alias>`; ValueError for a name or alias that such a URI cannot spell."""
    uri = f"models:/{name}@{alias}"
    if not MODELS_URI.match(uri):
        raise ValueError(f"model name {name!r} / alias {alias!r}: a name is letters, digits, '_', '.' and '-' "
                         "(a letter or digit first), an alias the same without '.'")
    return uri


def register_converted(bundle_dir: str | Path, name: str, *, checkpoint: str | Path, arch: str,
                       alias: str = OFFICIAL, tracking: str | None = None) -> Registered:
    """Register the bundle converted from `checkpoint` as a version of `name` and point `alias` at it (or at the
    version already holding the same bundle; see the module docstring). ValueError for a name or alias that a
    models:/ URI cannot spell; MlflowException when the tracking server refuses."""
    uri = models_uri(name, alias)
    sha256, digest = file_sha256(checkpoint_file(checkpoint)), bundle_digest(bundle_dir)
    client, resolved = client_for(tracking)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    same = [mv for mv in client.search_model_versions(f"name='{name}'")
            if mv.tags.get(SHA256_TAG) == sha256 and mv.tags.get(BUNDLE_TAG) == digest]
    if same:
        mv = max(same, key=lambda v: int(v.version))
        client.set_registered_model_alias(name, alias, mv.version)
        logger.info("%s version %s already holds this bundle (checkpoint sha256 %s): %s points at it", name,
                    mv.version, sha256[:12], uri)
        return Registered(name, str(mv.version), alias, uri, mv.run_id, reused=True)
    tags = {SHA256_TAG: sha256, FILE_TAG: Path(checkpoint).name, ARCH_TAG: arch}
    run = client.create_run(experiment_id(client, resolved, EXPERIMENT), run_name=f"convert-{name}", tags=tags)
    run_id = run.info.run_id
    try:
        client.log_artifacts(run_id, str(bundle_dir), ARTIFACT_PATH)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}", run_id=run_id,
                                     tags={**tags, BUNDLE_TAG: digest})
    client.set_registered_model_alias(name, alias, mv.version)
    logger.info("%s version %s registered from %s (run %s): %s", name, mv.version, checkpoint, run_id, uri)
    return Registered(name, str(mv.version), alias, uri, run_id, reused=False)
