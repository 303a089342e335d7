"""One way to reach files at any URI: local paths, `file://` URIs and `s3://bucket/key`.

Everything goes through `pyarrow.fs`, so the filesystem returned by `resolve` can be handed straight to
Ray Data (`ray.data.read_parquet(..., filesystem=fs)`) or to `pyarrow.parquet`.

S3 settings come from the standard AWS environment and config: `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`,
`AWS_REGION` / `AWS_DEFAULT_REGION`, and credentials from the AWS SDK's default chain (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `~/.aws/credentials`, instance roles...). `S3Options`
overrides endpoint and region explicitly for S3-compatible stores. Credentials are never passed, stored or
logged by this module: the SDK reads them where the process runs (so a pickled filesystem sent to a Ray
worker uses the worker's own environment).
"""

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Options:
    """Explicit S3 settings that win over the AWS environment. Credentials never live here.

    endpoint_url: full URL of an S3-compatible endpoint, e.g. "http://127.0.0.1:8333" (None: environment).
    region: e.g. "us-east-1" (None: environment / SDK default).
    """

    endpoint_url: str | None = None
    region: str | None = None


def _split_endpoint(endpoint_url: str) -> tuple[str, str]:
    """"http://host:port" -> ("http", "host:port"); errors for anything else."""
    parts = urlsplit(endpoint_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ValueError(
            f"S3 endpoint must look like http(s)://host[:port], got {redact(endpoint_url)!r}"
        )
    if parts.username or parts.password:
        raise ValueError("S3 endpoint must not carry credentials; use the AWS environment or config")
    return parts.scheme, parts.netloc


def _s3_filesystem(s3: S3Options | None) -> pafs.S3FileSystem:
    s3 = s3 or S3Options()
    endpoint = s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict[str, str] = {}
    if endpoint:
        kwargs["scheme"], kwargs["endpoint_override"] = _split_endpoint(endpoint)
    if region:
        kwargs["region"] = region
    logger.debug("S3 filesystem: endpoint=%s region=%s", redact(endpoint or "<sdk default>"), region)
    return pafs.S3FileSystem(**kwargs)


def _scheme(uri: str) -> str:
    """'s3', 'file' or '' (a plain local path)."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", uri)
    return match.group(1).lower() if match else ""


def resolve(uri: str, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path, file:// URI or s3://bucket/key URI."""
    if not uri:
        raise ValueError("empty URI")
    scheme = _scheme(uri)
    if scheme == "s3":
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise ValueError(f"S3 URI has no bucket: {redact(uri)!r}")
        return _s3_filesystem(s3), path
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URI with a remote host is not supported: {redact(uri)!r}")
        return pafs.LocalFileSystem(), os.path.abspath(parts.path)
    if scheme:
        raise ValueError(f"unsupported URI scheme {scheme!r} in {redact(uri)!r} (use a path, file:// or s3://)")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    """Join URI path segments with '/', e.g. join("s3://b/corpus", "manifest.json") -> "s3://b/corpus/manifest.json"."""
    out = uri
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = (out if out.endswith("://") else out.rstrip("/") + "/") + part
    return out


def _to_uri(original: str, path: str) -> str:
    """Rebuild a URI in the style of `original` for `path` found inside the same filesystem."""
    scheme = _scheme(original)
    if scheme == "s3":
        return "s3://" + path
    if scheme == "file":
        return "file://" + path
    return path


def exists(uri: str, s3: S3Options | None = None) -> bool:
    """True if a file or directory (S3: object or non-empty prefix) exists at `uri`."""
    fs, path = resolve(uri, s3)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise OSError(f"cannot stat {redact(uri)}: {redact(str(exc))}") from exc


def read_bytes(uri: str, s3: S3Options | None = None) -> bytes:
    """Whole content of the file at `uri`."""
    fs, path = resolve(uri, s3)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no such file: {redact(uri)}") from exc
    except OSError as exc:
        raise OSError(f"cannot read {redact(uri)}: {redact(str(exc))}") from exc


def write_bytes(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    """Create or overwrite the file at `uri` (local parent directories are created)."""
    fs, path = resolve(uri, s3)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(os.path.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as exc:
        raise OSError(f"cannot write {redact(uri)}: {redact(str(exc))}") from exc


def delete_file(uri: str, s3: S3Options | None = None) -> None:
    """Delete one file; FileNotFoundError if it is not there."""
    fs, path = resolve(uri, s3)
    try:
        fs.delete_file(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no such file: {redact(uri)}") from exc
    except OSError as exc:
        raise OSError(f"cannot delete {redact(uri)}: {redact(str(exc))}") from exc


def file_sizes(uri: str, s3: S3Options | None = None) -> dict[str, int]:
    """Full URI -> size in bytes of every file under `uri` (recursive; a `uri` that names a file gives that file
    alone). A missing directory or an empty S3 prefix raises FileNotFoundError."""
    fs, path = resolve(uri, s3)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            infos = [info]
        elif info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"nothing at {redact(uri)}")
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise OSError(f"cannot list {redact(uri)}: {redact(str(exc))}") from exc
    return {_to_uri(uri, i.path): i.size for i in infos if i.type == pafs.FileType.File}


def list_files(uri: str, suffix: str | None = None, s3: S3Options | None = None) -> list[str]:
    """Full URIs of the files under `uri` (recursive), sorted, optionally only names ending in `suffix`.

    A `uri` that names a file gives that file alone. A missing directory or an empty S3 prefix raises
    FileNotFoundError.
    """
    return sorted(f for f in file_sizes(uri, s3) if suffix is None or f.endswith(suffix))


def check_copied(local_dir: str | os.PathLike, fs: pafs.FileSystem, path: str) -> None:
    """Check that every file under the local directory `local_dir` is under `path` in `fs`, whole (at its size),
    as after `pyarrow.fs.copy_files(local_dir, path, destination_filesystem=fs)`; OSError naming `path` and the
    files missing or cut short, or the store's error.

    Not redundant: `copy_files` to S3 can return without an error while the server is gone (pyarrow 25.0.1; the S3
    stream's failed part uploads are only logged, "Error ignored when destroying file"). Of 10 tries that killed
    SeaweedFS 0.05-1.2 s into a 100 MB copy of 4 files, 6 returned normally with files missing in the store; Ray
    Train, whose checkpoint upload is that call, then recorded a checkpoint whose state and weights were not there
    (tests/test_store_outage.py)."""
    local = Path(local_dir)
    want = {f.relative_to(local).as_posix(): f.stat().st_size for f in local.rglob("*") if f.is_file()}
    base = path.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise OSError(f"cannot list {redact(base)} to check a copy: {redact(str(exc))}") from exc
    got = {i.path[len(base) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}
    bad = sorted(rel for rel, size in want.items() if got.get(rel) != size)
    if bad:
        raise OSError(f"copy of {local} to {redact(base)} incomplete: {', '.join(bad)} missing or cut short (the "
                      f"store failed during the copy)")


_REDACTED = "***"
# key=value / key: value / "key": "value" where the key names a secret; the value is replaced.
_SECRET_ASSIGNMENT = re.compile(
    r"""(?ix)
    (?P<key>["']?[\w.-]*(?:secret|password|passwd|session[_-]?token|security[_-]?token|access[_-]?key(?:[_-]?id)?
        |x-amz-credential|x-amz-signature|x-amz-security-token)[\w.-]*["']?)
    (?P<sep>\s*[:=]\s*)
    (?P<value>"[^"]*"|'[^']*'|[^\s,;&'"}\])]+)
    """
)
# AWS access key ids: a 4-letter prefix + 16 upper-case alphanumerics.
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA|ABIA|ACCA)[A-Z0-9]{16}\b")
# Secret access keys: 40 base64 characters standing alone (pure hex strings such as sha1 digests are kept).
_SECRET_KEY = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
# scheme://user:password@host -> scheme://***@host
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


def redact(text: str) -> str:
    """`text` with AWS access key ids, secret-looking keys, secret=value pairs and URL userinfo masked."""
    text = _USERINFO.sub(lambda m: m.group("scheme") + _REDACTED + "@", text)

    def assignment(m: re.Match) -> str:
        value = m.group("value")
        quote = value[0] if value[:1] in ("'", '"') else ""
        return f"{m.group('key')}{m.group('sep')}{quote}{_REDACTED}{quote}"

    text = _SECRET_ASSIGNMENT.sub(assignment, text)
    text = _ACCESS_KEY_ID.sub(_REDACTED, text)
    return _SECRET_KEY.sub(lambda m: m.group(0) if re.fullmatch(r"[0-9a-f]+", m.group(0)) else _REDACTED, text)
