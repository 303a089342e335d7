"""The project's input errors: one home for every "this input cannot be used" failure and its reason code.

An `InputError` means the input (a data row, a request item, a file a user handed us) is wrong, never that our
code is. Data pipelines count bad rows by `reason`; the predictor answers a bad item with
`{"error": {"type": <class name>, "reason": <code>, "message": <text>}}` (see `error_dict`) and Serve maps it to
a 4xx. Anything that is not an `InputError` is a bug and must propagate: never catch bare ValueError/TypeError
to decide "bad input".

Reason codes are stable, machine-readable strings, and every one lives here: those of the input errors and
the data stage's bad-row reasons for source records (`pipelines.data.schema.BAD_REASONS` lists those). Add new
ones here, never spell them elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections.abc import Mapping, Sequence

# --- reason codes ---------------------------------------------------------------------------------------
# rows and request items
MISSING_FIELD = "missing_field"  # a field the task needs is absent or null
EMPTY_TEXT = "empty_text"  # a required text is blank
BAD_TYPE = "bad_type"  # a value of the wrong type, or out of the range the schema can hold
BAD_BOX = "bad_box"  # a box that is not 4 finite numbers with x0 < x1 and y0 < y1
UNKNOWN_LABEL = "unknown_label"  # a label outside the task's label set
BAD_ROW = "bad_row"  # any other way a row does not fit its task
WRONG_CODE_COUNT = "wrong_code_count"  # image codes that are not the (code_image_size // 8)^2 of the model trained
# images
BAD_IMAGE = "bad_image"  # an image that cannot be used (generic)
EMPTY_IMAGE = "empty_image"  # a zero-byte image payload
NOT_AN_IMAGE = "not_an_image"  # bytes that are not an image in a supported format
TRUNCATED_IMAGE = "truncated_image"  # a recognised image that is cut short or corrupt
IMAGE_TOO_LARGE = "image_too_large"  # payload bytes or header pixels over the configured limits
# source records that could not become canonical rows (the data stage's readers and converters)
MISSING_COLUMN = "missing_column"  # a TSV line with fewer columns than its layout or header
EXTRA_COLUMN = "extra_column"  # a TSV line with more columns than its fixed layout or header (a stray tab?)
BAD_ENCODING = "bad_encoding"  # a line or text member that is not UTF-8
BAD_BASE64 = "bad_base64"  # an image column that is empty or not base64
MISSING_IMAGE = "missing_image"  # the image file (or package image) a record names does not exist
BAD_FORMAT = "bad_format"  # a structured value in the wrong shape (VQA answers, several images in a sample)
BAD_JSON = "bad_json"  # JSON (a line, a .json member) that does not parse, or is not an object
MISSING_MEMBER = "missing_member"  # a WebDataset sample without a member it needs (image, .json, .txt)
UNREADABLE_SHARD = "unreadable_shard"  # a whole input file that cannot be opened or read to the end
UNKNOWN_IMAGE = "unknown_image"  # a record names an image id that the dataset's image list lacks
MISSING_ANNOTATION = "missing_annotation"  # a record whose annotation (answers, box) the annotation file lacks
UNPAIRED_LINE = "unpaired_line"  # a line of one parallel text file without its partner line in the other
UNSUPPORTED_FILE = "unsupported_file"  # a file in an image folder whose extension is not one of the image extensions
ATTRIBUTES_UNDETERMINED = "attributes_undetermined"  # easy-VQA: the questions leave shape or colour open
INCONSISTENT_ANSWERS = "inconsistent_answers"  # easy-VQA: an image's answers contradict each other
UNPARSED_QUESTION = "unparsed_question"  # easy-VQA: a yes/no question with no known statement form
NO_SHAPE = "no_shape"  # easy-VQA: no pixel differs enough from the background to locate the shape
# model files: configs, checkpoints and bundles
BAD_CONFIG = "bad_config"  # a config value of the wrong type, out of range, unknown or missing
BAD_CHECKPOINT = "bad_checkpoint"  # a checkpoint file that cannot be read or does not fit the architecture
UNSAFE_CHECKPOINT = "unsafe_checkpoint"  # a pickle holding objects that only code execution could rebuild
BAD_BUNDLE = "bad_bundle"  # a bundle directory or file that is missing, outside the bundle, not regular or too big
BAD_ANSWER_SET = "bad_answer_set"  # an answer or label file (or a bundle's set) that is not distinct non-empty strings
# requests to the predictor
UNKNOWN_TASK = "unknown_task"  # a task name that is not one of the known tasks
BAD_SETTING = "bad_setting"  # a decoding setting or mode of the wrong type or outside its allowed range
LIMIT_EXCEEDED = "limit_exceeded"  # a request over a configured work limit (items, beam x length, candidates, text)
DUPLICATE_CANDIDATE = "duplicate_candidate"  # a candidate answer listed twice in one input
NO_HYPOTHESIS = "no_hypothesis"  # decoding gave no answer of the task's form (no hypothesis, too few box tokens)
NO_IMAGE_TOKENIZER = "no_image_tokenizer"  # an image-generating task on a model whose bundle carries no image tokenizer


class InputError(ValueError):
    """An input that cannot be used; the message names what and where, `reason` is a stable code."""

    reason: str = BAD_ROW

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


def error_dict(exc: InputError) -> dict[str, dict[str, str]]:
    """The one JSON error shape: `{"error": {"type", "reason", "message"}}`."""
    return {"error": {"type": type(exc).__name__, "reason": exc.reason, "message": str(exc)}}


class ConfigError(InputError):
    """A configuration that cannot be used: a config file of a job, sweep or Serve (the message names the file
    and the dotted key), or a config read from a bundle or a request (the message names the field)."""

    reason = BAD_CONFIG


# --- checks of configs read from untrusted bundles and requests --------------------------------------------
# (job, sweep and Serve configs are pydantic dataclasses, checked by `ofa_model.config_files`)


def check_keys(cls: type, d: object, what: str | None = None) -> None:
    """ConfigError naming every key of mapping `d` that is not a field of dataclass `cls`."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{what or cls.__name__} must be a mapping of keys to values, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(d) - known, key=str)
    if unknown:
        raise ConfigError(f"unknown {what or cls.__name__} keys: {unknown}; known keys: {sorted(known)}")


def check_value(where: str, value: object, kind: type, lo: float | None = None, hi: float | None = None, *,
                low_open: bool = False, reason: str = BAD_CONFIG) -> None:
    """ConfigError (with `reason`) naming `where` unless `value` is of `kind` and, for numbers, finite within
    [lo, hi] ((lo, hi] when `low_open`; infinite bounds for "any finite number"). A bool is never a number; an int is a float."""
    names = {bool: "true or false", int: "an integer", float: "a number"}
    types_ok = {bool: (bool,), int: (int,), float: (int, float)}[kind]
    if not isinstance(value, types_ok) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {names[kind]}, got {type(value).__name__} {reprlib.repr(value)}", reason)
    if kind is bool:
        return
    assert lo is not None and hi is not None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be finite, got {value!r}", reason)
    if not (lo < value if low_open else lo <= value) or not value <= hi:
        bounds = f"({lo}, {hi}]" if low_open else f"[{lo}, {hi}]"
        raise ConfigError(f"{where} must lie in {bounds}, got {value!r}", reason)


def check_choice(where: str, value: object, allowed: Sequence[object], *, reason: str = BAD_CONFIG) -> None:
    """ConfigError (with `reason`) naming `where` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{where} must be one of {list(allowed)}, got {reprlib.repr(value)}", reason)
