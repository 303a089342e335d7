"""Bad rows and the pieces shared by the readers and `pipelines.data.converters`: `BadRow`, `BadInput`,
`make_row` (a normalised canonical row, or a BadRow "bad_type"), `image_format`, `clean_text`, `check_box`,
and the value parsers of text columns (raise BadInput).

Bad-row reasons are the constants of `ofa_model.errors` (`pipelines.data.schema.BAD_REASONS`).
"""

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from ofa_model import preprocess
from ofa_model.errors import (
    BAD_BASE64,
    BAD_BOX,
    BAD_ENCODING,
    BAD_FORMAT,
    BAD_IMAGE,
    BAD_JSON,
    BAD_TYPE,
    EMPTY_TEXT,
    EXTRA_COLUMN,
    MISSING_COLUMN,
    MISSING_FIELD,
    MISSING_MEMBER,
    UNKNOWN_LABEL,
    UNREADABLE_SHARD,
    InputError,
)
from pipelines.data.schema import BAD_REASONS, FIELDS, IMAGE_FORMATS, normalize_row

# --- bad rows and the pieces shared with the converters -------------------------------------------------

# Reasons the readers give (a subset of schema.BAD_REASONS).
READER_REASONS = frozenset(
    {
        MISSING_COLUMN, EXTRA_COLUMN, BAD_ENCODING, BAD_BASE64, BAD_IMAGE, BAD_TYPE, BAD_FORMAT, EMPTY_TEXT,
        BAD_BOX, UNKNOWN_LABEL, BAD_JSON, MISSING_MEMBER, MISSING_FIELD, UNREADABLE_SHARD,
    }
)  # fmt: skip


def _check_reason(reason: str) -> None:
    if reason not in BAD_REASONS:
        raise ValueError(f"bad-row reason {reason!r} is not one of pipelines.data.schema.BAD_REASONS {list(BAD_REASONS)}")


@dataclass(frozen=True)
class BadRow:
    """One input record (or whole file) that could not become a canonical row.

    id: the row id it would have had, when known. reason: one of `pipelines.data.schema.BAD_REASONS`.
    detail: human-readable, credential-free. source: "<file uri>:<line>" for a TSV line, "<tar uri>:<key>"
    for a WebDataset sample, the file URI for a whole file (converters: their own "<path>: <where>").
    """

    id: str | None
    reason: str
    detail: str
    source: str

    def __post_init__(self) -> None:
        _check_reason(self.reason)


class BadInput(Exception):
    """A value that cannot go into a row; `reason` (one of BAD_REASONS) and `detail` become a BadRow."""

    def __init__(self, reason: str, detail: str) -> None:
        _check_reason(reason)
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def bad_row(self, row_id: str | None, source: str) -> BadRow:
        return BadRow(row_id, self.reason, self.detail, source)


def make_row(source: str, **fields: Any) -> dict[str, Any] | BadRow:
    """The normalised canonical row of `fields` (`schema.normalize_row`: every field present, floats rounded
    to float32), or a BadRow "bad_type" naming `source` when a value does not fit the schema.
    Unknown field names are a programming error (KeyError), not bad data."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise KeyError(f"not canonical schema fields: {sorted(unknown)}; the schema has {FIELDS}")
    try:
        return normalize_row(fields)
    except ValueError as exc:
        return BadRow(fields.get("id"), BAD_TYPE, str(exc), source)


def image_format(data: bytes) -> str | None:
    """The format (one of schema.IMAGE_FORMATS) of encoded image bytes, read from the header only; None when
    they are not an image in one of those formats (or the header is cut short)."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            return im.format
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError):
        return None


def clean_text(value: str) -> str:
    """`value` with whitespace runs collapsed to one space and no surrounding whitespace."""
    return " ".join(value.split())


def check_box(values: Sequence[Any], name: str) -> list[float]:
    """[x0, y0, x1, y1] as floats: 4 finite numbers with x0 < x1 and y0 < y1 (what the grounding task needs);
    BadInput "bad_box" otherwise."""
    try:
        return list(preprocess.check_box(values, name))  # the one box check, shared with the tasks
    except InputError as e:
        raise BadInput(BAD_BOX, str(e)) from None


def required_text(value: str, name: str) -> str:
    """`value` cleaned (`clean_text`); BadInput "empty_text" naming `name` when nothing is left."""
    value = clean_text(value)
    if not value:
        raise BadInput(EMPTY_TEXT, f"{name} is empty")
    return value


def ranked_targets(targets: list[str], weights: list[float]) -> tuple[str, list[str], list[float]]:
    """(argmax-weight target, targets, weights); ties go to the first listed."""
    best = max(range(len(weights)), key=lambda i: (weights[i], -i))
    return targets[best], targets, weights
