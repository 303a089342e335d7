"""Readers for foreign corpus formats that yield canonical rows (`pipelines.data.schema`) or `BadRow` records.

* `read_ofa_tsv`: OFA's TSV files (one example per line, base64 images), column layouts as in OFA's
  README and run scripts.
* `read_webdataset`: WebDataset tar shards (members grouped by key), streamed with `tarfile`.

Both read a file or every matching file under a directory/prefix (`input_files`); `read_ofa_tsv_file` and
`read_webdataset_file` read one of those files alone, with the same row ids, so files can be converted in
parallel (`pipelines.data.raw_convert`).

Broken input never raises: each broken line/sample becomes one `BadRow` and reading goes on; a file that
cannot be opened or read to the end becomes one `BadRow` with reason "unreadable_shard". A location with
no input files at all, or an unknown layout/task, does raise: that is a caller error, not bad data.

Rows are normalised with `pipelines.data.schema.normalize_row` (every field present, float32-rounded floats),
so they hash and compare equal to what a canonical corpus reads back. Text has its whitespace runs
collapsed (`clean_text`) and is otherwise stored as written; prompt-specific cleaning belongs to the task
code. `task` is always a key of `ofa_model.tasks.TASKS`, label targets are words of its `labels`.

`BadRow`, `BadInput`, `make_row`, `image_format`, `clean_text` and `check_box` are shared with
`pipelines.data.converters`; bad-row reasons are the constants of `pipelines.data.schema` (BAD_REASONS).
"""

import base64
import binascii
import io
import json
import logging
import math
import posixpath
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from ofa_model import preprocess
from ofa_model.errors import InputError
from pipelines import storage
from pipelines.data.schema import (
    BAD_BASE64,
    BAD_BOX,
    BAD_ENCODING,
    BAD_FORMAT,
    BAD_IMAGE,
    BAD_JSON,
    BAD_REASONS,
    BAD_TYPE,
    EMPTY_TEXT,
    EXTRA_COLUMN,
    FIELDS,
    GLUE_LABEL_WORDS,
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    MISSING_COLUMN,
    MISSING_FIELD,
    MISSING_MEMBER,
    NLI_LABEL_WORDS,
    UNKNOWN_LABEL,
    UNREADABLE_SHARD,
    normalize_row,
)
from pipelines.storage import S3Options

logger = logging.getLogger(__name__)

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


# --- value parsers (raise BadInput) -----------------------------------------------------------------------


def decode_base64_image(text: str) -> bytes:
    """Image bytes from standard or URL-safe base64 (padding optional); ValueError if not an image."""
    try:
        return _image_b64(text, "image")
    except BadInput as bad:
        raise ValueError(bad.detail) from None


def _image_b64(text: str, name: str) -> bytes:
    text = text.strip()
    if not text:
        raise BadInput(BAD_BASE64, f"{name} column is empty")
    normalised = text.replace("-", "+").replace("_", "/")
    normalised += "=" * (-len(normalised) % 4)
    try:
        data = base64.b64decode(normalised, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(BAD_BASE64, f"{name} column is not base64 ({exc}): {text[:32]!r}...") from None
    if image_format(data) is None:
        raise BadInput(BAD_IMAGE, f"{name} column decodes to {len(data)} bytes that are not an image in "
                       f"{list(IMAGE_FORMATS)}: {data[:8]!r}")
    return data


def _text(value: str, name: str) -> str:
    value = clean_text(value)
    if not value:
        raise BadInput(EMPTY_TEXT, f"{name} is empty")
    return value


def _optional_text(value: str) -> str | None:
    return clean_text(value) or None


def _float(value: str, name: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise BadInput(BAD_TYPE, f"{name} is not a number: {value!r}") from None
    if not math.isfinite(out):
        raise BadInput(BAD_TYPE, f"{name} is not finite: {value!r}")
    return out


def _int(value: str, name: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise BadInput(BAD_TYPE, f"{name} is not an integer: {value!r}") from None


def _box_text(value: str, name: str) -> list[float]:
    return check_box(value.strip().split(","), name)


def _ranked(targets: list[str], weights: list[float]) -> tuple[str, list[str], list[float]]:
    """(argmax-weight target, targets, weights); ties go to the first listed."""
    best = max(range(len(weights)), key=lambda i: (weights[i], -i))
    return targets[best], targets, weights


def _vqa_answers(value: str, name: str) -> tuple[str, list[str], list[float]]:
    """OFA VQA answers "conf|!+answer&&conf|!+answer" -> (best answer, answers, confidences)."""
    targets, weights = [], []
    for item in value.strip().split("&&"):
        conf, sep, answer = item.partition("|!+")
        if not sep:
            raise BadInput(BAD_FORMAT, f"{name} item {item!r} is not 'confidence|!+answer'")
        weights.append(_float(conf, f"{name} confidence"))
        targets.append(_text(answer, f"{name} answer"))
    return _ranked(targets, weights)


# --- OFA TSV ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Line:
    """One parsed TSV line in context: cols (split on tabs), split, dataset, index (0-based non-blank line of
    its file), file (the file's name below the listed directory, without ".tsv"; "" for a lone file)."""

    cols: list[str]
    split: str
    dataset: str
    index: int
    file: str = ""

    def row_id(self, uniq: str | None = None) -> str:
        if uniq is None:
            where = f"{self.file}/{self.index}" if self.file else str(self.index)
            return f"{self.dataset}/{self.split}/{where}"
        return f"{self.dataset}/{self.split}/{_text(uniq, 'uniq-id')}"

    @property
    def needs_target(self) -> bool:
        """Targets are required except on the test split, where sources may come without them."""
        return self.split != "test"


def _row(line: _Line, row_id: str, task: str, **fields: Any) -> dict[str, Any]:
    return {"id": row_id, "task": task, "split": line.split, "dataset": line.dataset, **fields}


def _caption_targets(value: str, line: _Line) -> dict[str, Any]:
    refs = [clean_text(r) for r in value.split("&&") if r.strip()]
    if not refs:
        if line.needs_target:
            raise BadInput(EMPTY_TEXT, "caption is empty")
        return {}
    return {"target": refs[0], "targets": refs}


def _answers_or_none(value: str, line: _Line) -> dict[str, Any]:
    if not value.strip():
        if line.needs_target:
            raise BadInput(EMPTY_TEXT, "answers column is empty")
        return {}
    target, targets, weights = _vqa_answers(value, "answers")
    return {"target": target, "targets": targets, "target_weights": weights}


def _parse_caption(line: _Line) -> dict[str, Any]:
    # uniq-id, image-id, caption ("&&"-joined references in val/test), VinVL objects (unused), image
    uniq, _image_id, caption, _objects, image = line.cols
    row_id = line.row_id(uniq)
    return _row(line, row_id, "caption", image=_image_b64(image, "image"), **_caption_targets(caption, line))


def _parse_vqa(line: _Line) -> dict[str, Any]:
    # question-id, image-id, question, "conf|!+answer&&...", VinVL objects (unused), image
    qid, _image_id, question, answers, _objects, image = line.cols
    row_id = line.row_id(qid)
    return _row(
        line, row_id, "vqa", image=_image_b64(image, "image"), text=_text(question, "question"),
        **_answers_or_none(answers, line),
    )  # fmt: skip


def _parse_refcoco(line: _Line) -> dict[str, Any]:
    # uniq-id, image-id, referring expression, "x0,y0,x1,y1", image
    uniq, _image_id, text, box, image = line.cols
    row_id = line.row_id(uniq)
    return _row(
        line, row_id, "grounding", image=_image_b64(image, "image"), text=_text(text, "expression"),
        box=_box_text(box, "box"),
    )  # fmt: skip


def _label(value: str, labels: Mapping[str, str], line: _Line) -> dict[str, Any]:
    value = value.strip()
    if not value and not line.needs_target:
        return {}
    if value not in labels:
        raise BadInput(UNKNOWN_LABEL, f"label {value!r} is not one of {sorted(labels)}")
    return {"target": labels[value]}


def _parse_snli_ve(line: _Line) -> dict[str, Any]:
    # uniq-id, image-id, image, hypothesis, premise (caption), label; target is OFA's answer word
    uniq, _image_id, image, hypothesis, premise, label = line.cols
    row_id = line.row_id(uniq)
    return _row(
        line, row_id, "visual_entailment", image=_image_b64(image, "image"), text=_text(hypothesis, "hypothesis"),
        text2=_optional_text(premise), **_label(label, NLI_LABEL_WORDS, line),
    )  # fmt: skip


def _parse_imagenet(line: _Line) -> dict[str, Any]:
    # image, label index (1-based), synset words; target is the synset words
    image, label, words = line.cols
    if _int(label, "label index") < 1:
        raise BadInput(BAD_TYPE, f"label index must be >= 1 (1-based), got {label!r}")
    return _row(
        line, line.row_id(), "image_classification", image=_image_b64(image, "image"), target=_text(words, "synset words")
    )


def _parse_gigaword(line: _Line) -> dict[str, Any]:
    # article, summary
    source, target = line.cols
    summary = _text(target, "summary") if line.needs_target else _optional_text(target)
    return _row(line, line.row_id(), "summarization", text=_text(source, "article"), target=summary)


def _parse_text_to_image(line: _Line) -> dict[str, Any]:
    # uniq-id, image codes (space-separated ints), caption
    uniq, codes, caption = line.cols
    row_id = line.row_id(uniq)
    parsed = [_int(c, "image code") for c in codes.split()]
    if not parsed or min(parsed) < 0:
        raise BadInput(BAD_TYPE, f"image codes must be non-negative integers, got {codes[:40]!r}")
    return _row(line, row_id, "text_to_image", text=_text(caption, "caption"), codes=parsed)


_PRETRAIN_TASKS = {"caption": "caption", "qa": "vqa", "visual_grounding": "grounding"}


def _parse_pretrain_vl(line: _Line) -> dict[str, Any]:
    # uniq-id, image, caption, question, refs, gt objects (unused), dataset name, type
    # (the dataset name column is applied by the reading loop, see _Layout.dataset_column)
    uniq, image, caption, question, refs, _objects, _name, kind = line.cols
    kind = kind.strip()
    if kind not in _PRETRAIN_TASKS:
        raise BadInput(UNKNOWN_LABEL, f"pretraining type {kind!r} is not one of {sorted(_PRETRAIN_TASKS)}")
    row_id = line.row_id(uniq)
    task = _PRETRAIN_TASKS[kind]
    fields: dict[str, Any] = {"image": _image_b64(image, "image")}
    if kind == "caption":
        fields.update(_caption_targets(caption, line))
    elif kind == "qa":
        fields.update(text=_text(question, "question"), **_answers_or_none(refs, line))
    else:
        fields.update(text=_text(caption, "region text"), box=_box_text(refs, "box"))
    return _row(line, row_id, task, **fields)


# GLUE: (text column, text2 column or None, label column) per task. Labels: the public GLUE labels
# (schema.GLUE_LABEL_WORDS) plus the numeric codes OFA's own TSVs use where they differ from GLUE's.
_OFA_GLUE_CODES = {"mnli": {"0": "maybe", "1": "yes", "2": "no"}, "qnli": {"0": "no", "1": "yes"}}
_GLUE_COLUMNS = {
    "cola": (1, None, 2),
    "sst2": (0, None, 1),
    "mnli": (0, 1, 2),
    "mrpc": (0, 1, 2),
    "qqp": (3, 4, 5),
    "qnli": (1, 2, 3),
    "rte": (1, 2, 3),
}


def glue_label_words(name: str) -> dict[str, str]:
    """Label as written in OFA's GLUE TSV for task `name` (e.g. "mnli") -> OFA's answer word."""
    return {**GLUE_LABEL_WORDS[name], **_OFA_GLUE_CODES.get(name, {})}


def _glue_parser(name: str) -> Callable[[_Line], dict[str, Any]]:
    text_col, text2_col, label_col = _GLUE_COLUMNS[name]
    labels = glue_label_words(name)
    task = f"glue_{name}"

    def parse(line: _Line) -> dict[str, Any]:
        cols = line.cols
        return _row(
            line, line.row_id(), task, text=_text(cols[text_col], "sentence"),
            text2=None if text2_col is None else _text(cols[text2_col], "second sentence"),
            **_label(cols[label_col], labels, line),
        )  # fmt: skip

    return parse


@dataclass(frozen=True)
class _Layout:
    columns: int  # columns the layout reads
    exact: bool  # True: a line must have exactly `columns` columns; False: at least (GLUE files vary)
    has_id: bool  # column 0 is a unique id
    parse: Callable[[_Line], dict[str, Any]]
    dataset_column: int | None = None  # a per-row dataset name, used when the caller gives no dataset


_LAYOUTS: dict[str, _Layout] = {
    "caption": _Layout(5, True, True, _parse_caption),
    "vqa": _Layout(6, True, True, _parse_vqa),
    "refcoco": _Layout(5, True, True, _parse_refcoco),
    "snli_ve": _Layout(6, True, True, _parse_snli_ve),
    "imagenet": _Layout(3, True, False, _parse_imagenet),
    "gigaword": _Layout(2, True, False, _parse_gigaword),
    "pretrain_vl": _Layout(8, True, True, _parse_pretrain_vl, dataset_column=6),
    "text_to_image": _Layout(3, True, True, _parse_text_to_image),
    **{f"glue_{name}": _Layout(max(c for c in cols if c is not None) + 1, False, False, _glue_parser(name))
       for name, cols in _GLUE_COLUMNS.items()},
}  # fmt: skip
LAYOUTS = tuple(sorted(_LAYOUTS))
# The one task of each layout's rows (pretrain_vl rows carry several: caption, vqa, grounding).
_LAYOUT_TASKS = {
    "caption": "caption", "vqa": "vqa", "refcoco": "grounding", "snli_ve": "visual_entailment",
    "imagenet": "image_classification", "gigaword": "summarization", "text_to_image": "text_to_image",
    **{f"glue_{name}": f"glue_{name}" for name in _GLUE_COLUMNS},
}  # fmt: skip
_DEFAULT_DATASETS = {
    layout: layout.replace("glue_", "glue-") if layout.startswith("glue_") else "ofa-" + layout.replace("_", "-")
    for layout in _LAYOUTS
}


TSV_SUFFIXES = (".tsv",)
WDS_SUFFIXES = (".tar", ".tar.gz", ".tgz")


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


def _read_lines(file_uri: str, s3: S3Options | None, chunk_bytes: int = 1 << 20) -> Iterator[tuple[int, bytes] | BadRow]:
    """(1-based line number, line without its newline) for every line; a BadRow if reading fails."""
    try:
        fs, path = storage.resolve(file_uri, s3)
        with fs.open_input_stream(path) as stream:
            pending: list[bytes] = []
            line_no = 0
            while chunk := stream.read(chunk_bytes):
                *complete, rest = chunk.split(b"\n")
                for part in complete:
                    pending.append(part)
                    line_no += 1
                    yield line_no, b"".join(pending)
                    pending = []
                pending.append(rest)
            if any(pending):
                yield line_no + 1, b"".join(pending)
    except OSError as exc:
        yield BadRow(None, UNREADABLE_SHARD, storage.redact(str(exc)), file_uri)


def read_ofa_tsv(
    uri: str, layout: str, *, split: str, s3: S3Options | None = None, dataset: str | None = None
) -> Iterator[dict | BadRow]:
    """Canonical rows (or BadRows) from an OFA TSV file, or from every *.tsv file under a directory/prefix.

    layout: one of LAYOUTS ("caption", "vqa", "refcoco", "snli_ve", "imagenet", "gigaword",
    "glue_{cola,sst2,mnli,rte,mrpc,qqp,qnli}", "pretrain_vl", "text_to_image"), with OFA's column orders.
    Row ids are "<dataset>/<split>/<uniq-id>" for layouts with an id column. Layouts without one number
    the non-blank lines of each file from 0: "<dataset>/<split>/<n>" when `uri` names the file,
    "<dataset>/<split>/<name>/<n>" for the files under a directory, name being the file's path below it
    without ".tsv" (so a file's ids do not depend on the other files; see `read_ofa_tsv_file`).
    dataset: defaults to "ofa-<layout>" ("glue-<task>" for GLUE); for pretrain_vl the per-row dataset
    column wins over the default. Targets (answers, captions, labels) may be empty only on split "test".
    Tasks (keys of `ofa_model.tasks.TASKS`): caption, vqa, grounding (refcoco), visual_entailment (snli_ve),
    image_classification (imagenet), summarization (gigaword), glue_<name> (glue_<name>), text_to_image;
    pretrain_vl rows map type caption/qa/visual_grounding to caption/vqa/grounding. Label words are those
    of the task's TaskSpec.labels.
    """
    check_tsv_options(layout, split)
    for file in input_files(uri, TSV_SUFFIXES, s3):
        yield from read_ofa_tsv_file(file, layout, split=split, s3=s3, dataset=dataset)


def check_tsv_options(layout: str, split: str) -> None:
    """ValueError for an unknown layout or an empty split."""
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown OFA TSV layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if not split:
        raise ValueError("split must be a non-empty string")


def layout_task(layout: str) -> str | None:
    """The task every row of `layout` has (None for pretrain_vl, whose rows have several)."""
    check_tsv_options(layout, "x")
    return _LAYOUT_TASKS.get(layout)


def read_ofa_tsv_file(
    file: InputFile, layout: str, *, split: str, s3: S3Options | None = None, dataset: str | None = None
) -> Iterator[dict | BadRow]:
    """The rows (or BadRows) of one TSV file of `input_files` (see `read_ofa_tsv` for layouts and ids)."""
    check_tsv_options(layout, split)
    spec = _LAYOUTS[layout]
    dataset_given = dataset is not None
    dataset = dataset or _DEFAULT_DATASETS[layout]
    stem = file.name[: -len(".tsv")] if file.name.endswith(".tsv") else file.name
    index = 0
    for item in _read_lines(file.uri, s3):
        if isinstance(item, BadRow):
            yield item
            continue
        line_no, raw = item
        if not raw.rstrip(b"\r"):
            continue
        source = f"{file.uri}:{line_no}"
        line_index, index = index, index + 1
        context = _Line([], split, dataset, line_index, stem)
        yield _parse_tsv_line(raw, spec, context, dataset_given, source)


def _parse_tsv_line(raw: bytes, spec: _Layout, context: _Line, dataset_given: bool, source: str) -> dict | BadRow:
    """One TSV line -> normalised row, or BadRow. `context` carries split/dataset/index (its cols are unused)."""
    row_id = None if spec.has_id else context.row_id()
    try:
        try:
            text = raw.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput(BAD_ENCODING, f"line is not UTF-8: {exc}") from None
        cols = text.split("\t")
        dataset = context.dataset
        col = spec.dataset_column
        if col is not None and not dataset_given and len(cols) > col and cols[col].strip():
            dataset = cols[col].strip()
        line = _Line(cols, context.split, dataset, context.index, context.file)
        row_id = _guess_id(line, spec)
        if len(cols) < spec.columns:
            raise BadInput(MISSING_COLUMN, f"{len(cols)} columns, layout needs {spec.columns}")
        if spec.exact and len(cols) > spec.columns:
            raise BadInput(EXTRA_COLUMN, f"{len(cols)} columns, layout has {spec.columns}")
        return make_row(source, **spec.parse(line))
    except BadInput as bad:
        return bad.bad_row(row_id, source)


def _guess_id(line: _Line, spec: _Layout) -> str | None:
    """The id a line would get, for BadRow reports (None where the id itself is broken)."""
    if not spec.has_id:
        return line.row_id()
    uniq = line.cols[0].strip()
    return f"{line.dataset}/{line.split}/{uniq}" if uniq else None


# --- WebDataset -------------------------------------------------------------------------------------------

# Where each role comes from, per task: a member extension ("txt") or a field of the .json member
# ("json:question"); the first candidate present wins. `key_map` replaces candidates role by role.
_WDS_SOURCES: dict[str, dict[str, tuple[str, ...]]] = {
    "caption": {"target": ("txt", "json:caption"), "targets": ("json:captions",)},
    "vqa": {"text": ("json:question",), "answers": ("json:answers", "json:answer")},
    "grounding": {"text": ("json:text", "txt"), "box": ("json:box",)},
}
WDS_TASKS = tuple(_WDS_SOURCES)


def _member_key(name: str) -> tuple[str, str]:
    """'dir/abc.seg.png' -> ('dir/abc', 'seg.png'): key = dirname + basename up to the first dot."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(dirname, stem), ext.lower()


def _iter_samples(file_uri: str, s3: S3Options | None) -> Iterator[tuple[str, dict[str, bytes]] | BadRow]:
    """(key, {extension: bytes}) per sample, in tar order; consecutive members with one key form a sample."""
    try:
        fs, path = storage.resolve(file_uri, s3)
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile() or posixpath.basename(info.name).startswith("."):
                    continue
                member_key, ext = _member_key(info.name)
                if member_key != key:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                handle = tar.extractfile(info)
                members[ext] = handle.read() if handle is not None else b""
            if key is not None:
                yield key, members
    except (OSError, tarfile.TarError, EOFError) as exc:
        yield BadRow(None, UNREADABLE_SHARD, storage.redact(f"{type(exc).__name__}: {exc}"), file_uri)


def _lookup(members: dict[str, bytes], doc: dict | None, candidates: Sequence[str]) -> Any:
    """The first candidate present: decoded text of a member, or a .json field; None if none is."""
    for cand in candidates:
        if cand.startswith("json:"):
            if doc is not None and doc.get(cand[5:]) is not None:
                return doc[cand[5:]]
        elif cand in members:
            try:
                return members[cand].decode("utf-8")
            except UnicodeDecodeError:
                raise BadInput(BAD_ENCODING, f".{cand} member is not UTF-8") from None
    return None


def _wds_answers(value: Any) -> tuple[str, list[str], list[float]]:
    """VQA answers from a str, a list of str (weight = share of votes), a list of {"answer", "weight"|
    "confidence"} objects or an {answer: weight} object."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        pairs = [(a, value.count(a) / len(value)) for a in dict.fromkeys(value)]
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        pairs = [(v.get("answer"), v.get("weight", v.get("confidence", 1.0))) for v in value]
    else:
        raise BadInput(BAD_FORMAT, f"answers must be a string, a list or an object, got {value!r}")
    if not pairs:
        raise BadInput(BAD_FORMAT, "answers object is empty")
    targets, weights = [], []
    for answer, weight in pairs:
        if not isinstance(answer, str) or not answer.strip():
            raise BadInput(EMPTY_TEXT, f"answer {answer!r} is empty or not a string")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise BadInput(BAD_TYPE, f"weight of answer {answer!r} is not a finite number: {weight!r}")
        targets.append(clean_text(answer))
        weights.append(float(weight))
    return _ranked(targets, weights)


def _wds_row(
    key: str, members: dict[str, bytes], task: str, split: str, dataset: str, sources: dict[str, tuple[str, ...]]
) -> dict[str, Any]:
    images = [ext for ext in IMAGE_EXTENSIONS if ext in members]
    if not images:
        raise BadInput(MISSING_MEMBER, f"no image member (.{'/.'.join(IMAGE_EXTENSIONS)}); members: {sorted(members)}")
    if len(images) > 1:
        raise BadInput(BAD_FORMAT, f"several image members: {images}")
    image = members[images[0]]
    if image_format(image) is None:
        raise BadInput(BAD_IMAGE, f".{images[0]} member is not an image: {image[:8]!r}")
    doc = None
    if any(c.startswith("json:") for cands in sources.values() for c in cands):
        if "json" in members:
            try:
                doc = json.loads(members["json"])
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BadInput(BAD_JSON, f".json member does not parse: {exc}") from None
            if not isinstance(doc, dict):
                raise BadInput(BAD_JSON, f".json member is a {type(doc).__name__}, not an object")

    def need(role: str) -> Any:
        value = _lookup(members, doc, sources[role])
        if value is None:
            reason = MISSING_FIELD if doc is not None else MISSING_MEMBER
            raise BadInput(reason, f"no {role} (looked for {list(sources[role])}); members: {sorted(members)}")
        return value

    def text(role: str) -> str:
        value = need(role)
        if not isinstance(value, str):
            raise BadInput(BAD_FORMAT, f"{role} must be a string, got {value!r}")
        return _text(value, role)

    row: dict[str, Any] = {"id": f"{dataset}/{split}/{key}", "task": task, "split": split, "dataset": dataset}
    row["image"] = image
    if task == "caption":
        targets = _lookup(members, doc, sources["targets"])
        if targets is not None:
            if not isinstance(targets, list) or not all(isinstance(t, str) and t.strip() for t in targets):
                raise BadInput(BAD_FORMAT, f"targets must be a list of non-empty strings, got {targets!r}")
            targets = [clean_text(t) for t in targets]
        if _lookup(members, doc, sources["target"]) is not None or (not targets and split != "test"):
            row["target"] = text("target")
            row["targets"] = targets or [row["target"]]
        elif targets:
            row["target"], row["targets"] = targets[0], targets
    elif task == "vqa":
        row["text"] = text("text")
        answers = _lookup(members, doc, sources["answers"])
        if answers is not None or split != "test":
            row["target"], row["targets"], row["target_weights"] = _wds_answers(need("answers"))
    else:  # grounding
        row["text"] = text("text")
        box = need("box")
        if not isinstance(box, list):
            raise BadInput(BAD_BOX, f"box must be a list [x0, y0, x1, y1], got {box!r}")
        if any(isinstance(v, (bool, str)) for v in box):
            raise BadInput(BAD_BOX, f"box has a value that is not a number: {box!r}")
        row["box"] = check_box(box, "box")
    return row


def read_webdataset(
    uri: str,
    *,
    task: str,
    split: str,
    s3: S3Options | None = None,
    key_map: Mapping[str, str | Sequence[str]] | None = None,
    dataset: str | None = None,
) -> Iterator[dict | BadRow]:
    """Canonical rows (or BadRows) from a WebDataset tar, or from every .tar/.tar.gz/.tgz under a directory.

    Members are grouped by key (directory + basename up to the first dot); the image comes from the one
    .jpg/.jpeg/.png/.webp member. Per task, where the other fields come from (override any with `key_map`,
    role -> a member extension like "txt" or "json:<field>", or a list of them tried in order):
      caption:   target <- .txt or json "caption"; targets <- json "captions" (else [target])
      vqa:       text <- json "question"; answers <- json "answers" (str, list of str, list of
                 {"answer", "weight"/"confidence"}, or {answer: weight}) or json "answer"
      grounding: text <- json "text" or .txt; box <- json "box" = [x0, y0, x1, y1] in pixels
    Row ids are "<dataset>/<split>/<key>", dataset defaulting to "webdataset". Targets may be missing
    only on split "test".
    """
    webdataset_sources(task, split, key_map)  # bad options fail before any file is listed
    for file in input_files(uri, WDS_SUFFIXES, s3):
        yield from read_webdataset_file(file, task=task, split=split, s3=s3, key_map=key_map, dataset=dataset)


def webdataset_sources(
    task: str, split: str, key_map: Mapping[str, str | Sequence[str]] | None = None
) -> dict[str, tuple[str, ...]]:
    """Where each role of `task` comes from, `key_map` applied; ValueError for a bad task, split or role."""
    if task not in _WDS_SOURCES:
        raise ValueError(f"unsupported WebDataset task {task!r}; supported: {', '.join(WDS_TASKS)}")
    if not split:
        raise ValueError("split must be a non-empty string")
    sources = dict(_WDS_SOURCES[task])
    for role, cands in (key_map or {}).items():
        if role not in sources:
            raise ValueError(f"key_map role {role!r} is not used by task {task!r}; roles: {sorted(sources)}")
        sources[role] = (cands,) if isinstance(cands, str) else tuple(cands)
    return sources


def read_webdataset_file(
    file: InputFile,
    *,
    task: str,
    split: str,
    s3: S3Options | None = None,
    key_map: Mapping[str, str | Sequence[str]] | None = None,
    dataset: str | None = None,
) -> Iterator[dict | BadRow]:
    """The rows (or BadRows) of one tar of `input_files` (see `read_webdataset`)."""
    sources = webdataset_sources(task, split, key_map)
    yield from _read_tar(file.uri, task, split, s3, sources, dataset or "webdataset")


def _read_tar(
    file_uri: str, task: str, split: str, s3: S3Options | None, sources: dict[str, tuple[str, ...]], dataset: str
) -> Iterator[dict | BadRow]:
    for item in _iter_samples(file_uri, s3):
        if isinstance(item, BadRow):
            yield item
            continue
        key, members = item
        row_id = f"{dataset}/{split}/{key}"
        source = f"{file_uri}:{key}"
        try:
            yield make_row(source, **_wds_row(key, members, task, split, dataset, sources))
        except BadInput as bad:
            yield bad.bad_row(row_id, source)
