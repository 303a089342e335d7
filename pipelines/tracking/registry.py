"""Model sources: a bundle directory, a bundle on S3 or an MLflow registry URI, and the registry's `champion` rule.

    resolve_model("bundles/ofa-tiny")              # a local bundle directory, used in place
    resolve_model("s3://bucket/bundles/ofa-base")  # a bundle directory on S3: downloaded into the cache
    resolve_model("models:/ofa-vqa@champion")      # an alias ...
    resolve_model("models:/ofa-vqa/3")             # ... or a version: downloaded once into the cache

A registered version's `source` is the bundle directory logged as run artifacts (`register_bundle`). Versions
are immutable, so a download is cached by (name, version, source) and written atomically (temporary directory,
then rename): two processes resolving the same version at once both end with a complete copy. The source (its
artifact URI names the training run) is in the key because another registry (a new tracking server, a fresh
sqlite file) has its own `ofa-vqa` version 1, a different model.

An S3 prefix is not immutable: the same `s3://bucket/bundles/ofa-base` may be overwritten with new weights. Its
cache entry is keyed by the URI and the prefix's listing (each file's name, size and modification time), which
costs one LIST request per resolve and no download: a rewritten, added or removed file gives a new key and a
fresh download, an unchanged prefix reuses its copy. (A rewrite within the same second at the same size would go
unnoticed; hashing the bytes instead would mean downloading the weights to learn that they need no download.)
Only the regular files directly under the prefix, and those directly under its image tokenizer's directory
(`image_tokenizer/`, a bundle of the same two files), are taken, each under the cap `ofa_model.bundle` puts on it
(config.json, model.safetensors; any other file at the dict.txt cap); a file that changes while it downloads is
an error, and the download is written atomically like a registry version's. S3 settings (endpoint, region) come
from `s3` or the environment, credentials only from the AWS SDK's chain where the process runs
(`pipelines.storage`).

The `champion` alias moves only when a new version's validation metric beats the current champion's, measured
the same way: the same metric on the same split of the same data (fingerprint). The metric, its direction, the
split and the data fingerprint are tags on every version (`register_bundle`), so the rule needs no run lookup
(`promote_if_better`).

A source that cannot be reached (the tracking server or the S3 endpoint refused, timed out or answered 5xx) is
a `SourceUnreachable`, the one kind of `ModelSourceError` worth trying again unchanged (Serve's replicas do, with
backoff); every other one is about the source itself (no such model, alias or bundle).

This is the one module of `pipelines` that `serve_app` may import.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ofa_model.bundle import (
    CONFIG_FILE,
    CONFIG_MAX_BYTES,
    DICT_MAX_BYTES,
    IMAGE_TOKENIZER_DIR,
    WEIGHTS_FILE,
    WEIGHTS_MAX_BYTES,
)
from pipelines import storage
from pipelines.storage import S3Options

logger = logging.getLogger(__name__)

MODELS_URI = re.compile(r"^models:/(?P<name>[A-Za-z0-9][\w.\-]*)(?:@(?P<alias>[A-Za-z0-9][\w\-]*)|/(?P<version>\d+))$")
CHAMPION = "champion"
METRIC_TAG, MODE_TAG = "metric_name", "metric_mode"  # version tags: which metric decides, and "max" or "min"
SPLIT_TAG, FINGERPRINT_TAG = "metric_split", "data_fingerprint"  # ... and the split and data it was measured on
COPY_CHUNK = 8 * 2**20
DEFAULT_CACHE = Path(os.environ.get("OFA_MODEL_CACHE", Path.home() / ".cache" / "ofa-ray" / "models"))


TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
S3_UNREACHABLE = "NETWORK_CONNECTION"  # in pyarrow's OSError when the S3 endpoint refused or timed out


class ModelSourceError(ValueError):
    """A model URI that is malformed, names nothing, points at something that is not a bundle, or cannot be
    fetched."""


class SourceUnreachable(ModelSourceError):
    """The registry, or the store holding the bundle, did not answer (refused, timed out, a 5xx): the source may
    well be fine, and the same call may succeed later. Every other ModelSourceError is about the source itself."""


def transient(exc: BaseException) -> bool:
    """Whether `exc` says the tracking server is away (refused, timed out, 5xx, a locked database) rather than
    that the request itself is wrong. MLflow wraps a failed HTTP call in an `MlflowException` with code
    INTERNAL_ERROR."""
    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_CODES
    return isinstance(exc, OSError)  # requests' errors are OSErrors


def _s3_error(exc: BaseException) -> type[ModelSourceError]:
    """SourceUnreachable for pyarrow's "the endpoint did not answer", else ModelSourceError (a missing bucket or
    a refused credential is about the source)."""
    return SourceUnreachable if S3_UNREACHABLE in str(exc) else ModelSourceError


def _brief(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(getattr(exc, "message", None) or exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local bundle directory
    uri: str  # what was asked for
    name: str | None = None  # registered model name (None for a plain directory)
    version: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def tracking_uri(configured: str | None = None) -> str:
    """The tracking URI: the configured one, else MLFLOW_TRACKING_URI, else sqlite in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _client(uri: str | None) -> MlflowClient:
    resolved = tracking_uri(uri)
    return MlflowClient(tracking_uri=resolved, registry_uri=resolved)


def resolve_model(uri: str, *, tracking: str | None = None, cache_dir: str | Path | None = None,
                  s3: S3Options | None = None) -> ResolvedModel:
    """A local bundle directory for `uri` (see the module docstring); `s3` overrides the environment's S3
    endpoint and region for an s3:// source."""
    if not isinstance(uri, str) or not uri:
        raise ModelSourceError(f"a model is a bundle directory, s3://bucket/prefix or models:/name@alias, got {uri!r}")
    if uri.startswith("s3://"):
        return _resolve_s3(uri, Path(cache_dir or DEFAULT_CACHE), s3)
    if not uri.startswith("models:"):
        path = Path(uri).expanduser()
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise ModelSourceError(f"{uri}: not a bundle directory (a directory holding config.json)")
        return ResolvedModel(path=path.resolve(), uri=uri)
    m = MODELS_URI.match(uri)
    if not m:
        raise ModelSourceError(f"{uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    client = _client(tracking)
    try:
        if m["alias"]:
            mv = client.get_model_version_by_alias(m["name"], m["alias"])
        else:
            mv = client.get_model_version(m["name"], m["version"])
    except MlflowException as exc:
        if transient(exc):
            raise SourceUnreachable(f"{uri}: the registry at {tracking_uri(tracking)} did not answer "
                                    f"({_brief(exc)})") from exc
        raise ModelSourceError(f"{uri}: not in the registry at {tracking_uri(tracking)} ({exc.message})") from exc
    target = Path(cache_dir or DEFAULT_CACHE) / mv.name / _cache_entry(mv)
    if not (target / "config.json").is_file():
        _download(mv.source, target, tracking)
    logger.info("model %s -> %s version %s at %s", uri, mv.name, mv.version, target)
    return ResolvedModel(path=target, uri=uri, name=mv.name, version=str(mv.version), tags=dict(mv.tags))


def _file_cap(name: str) -> int:
    return {CONFIG_FILE: CONFIG_MAX_BYTES, WEIGHTS_FILE: WEIGHTS_MAX_BYTES}.get(Path(name).name, DICT_MAX_BYTES)


def _bundle_files(fs: pafs.FileSystem, prefix: str) -> list[tuple[str, pafs.FileInfo]]:
    """(name relative to the prefix, info) of the files a bundle at `prefix` holds: those directly under it and
    those directly under its image tokenizer's directory, sorted by name."""
    top = fs.get_file_info(pafs.FileSelector(prefix, recursive=False, allow_not_found=True))
    out = [(i.base_name, i) for i in top if i.type == pafs.FileType.File]
    if any(i.base_name == IMAGE_TOKENIZER_DIR and i.type == pafs.FileType.Directory for i in top):
        sub = fs.get_file_info(pafs.FileSelector(f"{prefix.rstrip('/')}/{IMAGE_TOKENIZER_DIR}", recursive=False))
        out += [(f"{IMAGE_TOKENIZER_DIR}/{i.base_name}", i) for i in sub if i.type == pafs.FileType.File]
    return sorted(out, key=lambda f: f[0])


def _resolve_s3(uri: str, cache_dir: Path, s3: S3Options | None) -> ResolvedModel:
    """The bundle at the S3 prefix `uri`, downloaded into `cache_dir` unless its listing is cached already."""
    shown = storage.redact(uri)
    try:
        fs, prefix = storage.resolve(uri, s3)
        files = _bundle_files(fs, prefix)
    except (OSError, ValueError) as exc:
        raise _s3_error(exc)(f"{shown}: cannot list the bundle ({storage.redact(str(exc))})") from exc
    if not any(name == CONFIG_FILE for name, _ in files):
        raise ModelSourceError(f"{shown}: not a bundle (no {CONFIG_FILE} directly under the prefix)")
    for name, i in files:
        if i.size > _file_cap(name):
            raise ModelSourceError(f"{shown}: {name} is {i.size:,} bytes, over the "
                                   f"{_file_cap(name):,}-byte cap for a bundle file")
    listing = "\n".join(f"{name}\t{i.size}\t{i.mtime_ns}" for name, i in files)
    digest = hashlib.sha256(f"{uri.rstrip('/')}\n{listing}".encode()).hexdigest()[:16]
    tail = re.sub(r"[^\w.\-]", "_", prefix.rstrip("/").rsplit("/", 1)[-1])[:64]
    target = cache_dir / "s3" / f"{tail}-{digest}"
    if not (target / CONFIG_FILE).is_file():
        _atomic_fill(target, lambda tmp: _download_s3(fs, files, tmp, shown))
    logger.info("model %s -> %s", shown, target)
    return ResolvedModel(path=target, uri=uri)


def _download_s3(fs: pafs.FileSystem, files: list[tuple[str, pafs.FileInfo]], tmp: Path, shown: str) -> Path:
    """Copy the listed files into `tmp` (by their names relative to the prefix); ModelSourceError if one is not
    the size it was listed at."""
    for name, info in files:
        got, cap = 0, min(info.size, _file_cap(name))
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        try:
            with fs.open_input_stream(info.path) as src, open(tmp / name, "wb") as dst:
                while chunk := src.read(min(COPY_CHUNK, cap + 1 - got)):
                    got += len(chunk)
                    if got > cap:
                        break
                    dst.write(chunk)
        except FileNotFoundError as exc:
            raise ModelSourceError(f"{shown}: {name} disappeared while downloading; retry") from exc
        except OSError as exc:
            raise _s3_error(exc)(f"{shown}: cannot download {name} "
                                   f"({storage.redact(str(exc))})") from exc
        if got != info.size:
            raise ModelSourceError(f"{shown}: {name} changed while downloading (listed at "
                                   f"{info.size:,} bytes, read {got:,}); retry")
    return tmp


def _cache_entry(mv) -> str:
    """`<version>-<digest of the version's source and run>`: one registry's version never serves another's."""
    digest = hashlib.sha256(f"{mv.source}\n{mv.run_id}".encode()).hexdigest()[:16]
    return f"{mv.version}-{digest}"


def _download(source: str, target: Path, tracking: str | None) -> None:
    def fetch(tmp: Path) -> Path:
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                                            tracking_uri=tracking_uri(tracking)))
        except MlflowException as exc:
            if transient(exc):
                raise SourceUnreachable(f"registered source {source}: the artifact store (through "
                                        f"{tracking_uri(tracking)}) did not answer ({_brief(exc)})") from exc
            raise

    _atomic_fill(target, fetch, what=f"registered source {source}")


def _atomic_fill(target: Path, fetch: Callable[[Path], Path], what: str | None = None) -> None:
    """Make `target` a complete bundle copy: `fetch(tmp)` fills a temporary directory beside it and returns the
    bundle directory inside, which is renamed into place. Of two processes at once, the first rename wins and
    the other keeps its copy; both end with a complete `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        got = fetch(tmp)
        if not (got / CONFIG_FILE).is_file():
            raise ModelSourceError(f"{what or target} is not a bundle (no {CONFIG_FILE})")
        os.chmod(got, 0o755)  # mkdtemp makes it private; a cached bundle is read by other users (serving)
        try:
            got.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / CONFIG_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def register_bundle(name: str, source: str, *, run_id: str | None, metric: str, value: float, split: str,
                    data_fingerprint: str, mode: str = "max", tags: dict[str, str] | None = None,
                    tracking: str | None = None) -> str:
    """Register the bundle at artifact URI `source` as a new version of `name`; returns the version.

    The version is tagged with `tags` plus how it was measured: the deciding metric (`metric` = `value`, `mode`
    "max" or "min"), the `split` it was scored on and the `data_fingerprint` of the corpus that split belongs
    to (`promote_if_better` compares only versions measured alike)."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if not math.isfinite(value):
        raise ValueError(f"metric {metric} = {value} is not finite")
    if not split or not data_fingerprint:
        raise ValueError(f"{name}: a version needs the split ({split!r}) and the data fingerprint "
                         f"({data_fingerprint!r}) its {metric} was measured on")
    client = _client(tracking)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    all_tags = {**(tags or {}), METRIC_TAG: metric, MODE_TAG: mode, f"metric.{metric}": repr(float(value)),
                SPLIT_TAG: split, FINGERPRINT_TAG: data_fingerprint}
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=all_tags)
    return str(mv.version)


def promote_if_better(name: str, version: str, *, alias: str = CHAMPION, tracking: str | None = None) -> bool:
    """Point `alias` at `version` if there is no champion yet or the version's metric beats the champion's.

    Returns whether the alias moved. A tie does not move it. Only versions measured alike are compared: the same
    metric, on the same split, of data with the same fingerprint (the version tags `register_bundle` writes).
    When any of them differs, or the champion lacks the tag (registered before the tag existed), the numbers are
    not comparable: the alias stays where it is and a warning names what differs. Moving it then is the user's
    decision, through MLflow's alias API (`MlflowClient.set_registered_model_alias(name, "champion", version)`),
    or registering under another name starts a separate contest. MLflow has no compare-and-set on aliases: two
    promoters of one model deciding in the same instant may both move it, the last one winning."""
    client = _client(tracking)
    new = client.get_model_version(name, version)
    metric, mode = new.tags[METRIC_TAG], new.tags[MODE_TAG]
    new_value = float(new.tags[f"metric.{metric}"])
    try:
        cur = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        cur = None
    if cur is not None:
        if cur.version == new.version:
            return False
        differs = [f"{what} {cur.tags.get(tag)}, not {new.tags.get(tag)}"
                   for what, tag in (("chosen by", METRIC_TAG), ("scored on split", SPLIT_TAG),
                                     ("on data", FINGERPRINT_TAG))
                   if cur.tags.get(tag) != new.tags.get(tag)]
        if differs:
            logger.warning("%s@%s (version %s) was %s: not comparable with version %s, alias left in place (move "
                           "it deliberately with MLflow's set_registered_model_alias)", name, alias, cur.version,
                           "; ".join(differs), version)
            return False
        cur_value = float(cur.tags[f"metric.{metric}"])
        better = new_value > cur_value if mode == "max" else new_value < cur_value
        if not better:
            logger.info("%s version %s: %s %.6g does not beat champion version %s (%.6g)", name, version, metric,
                        new_value, cur.version, cur_value)
            return False
    client.set_registered_model_alias(name, alias, version)
    logger.info("%s@%s -> version %s (%s %.6g)", name, alias, version, metric, new_value)
    return True
