"""The input files of a reader: a file, or every file with a given suffix under a directory or prefix
(local, file:// or s3://), each with a name that row ids are built from."""

import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipelines import storage
from pipelines.storage import S3Options


@dataclass(frozen=True)
class InputFile:
    """One input file: its URI and `name`, its path relative to the directory/prefix that was listed
    ("" when the input named the file itself). Row ids built from `name` do not depend on how the URI
    is written (relative or absolute path, file:// or not) nor on which process reads the file."""

    uri: str
    name: str


def input_files(uri: str, suffixes: tuple[str, ...], s3: S3Options | None = None) -> list[InputFile]:
    """[uri] if it is a file, else the files under it ending in one of `suffixes`, sorted by URI;
    FileNotFoundError if there are none."""
    fs, root = storage.resolve(uri, s3)
    try:
        is_file = fs.get_file_info(root).type == pafs.FileType.File
    except OSError as exc:
        raise OSError(f"cannot stat {storage.redact(uri)}: {storage.redact(str(exc))}") from exc
    if is_file:
        return [InputFile(uri, "")]
    try:
        files = [f for f in storage.list_files(uri, s3=s3) if f.endswith(suffixes)]
    except FileNotFoundError:
        files = []
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files under {storage.redact(uri)}")
    prefix = root.rstrip("/") + "/"
    out = []
    for f in files:
        path = storage.resolve(f, s3)[1]
        out.append(InputFile(f, path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)))
    return out
