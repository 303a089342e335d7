"""OFA's TSV files (one example per line, base64 images), column layouts as in OFA's README and run scripts.

`read_ofa_tsv_file` reads one file of `input_files(uri, TSV_SUFFIXES)` (a file, or every .tsv file under a
directory/prefix); its row ids do not depend on the other files. A broken line becomes one `BadRow`; a file
that cannot be read to the end, one BadRow "unreadable_shard".
"""

import base64
import binascii
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ofa_model.errors import (
    BAD_BASE64,
    BAD_ENCODING,
    BAD_FORMAT,
    BAD_IMAGE,
    BAD_TYPE,
    EMPTY_TEXT,
    EXTRA_COLUMN,
    MISSING_COLUMN,
    UNKNOWN_LABEL,
    UNREADABLE_SHARD,
)
from ofa_model.tasks import INFILL_CODES
from ofa_model.vocab import NUM_CODES
from pipelines import storage
from pipelines.data.readers.files import InputFile
from pipelines.data.readers.rows import (
    BadInput,
    BadRow,
    check_box,
    clean_text,
    image_format,
    make_row,
    ranked_targets,
    required_text,
)
from pipelines.data.schema import GLUE_LABEL_WORDS, IMAGE_FORMATS, NLI_LABEL_WORDS
from pipelines.storage import S3Options

# --- column parsers (raise BadInput) -----------------------------------------------------------------------


def image_from_base64(text: str, name: str = "image") -> bytes:
    """Image bytes from standard or URL-safe base64 (padding optional); BadInput "bad_base64" / "bad_image"."""
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


def _vqa_answers(value: str, name: str) -> tuple[str, list[str], list[float]]:
    """OFA VQA answers "conf|!+answer&&conf|!+answer" -> (best answer, answers, confidences)."""
    targets, weights = [], []
    for item in value.strip().split("&&"):
        conf, sep, answer = item.partition("|!+")
        if not sep:
            raise BadInput(BAD_FORMAT, f"{name} item {item!r} is not 'confidence|!+answer'")
        weights.append(_float(conf, f"{name} confidence"))
        targets.append(required_text(answer, f"{name} answer"))
    return ranked_targets(targets, weights)


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
        return f"{self.dataset}/{self.split}/{required_text(uniq, 'uniq-id')}"

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
    return _row(line, row_id, "caption", image=image_from_base64(image, "image"), **_caption_targets(caption, line))


def _parse_vqa(line: _Line) -> dict[str, Any]:
    # question-id, image-id, question, "conf|!+answer&&...", VinVL objects (unused), image
    qid, _image_id, question, answers, _objects, image = line.cols
    row_id = line.row_id(qid)
    return _row(
        line, row_id, "vqa", image=image_from_base64(image, "image"), text=required_text(question, "question"),
        **_answers_or_none(answers, line),
    )  # fmt: skip


def _parse_refcoco(line: _Line) -> dict[str, Any]:
    # uniq-id, image-id, referring expression, "x0,y0,x1,y1", image
    uniq, _image_id, text, box, image = line.cols
    row_id = line.row_id(uniq)
    return _row(
        line, row_id, "grounding", image=image_from_base64(image, "image"), text=required_text(text, "expression"),
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
        line, row_id, "visual_entailment", image=image_from_base64(image, "image"), text=required_text(hypothesis, "hypothesis"),
        text2=_optional_text(premise), **_label(label, NLI_LABEL_WORDS, line),
    )  # fmt: skip


def _parse_imagenet(line: _Line) -> dict[str, Any]:
    # image, label index (1-based), synset words; target is the synset words
    image, label, words = line.cols
    if _int(label, "label index") < 1:
        raise BadInput(BAD_TYPE, f"label index must be >= 1 (1-based), got {label!r}")
    return _row(
        line, line.row_id(), "image_classification", image=image_from_base64(image, "image"), target=required_text(words, "synset words")
    )


def _parse_gigaword(line: _Line) -> dict[str, Any]:
    # article, summary
    source, target = line.cols
    summary = required_text(target, "summary") if line.needs_target else _optional_text(target)
    return _row(line, line.row_id(), "summarization", text=required_text(source, "article"), target=summary)


def _parse_text_to_image(line: _Line) -> dict[str, Any]:
    # uniq-id, image codes (space-separated ints), caption
    uniq, codes, caption = line.cols
    row_id = line.row_id(uniq)
    parsed = [_int(c, "image code") for c in codes.split()]
    if not parsed or min(parsed) < 0:
        raise BadInput(BAD_TYPE, f"image codes must be non-negative integers, got {codes[:40]!r}")
    return _row(line, row_id, "text_to_image", text=required_text(caption, "caption"), codes=parsed)


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
    fields: dict[str, Any] = {"image": image_from_base64(image, "image")}
    if kind == "caption":
        fields.update(_caption_targets(caption, line))
    elif kind == "qa":
        fields.update(text=required_text(question, "question"), **_answers_or_none(refs, line))
    else:
        fields.update(text=required_text(caption, "region text"), box=_box_text(refs, "box"))
    return _row(line, row_id, task, **fields)


# OFA's three other pretraining families. A row holds what the file holds: text infilling's masked spans are
# drawn per example at preprocessing, from the row's (seed, epoch, row) generator (`ofa_model.tasks.build_example`),
# never frozen at conversion.


def _parse_pretrain_text(line: _Line) -> dict[str, Any]:
    # uniq-id, text: text infilling, whose source is the text with spans masked (drawn per example)
    uniq, text = line.cols
    return _row(line, line.row_id(uniq), "text_infilling", text=required_text(text, "text"))


def _infill_codes(value: str, line: _Line) -> dict[str, Any]:
    """OFA's "code" column: INFILL_CODES space-separated VQGAN codes in [0, NUM_CODES) (16 x 16 of the centre)."""
    items = value.split()
    if not items and not line.needs_target:
        return {}
    codes = [_int(c, "image code") for c in items]
    outside = [c for c in codes if not 0 <= c < NUM_CODES]
    if outside:
        raise BadInput(BAD_TYPE, f"image codes must lie in [0, {NUM_CODES}), got {outside[0]}")
    if len(codes) != INFILL_CODES:
        raise BadInput(BAD_FORMAT, f"{len(codes)} image codes; image infilling needs {INFILL_CODES} (the 16 x 16 "
                       "codes of the image's centre)")
    return {"codes": codes}


def _parse_pretrain_image(line: _Line) -> dict[str, Any]:
    # uniq-id, image (256 x 256), codes of its 128 x 128 centre: image infilling
    uniq, image, codes = line.cols
    row_id = line.row_id(uniq)
    return _row(line, row_id, "image_infilling", image=image_from_base64(image, "image"), **_infill_codes(codes, line))


def _objects(value: str, line: _Line) -> dict[str, Any]:
    """OFA's detection column "x0,y0,x1,y1,category id,category&&..." -> object_boxes, object_labels (a
    category may hold commas: an item splits at its first five)."""
    if not value.strip():
        if line.needs_target:
            raise BadInput(EMPTY_TEXT, "objects column is empty")
        return {}
    boxes, labels = [], []
    for n, item in enumerate(value.split("&&")):
        parts = item.split(",", 5)
        if len(parts) != 6:
            raise BadInput(BAD_FORMAT, f"object {n} {item[:40]!r} is not 'x0,y0,x1,y1,category id,category'")
        boxes.append(check_box(parts[:4], f"object {n} box"))
        _int(parts[4], f"object {n} category id")
        labels.append(required_text(parts[5], f"object {n} category"))
    return {"object_boxes": boxes, "object_labels": labels}


def _parse_pretrain_detection(line: _Line) -> dict[str, Any]:
    # uniq-id, image, objects: detection
    uniq, image, objects = line.cols
    row_id = line.row_id(uniq)
    return _row(line, row_id, "detection", image=image_from_base64(image, "image"), **_objects(objects, line))


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
            line, line.row_id(), task, text=required_text(cols[text_col], "sentence"),
            text2=None if text2_col is None else required_text(cols[text2_col], "second sentence"),
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
    "pretrain_text": _Layout(2, True, True, _parse_pretrain_text),
    "pretrain_image": _Layout(3, True, True, _parse_pretrain_image),
    "pretrain_detection": _Layout(3, True, True, _parse_pretrain_detection),
    "text_to_image": _Layout(3, True, True, _parse_text_to_image),
    **{f"glue_{name}": _Layout(max(c for c in cols if c is not None) + 1, False, False, _glue_parser(name))
       for name, cols in _GLUE_COLUMNS.items()},
}  # fmt: skip
LAYOUTS = tuple(sorted(_LAYOUTS))
# The one task of each layout's rows (pretrain_vl rows carry several: caption, vqa, grounding).
_LAYOUT_TASKS = {
    "caption": "caption", "vqa": "vqa", "refcoco": "grounding", "snli_ve": "visual_entailment",
    "imagenet": "image_classification", "gigaword": "summarization", "text_to_image": "text_to_image",
    "pretrain_text": "text_infilling", "pretrain_image": "image_infilling", "pretrain_detection": "detection",
    **{f"glue_{name}": f"glue_{name}" for name in _GLUE_COLUMNS},
}  # fmt: skip
_DEFAULT_DATASETS = {
    layout: layout.replace("glue_", "glue-") if layout.startswith("glue_") else "ofa-" + layout.replace("_", "-")
    for layout in _LAYOUTS
}



TSV_SUFFIXES = (".tsv",)

def _read_lines(file_uri: str, s3: S3Options | None, chunk_bytes: int = 1 << 20, *,
                byte_range: tuple[int, int] | None = None,
                first_line: int = 1) -> Iterator[tuple[int, bytes] | BadRow]:
    """(line number, line without its newline) for every line; a BadRow if reading fails.

    byte_range (start, end): only the lines that start at a byte offset in [start, end) (a line starts at 0 or
    after a newline), the last of them read to its end even past `end`; `first_line` is the number of the first
    of them (`count_lines` of the ranges before). None: the whole file, from line 1."""
    try:
        fs, path = storage.resolve(file_uri, s3)
        if byte_range is None:
            stream_cm, start, end = fs.open_input_stream(path), 0, None
        else:
            (start, end), stream_cm = byte_range, fs.open_input_file(path)
        with stream_cm as stream:
            pos, head = start, b""
            if start > 0:  # skip to the first line starting at or after `start`: the one before is not ours
                stream.seek(start - 1)
                pos = start - 1
                while (chunk := stream.read(chunk_bytes)) and b"\n" not in chunk:
                    pos += len(chunk)
                if not chunk:
                    return
                cut = chunk.index(b"\n") + 1
                pos, head = pos + cut, chunk[cut:]
            yield from _lines_from(stream, head, pos, end, first_line, chunk_bytes)
    except OSError as exc:
        yield BadRow(None, UNREADABLE_SHARD, storage.redact(str(exc)), file_uri)


def _lines_from(stream, head: bytes, pos: int, end: int | None, line_no: int,
                chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """The lines of `head` + the rest of `stream`, the first starting at byte `pos` and numbered `line_no`, up
    to the last that starts before `end` (None: the end of the stream)."""
    pending: list[bytes] = []
    chunk = head
    while True:
        *complete, rest = chunk.split(b"\n")
        for part in complete:
            if end is not None and pos >= end:
                return
            pending.append(part)
            line = b"".join(pending)
            yield line_no, line
            pos += len(line) + 1
            line_no += 1
            pending = []
        pending.append(rest)
        chunk = stream.read(chunk_bytes)
        if not chunk:
            break
    if any(pending) and (end is None or pos < end):
        yield line_no, b"".join(pending)


def count_lines(file_uri: str, s3: S3Options | None, byte_range: tuple[int, int]) -> tuple[int, int]:
    """(lines, non-blank lines) that start in `byte_range` of the file: where the next range's numbering
    starts. OSError when the file cannot be read."""
    lines = non_blank = 0
    for item in _read_lines(file_uri, s3, byte_range=byte_range):
        if isinstance(item, BadRow):
            raise OSError(item.detail)
        lines += 1
        non_blank += bool(item[1].rstrip(b"\r"))
    return lines, non_blank


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
    file: InputFile, layout: str, *, split: str, s3: S3Options | None = None, dataset: str | None = None,
    byte_range: tuple[int, int] | None = None, first_line: int = 1, first_index: int = 0,
) -> Iterator[dict | BadRow]:
    """Canonical rows (or BadRows) of one OFA TSV file of `input_files`.

    layout: one of LAYOUTS ("caption", "vqa", "refcoco", "snli_ve", "imagenet", "gigaword",
    "glue_{cola,sst2,mnli,rte,mrpc,qqp,qnli}", "pretrain_vl", "pretrain_text", "pretrain_image",
    "pretrain_detection", "text_to_image"), with OFA's column orders.
    Row ids are "<dataset>/<split>/<uniq-id>" for layouts with an id column. Layouts without one number
    the non-blank lines of the file from 0: "<dataset>/<split>/<n>" when the input named the file itself,
    "<dataset>/<split>/<name>/<n>" for a file under a directory, name being `file.name` without ".tsv"
    (so a file's ids do not depend on the other files).
    dataset: defaults to "ofa-<layout>" ("glue-<task>" for GLUE); for pretrain_vl the per-row dataset
    column wins over the default. Targets (answers, captions, labels, image codes, objects) may be empty only
    on split "test".
    Tasks (keys of `ofa_model.tasks.TASKS`): caption, vqa, grounding (refcoco), visual_entailment (snli_ve),
    image_classification (imagenet), summarization (gigaword), glue_<name> (glue_<name>), text_to_image;
    pretrain_vl rows map type caption/qa/visual_grounding to caption/vqa/grounding; pretrain_text gives
    text_infilling (text), pretrain_image image_infilling (image, codes: INFILL_CODES ints in [0, NUM_CODES)),
    pretrain_detection detection (image, object_boxes, object_labels). Label words are those of the task's
    TaskSpec.labels.
    byte_range: only the lines starting in it (`_read_lines`), the first numbered `first_line` and, among
    the non-blank lines, `first_index` (`count_lines` of the ranges before): the rows and ids of the whole
    file, read in parts.
    """
    check_tsv_options(layout, split)
    spec = _LAYOUTS[layout]
    dataset_given = dataset is not None
    dataset = dataset or _DEFAULT_DATASETS[layout]
    stem = file.name[: -len(".tsv")] if file.name.endswith(".tsv") else file.name
    index = first_index
    for item in _read_lines(file.uri, s3, byte_range=byte_range, first_line=first_line):
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
