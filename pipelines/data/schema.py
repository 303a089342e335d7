"""The canonical example schema: one Parquet row per example, for every task.

Converters write it, readers normalise foreign formats (OFA TSV, WebDataset) into it, and
`ofa_model.tasks` turns a row (as a plain dict) into model inputs. Field names here are the
contract between the two; a task only reads the fields it needs, the rest are null.
"""

import hashlib
import math
import struct
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

# Bad-row reasons and the image formats the decoder reads have their one home in ofa_model.
from ofa_model.errors import (
    ATTRIBUTES_UNDETERMINED,
    BAD_BASE64,
    BAD_BOX,
    BAD_ENCODING,
    BAD_FORMAT,
    BAD_IMAGE,
    BAD_JSON,
    BAD_TYPE,
    EMPTY_TEXT,
    EXTRA_COLUMN,
    INCONSISTENT_ANSWERS,
    MISSING_ANNOTATION,
    MISSING_COLUMN,
    MISSING_FIELD,
    MISSING_IMAGE,
    MISSING_MEMBER,
    NO_SHAPE,
    UNKNOWN_IMAGE,
    UNKNOWN_LABEL,
    UNPAIRED_LINE,
    UNPARSED_QUESTION,
    UNREADABLE_SHARD,
    UNSUPPORTED_FILE,
)
from ofa_model.preprocess import SUPPORTED_FORMATS

SCHEMA_VERSION = 1

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # stable, unique within a corpus: "<dataset>/<split>/<n>"
        pa.field("task", pa.string(), nullable=False),  # a key of ofa_model.tasks.TASKS
        pa.field("split", pa.string(), nullable=False),  # train / val / test
        pa.field("dataset", pa.string()),  # source dataset, e.g. "easy-vqa", "coco", "glue-sst2"
        pa.field("image", pa.binary()),  # encoded image bytes as stored (JPEG/PNG/...), never decoded pixels
        pa.field("text", pa.string()),  # main source text: question, caption (ITM), expression, hypothesis, sentence1, article
        pa.field("text2", pa.string()),  # second source text: premise, sentence2, candidate answer (QA matching)
        pa.field("target", pa.string()),  # the training target: caption, answer, label word, summary
        pa.field("targets", pa.list_(pa.string())),  # every acceptable target: caption references, VQA answers
        pa.field("target_weights", pa.list_(pa.float32())),  # confidence per entry of `targets` (VQA)
        pa.field("box", pa.list_(pa.float32(), 4)),  # x0, y0, x1, y1 in pixels of the stored image
        pa.field("object_boxes", pa.list_(pa.list_(pa.float32(), 4))),  # detection: one box per object
        pa.field("object_labels", pa.list_(pa.string())),  # detection: one label per object
        pa.field("codes", pa.list_(pa.int32())),  # image-code targets (text-to-image, image infilling)
    ]
)

FIELDS = tuple(SCHEMA.names)


# --- row helpers -----------------------------------------------------------------------------------------
# A "normalised" row has every field of SCHEMA as a key and plain Python values exactly as they read back
# from Parquet: floats rounded to float32, ints checked against int32, images as `bytes`. Writers store
# normalised rows and fingerprints hash them, so a row hashes the same before writing and after reading.

REQUIRED_FIELDS = ("id", "task", "split")
_STRING_FIELDS = ("id", "task", "split", "dataset", "text", "text2", "target")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _float32(x: float) -> float:
    """Round a Python float to the nearest float32 value (what a `pa.float32()` column stores)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _as_list(value: Any) -> Any:
    """Turn numpy arrays and tuples into lists; leave everything else alone."""
    if hasattr(value, "tolist") and not isinstance(value, (bytes, bytearray, memoryview)):
        value = value.tolist()
    return list(value) if isinstance(value, tuple) else value


def _number(value: Any, where: str) -> float:
    value = _as_list(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    try:
        out = _float32(float(value))
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise ValueError(f"{where} must be a finite float32, got {value!r}")
    return out


def _box(value: Any, where: str) -> list[float]:
    """4 finite float32 numbers: what the column can store. Not the geometry (x0 < x1, y0 < y1): a stored row
    with an inverted box is a bad_box row of its task (`ofa_model.preprocess.check_box`), counted, not refused."""
    value = _as_list(value)
    if not isinstance(value, list) or len(value) != 4:
        raise ValueError(f"{where} must be a list of 4 numbers (x0, y0, x1, y1), got {value!r}")
    return [_number(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _list_of(value: Any, where: str, item: Any) -> list:
    value = _as_list(value)
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list, got {type(value).__name__}")
    return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a str, got {type(value).__name__}")
    return value


def _int32(value: Any, where: str) -> int:
    value = _as_list(value)
    if isinstance(value, bool) or not isinstance(value, int) or not _INT32_MIN <= value <= _INT32_MAX:
        raise ValueError(f"{where} must be an int32, got {value!r}")
    return value


def normalize_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Validate `row` against SCHEMA and return it normalised (every field present, float32-rounded floats).

    Raises ValueError naming the row id and the offending field for unknown fields, missing required fields,
    wrong types, boxes that are not 4 finite numbers, and parallel lists of different lengths
    (targets/target_weights, object_boxes/object_labels).
    """
    row_id = row.get("id")
    name = f"row {row_id!r}"
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise ValueError(f"{name}: unknown field(s) {unknown}; schema fields are {list(FIELDS)}")
    out: dict[str, Any] = {}
    for field in FIELDS:
        value = row.get(field)
        where = f"{name}: field {field!r}"
        if value is None:
            if field in REQUIRED_FIELDS:
                raise ValueError(f"{where} is required")
            out[field] = None
        elif field in _STRING_FIELDS:
            out[field] = _string(value, where)
            if field in REQUIRED_FIELDS and not value:
                raise ValueError(f"{where} must be a non-empty string")
        elif field == "image":
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise ValueError(f"{where} must be encoded image bytes, got {type(value).__name__}")
            out[field] = bytes(value)
            if not out[field]:
                raise ValueError(f"{where} is empty (use None for 'no image')")
        elif field in ("targets", "object_labels"):
            out[field] = _list_of(value, where, _string)
        elif field == "target_weights":
            out[field] = _list_of(value, where, _number)
        elif field == "box":
            out[field] = _box(value, where)
        elif field == "object_boxes":
            out[field] = _list_of(value, where, _box)
        elif field == "codes":
            out[field] = _list_of(value, where, _int32)
        else:  # a field added to SCHEMA without a rule here
            raise AssertionError(f"no validation rule for schema field {field!r}")
    for a, b in (("targets", "target_weights"), ("object_boxes", "object_labels")):
        if out[b] is not None and (out[a] is None or len(out[a]) != len(out[b])):
            count = None if out[a] is None else len(out[a])
            raise ValueError(f"{name}: field {b!r} has {len(out[b])} entries but {a!r} has {count}")
    return out


def _encode(h: Any, value: Any) -> None:
    """Feed one value into hash `h` with a type tag and length, so distinct values never collide."""
    if value is None:
        h.update(b"N")
    elif isinstance(value, bytes):
        h.update(b"B%d:" % len(value) + value)
    elif isinstance(value, str):
        data = value.encode("utf-8")
        h.update(b"S%d:" % len(data) + data)
    elif isinstance(value, bool):
        raise TypeError(f"bool is not a schema value: {value!r}")
    elif isinstance(value, int):
        h.update(b"I%d;" % value)
    elif isinstance(value, float):
        h.update(b"F" + struct.pack("<f", value))
    elif isinstance(value, list):
        h.update(b"L%d:" % len(value))
        for v in value:
            _encode(h, v)
    else:
        raise TypeError(f"cannot hash value of type {type(value).__name__}")


def row_digest(row: Mapping[str, Any]) -> str:
    """sha256 hex digest of a normalised row's content (all fields, in SCHEMA order)."""
    h = hashlib.sha256()
    for field in FIELDS:
        h.update(field.encode("ascii") + b"=")
        _encode(h, row[field])
    return h.hexdigest()


# --- bad-row reasons -------------------------------------------------------------------------------------
# Why a source record became a `pipelines.data.readers.rows.BadRow` instead of a row: one code per cause, shared by
# the readers (OFA TSV, WebDataset) and the converters (public layouts); summaries count bad rows by these codes.
# Every code lives in ofa_model.errors. Some mean a little more here: BAD_IMAGE (bytes that are not an image in
# IMAGE_FORMATS), BAD_TYPE (also: a value the schema cannot store, e.g. an unparsable number or > int32),
# EMPTY_TEXT (also: an image without captions), UNKNOWN_LABEL (also: a class or pretraining type outside the
# known set) and MISSING_FIELD (a JSON record without a non-null key it needs).

BAD_REASONS = (
    MISSING_COLUMN, EXTRA_COLUMN, BAD_ENCODING, BAD_BASE64, BAD_IMAGE, MISSING_IMAGE, BAD_TYPE, BAD_FORMAT,
    EMPTY_TEXT, BAD_BOX, UNKNOWN_LABEL, BAD_JSON, MISSING_MEMBER, MISSING_FIELD, UNREADABLE_SHARD, UNKNOWN_IMAGE,
    MISSING_ANNOTATION, UNPAIRED_LINE, UNSUPPORTED_FILE, ATTRIBUTES_UNDETERMINED, INCONSISTENT_ANSWERS,
    UNPARSED_QUESTION, NO_SHAPE,
)  # fmt: skip

# --- images and label words ------------------------------------------------------------------------------

# Image formats a row's `image` may hold: the ones `ofa_model.preprocess.decode_image` decodes (PIL names).
IMAGE_FORMATS = SUPPORTED_FORMATS
# File / WebDataset member extensions (lowercase, no dot) taken as images.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff", "ppm")

# Label as written in the public files -> OFA's answer word (a label of `ofa_model.tasks.TASKS[task]`).
# SNLI-VE and MNLI share the three NLI words.
NLI_LABEL_WORDS = {"entailment": "yes", "neutral": "maybe", "contradiction": "no"}
_BINARY_YES_NO = {"1": "yes", "0": "no"}
_ENTAILMENT_YES_NO = {"entailment": "yes", "not_entailment": "no"}
GLUE_LABEL_WORDS: dict[str, dict[str, str]] = {
    "cola": _BINARY_YES_NO,
    "sst2": {"1": "positive", "0": "negative"},
    "mnli": NLI_LABEL_WORDS,
    "rte": _ENTAILMENT_YES_NO,
    "qnli": _ENTAILMENT_YES_NO,
    "mrpc": _BINARY_YES_NO,
    "qqp": _BINARY_YES_NO,
}
