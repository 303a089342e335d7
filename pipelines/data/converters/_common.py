"""Pieces shared by the converters: split selection, file access, image reading, record fields.

Every converter is a generator of canonical rows (`pipelines.data.readers.rows.make_row`: normalised dicts keyed
by `pipelines.data.schema.FIELDS`) and `BadRow` records for broken input, with reasons from
`pipelines.data.schema.BAD_REASONS`; nothing here holds state between calls. Row construction, image
checks, text cleaning and box checks are the readers' (`pipelines.data.readers.rows`), imported from there.
"""

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ofa_model.errors import BAD_IMAGE, BAD_TYPE, EMPTY_TEXT, MISSING_FIELD, MISSING_IMAGE
from pipelines import storage
from pipelines.data.readers.rows import BadInput, BadRow, clean_text, image_format
from pipelines.data.schema import IMAGE_FORMATS


def select_splits(available: Sequence[str], requested: Iterable[str] | None, source: str) -> list[str]:
    """The requested splits in the order given (all available ones when None); unknown ones are errors."""
    if requested is None:
        return list(available)
    chosen = list(requested)
    missing = [s for s in chosen if s not in available]
    if missing:
        raise ValueError(f"{source}: split(s) {missing} not available; this input has {list(available)}")
    return chosen


def check_limit(limit: int | None) -> None:
    """Reject a limit below 1 (None means no limit)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")


def per_split(value: str | Mapping[str, str], split: str, what: str) -> str:
    """`value` itself when it is one string, else its entry for `split` (missing entry: an error)."""
    if isinstance(value, str):
        return value
    if split not in value:
        raise ValueError(f"no {what} given for split {split!r} (have {sorted(value)})")
    return value[split]


def load_json(path: str | Path, what: str) -> Any:
    """A whole JSON file; a file that does not parse is fatal for the converter (nothing to continue with)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from e


class FileRoot:
    """Read-only access to files below a local directory, file:// URI or s3://bucket/prefix.

    S3 endpoint, region and credentials come from the AWS environment (see `pipelines.storage`).
    """

    def __init__(self, root: str | Path):
        self.root = str(root)
        self.fs, base = storage.resolve(self.root)
        self.base = base.rstrip("/")

    def path(self, name: str) -> str:
        """The full filesystem path of `name` (relative to the root)."""
        return f"{self.base}/{name}" if name else self.base

    def read(self, name: str) -> bytes:
        """The bytes of file `name`; FileNotFoundError when it does not exist."""
        path = self.path(name)
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except OSError:
            if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise FileNotFoundError(path) from None
            raise

    def listdir(self, name: str = "") -> list[tuple[str, bool]]:
        """(entry name, is a directory) for the entries of directory `name`, sorted by name."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(name), recursive=False))
        return sorted((info.base_name, info.type == pafs.FileType.Directory) for info in infos)

    def is_dir(self, name: str = "") -> bool:
        """Whether `name` is an existing directory."""
        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.Directory


def read_image(root: FileRoot, name: str, row_id: str, source: str) -> bytes | BadRow:
    """The encoded bytes of image `name` below `root`, or a BadRow (missing_image / bad_image) for `row_id`."""
    try:
        data = root.read(name)
    except FileNotFoundError:
        return BadRow(id=row_id, reason=MISSING_IMAGE, detail=f"no image file {root.path(name)}", source=source)
    if image_format(data) is None:
        return BadRow(
            id=row_id, reason=BAD_IMAGE, detail=f"{root.path(name)} is not an image in {list(IMAGE_FORMATS)}",
            source=source,
        )
    return data


class LastImage:
    """Reads images through `read_image`, reusing the previous result when the same name comes again.

    Questions and captions come grouped by image, so one entry is enough to read each image once.
    """

    def __init__(self, root: FileRoot):
        self.root = root
        self._name: str | None = None
        self._value: bytes | BadRow | None = None

    def read(self, name: str, row_id: str, source: str) -> bytes | BadRow:
        """Like `read_image`; a BadRow is re-issued with this row's id."""
        if name != self._name:
            self._name, self._value = name, read_image(self.root, name, row_id, source)
        value = self._value
        if isinstance(value, BadRow):
            return BadRow(id=row_id, reason=value.reason, detail=value.detail, source=source)
        assert value is not None
        return value


def text_or_none(value: Any) -> str | None:
    """`value` with whitespace runs collapsed, or None when it is missing, not a string or empty."""
    if not isinstance(value, str):
        return None
    return clean_text(value) or None


def record_text(record: Mapping[str, Any], key: str) -> str:
    """The cleaned text of `record[key]`; BadInput missing_field when the key is absent or null, bad_type
    when the value is not a string, empty_text when it is blank."""
    value = record.get(key)
    if value is None:
        raise BadInput(MISSING_FIELD, f"record has no {key!r}")
    if not isinstance(value, str):
        raise BadInput(BAD_TYPE, f"{key!r} must be a string, got {type(value).__name__}")
    text = clean_text(value)
    if not text:
        raise BadInput(EMPTY_TEXT, f"{key!r} is blank")
    return text


def take(items: Iterable[Any], limit: int | None) -> Iterator[Any]:
    """The first `limit` items (all when limit is None)."""
    for n, item in enumerate(items):
        if limit is not None and n >= limit:
            return
        yield item
