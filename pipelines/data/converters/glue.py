"""GLUE TSV files (the public GLUE layouts) -> text-classification rows with OFA's label words.

Columns are found by header name; CoLA's labelled files have no header (source, label, original
label, sentence). Lines are split on tabs only (no quote processing: GLUE text contains quotes).
One row per data line: id "glue-<task>/<split>/<n>" (n = the data line's index, from 0, header not
counted), task "glue_<task>", text / text2 = the task's first / second sentence column:

| task | text | text2 | label column -> target |
|---|---|---|---|
| cola | sentence | - | label: 1 "yes", 0 "no" |
| sst2 | sentence | - | label: 1 "positive", 0 "negative" |
| mnli | sentence1 | sentence2 | gold_label: entailment "yes", neutral "maybe", contradiction "no" |
| rte | sentence1 | sentence2 | label: entailment "yes", not_entailment "no" |
| qnli | question | sentence | label: entailment "yes", not_entailment "no" |
| mrpc | #1 String | #2 String | Quality: 1 "yes", 0 "no" |
| qqp | question1 | question2 | is_duplicate: 1 "yes", 0 "no" |

Files without the label column (GLUE test files) give rows with target None.
"""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ofa_model.errors import EMPTY_TEXT, EXTRA_COLUMN, MISSING_COLUMN, UNKNOWN_LABEL
from pipelines.data.converters._common import check_limit, select_splits, text_or_none
from pipelines.data.readers.rows import BadRow, make_row
from pipelines.data.schema import GLUE_LABEL_WORDS


@dataclass(frozen=True)
class GlueSpec:
    """Where one GLUE task keeps its texts and label, and its label words."""

    text: str  # header name of the first text column
    text2: str | None  # header name of the second text column (None: single sentence)
    label: str  # header name of the label column
    label_words: dict[str, str]  # label as written in the file -> OFA label word (schema.GLUE_LABEL_WORDS)
    headerless: tuple[str, ...] | None = None  # column names of labelled files that have no header row


_WORDS = GLUE_LABEL_WORDS
GLUE_TASKS: dict[str, GlueSpec] = {
    "cola": GlueSpec("sentence", None, "label", _WORDS["cola"], ("source", "label", "original_label", "sentence")),
    "sst2": GlueSpec("sentence", None, "label", _WORDS["sst2"]),
    "mnli": GlueSpec("sentence1", "sentence2", "gold_label", _WORDS["mnli"]),
    "rte": GlueSpec("sentence1", "sentence2", "label", _WORDS["rte"]),
    "qnli": GlueSpec("question", "sentence", "label", _WORDS["qnli"]),
    "mrpc": GlueSpec("#1 String", "#2 String", "Quality", _WORDS["mrpc"]),
    "qqp": GlueSpec("question1", "question2", "is_duplicate", _WORDS["qqp"]),
}

# File names in a GLUE task directory, by split.
DEFAULT_FILES = {"train": "train.tsv", "val": "dev.tsv", "test": "test.tsv"}
MNLI_FILES = {
    "train": "train.tsv",
    "val": "dev_matched.tsv",
    "val_mismatched": "dev_mismatched.tsv",
    "test": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}


def glue_files(task: str, data_dir: str | Path) -> dict[str, str]:
    """split -> path of the standard GLUE files that exist in `data_dir` (e.g. glue_data/SST-2)."""
    names = MNLI_FILES if task == "mnli" else DEFAULT_FILES
    found = {split: str(Path(data_dir) / name) for split, name in names.items() if (Path(data_dir) / name).is_file()}
    if not found:
        raise FileNotFoundError(f"glue-{task}: none of {sorted(names.values())} in {data_dir}")
    return found


GlueTask = Literal["cola", "sst2", "mnli", "rte", "qnli", "mrpc", "qqp"]  # the keys of GLUE_TASKS


def convert_glue(
    *,
    task: GlueTask,
    files: Mapping[str, str] | None = None,
    data_dir: str | None = None,
    splits: Sequence[str] | None = None,
    limit: int | None = None,
) -> Iterator[dict | BadRow]:
    """Rows of one GLUE task (a GlueTask).

    files: split -> TSV path; or data_dir: the task's GLUE directory (train.tsv, dev.tsv -> "val",
    test.tsv; MNLI dev_matched.tsv -> "val", dev_mismatched.tsv -> "val_mismatched", test_matched.tsv ->
    "test"). limit: at most this many data lines per split.
    """
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {sorted(GLUE_TASKS)}")
    if (files is None) == (data_dir is None):
        raise ValueError("give exactly one of files (split -> path) or data_dir")
    check_limit(limit)
    files = dict(files) if files is not None else glue_files(task, data_dir)
    for split in select_splits(list(files), splits, f"glue-{task}"):
        yield from _file_rows(task, GLUE_TASKS[task], split, files[split], limit)


def _file_rows(task: str, spec: GlueSpec, split: str, path: str, limit: int | None) -> Iterator[dict | BadRow]:
    dataset = f"glue-{task}"
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = (line.rstrip("\r\n") for line in f)
        first = next(lines, None)
        if first is None:
            return
        fields = first.split("\t")
        header_row = spec.headerless is None or spec.text in fields
        columns = fields if header_row else list(spec.headerless or ())
        for name in (spec.text, spec.text2):
            if name is not None and name not in columns:
                raise ValueError(f"{dataset} file {path}: no {name!r} column in header {columns}")
        data = lines if header_row else _chain(first, lines)
        line_offset = 2 if header_row else 1
        for n, line in enumerate(data):
            if limit is not None and n >= limit:
                break
            if line.strip():
                yield _line_row(line, n, columns, spec, task, split, f"{path}:{n + line_offset}")


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _line_row(
    line: str, n: int, columns: list[str], spec: GlueSpec, task: str, split: str, source: str
) -> dict | BadRow:
    dataset = f"glue-{task}"
    row_id = f"{dataset}/{split}/{n}"
    values = line.split("\t")
    if len(values) != len(columns):
        reason = MISSING_COLUMN if len(values) < len(columns) else EXTRA_COLUMN
        return BadRow(id=row_id, reason=reason, detail=f"{len(values)} columns, header has {len(columns)}",
                      source=source)
    record = dict(zip(columns, values, strict=True))
    text = text_or_none(record[spec.text])
    text2 = text_or_none(record[spec.text2]) if spec.text2 else None
    if text is None or (spec.text2 is not None and text2 is None):
        return BadRow(id=row_id, reason=EMPTY_TEXT, detail="a text column is empty", source=source)
    target = None
    if spec.label in record:
        label = record[spec.label].strip()
        if label not in spec.label_words:
            return BadRow(id=row_id, reason=UNKNOWN_LABEL, detail=f"label {label!r} is not one of "
                          f"{sorted(spec.label_words)}", source=source)
        target = spec.label_words[label]
    return make_row(source, id=row_id, task=f"glue_{task}", split=split, dataset=dataset, text=text, text2=text2,
                    target=target)
