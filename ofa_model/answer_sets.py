"""Answer and label sets as data: the closed set a VQA model (OFA's 3,129 VQAv2 answers) or a classifier (ImageNet's
1,000 labels) chooses among, read from a file and stored in every bundle trained with it.

    answers = parse_answer_set(data, "trainval_ans2label.pkl")   # bytes + a name for messages and the format
    answers = read_answer_file("answers.txt")                     # a local file (pipelines read s3:// ones)

Three formats, chosen by the name's suffix:

* `.txt`: one answer per line; lines are stripped, blank lines ignored.
* `.json`: a list of strings, or an object answer -> index (an `ans2label`).
* `.pkl` / `.pickle`: OFA's `trainval_ans2label.pkl`, a pickled dict answer -> index. It is read by an unpickler
  that refuses every global, so a pickle can rebuild only plain containers, strings and numbers: nothing of the
  file's runs. An index map gives its answers ordered by index; the indices must be distinct integers.

A set is a tuple of distinct, non-blank strings, at most `MAX_ANSWERS` of them, each at most `MAX_ANSWER_CHARS`
characters; a file is at most `MAX_FILE_BYTES`. Anything else is an `AnswerSetError` naming the file and what
is wrong.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import reprlib
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ofa_model.errors import BAD_ANSWER_SET, InputError

MAX_FILE_BYTES = 64 * 2**20  # OFA's trainval_ans2label.pkl is 60 kB
MAX_ANSWERS = 100_000  # ImageNet-21k has 21,841 classes, VQAv2's answer list 3,129
MAX_ANSWER_CHARS = 1024
FORMATS = {".txt": "text", ".json": "json", ".pkl": "pickle", ".pickle": "pickle"}


class AnswerSetError(InputError):
    """An answer or label set that cannot be used; the message names the file (or field) and what is wrong."""

    reason = BAD_ANSWER_SET


def check_answer_set(values: Any, where: str) -> tuple[str, ...]:
    """`values` as a tuple of answers, else AnswerSetError naming `where`: a non-empty list (or tuple) of at most
    MAX_ANSWERS distinct strings, none blank or over MAX_ANSWER_CHARS characters."""
    if not isinstance(values, list | tuple):
        raise AnswerSetError(f"{where}: an answer set must be a list of strings, got {type(values).__name__}")
    if not values:
        raise AnswerSetError(f"{where}: the answer set is empty")
    if len(values) > MAX_ANSWERS:
        raise AnswerSetError(f"{where}: {len(values):,} answers, over the limit of {MAX_ANSWERS:,}")
    seen: set[str] = set()
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise AnswerSetError(f"{where}: answer {i} is a {type(value).__name__} ({reprlib.repr(value)}), "
                                 "not a string")
        if not value.strip():
            raise AnswerSetError(f"{where}: answer {i} is blank")
        if len(value) > MAX_ANSWER_CHARS:
            raise AnswerSetError(f"{where}: answer {i} has {len(value):,} characters, over the limit of "
                                 f"{MAX_ANSWER_CHARS:,}")
        if value in seen:
            raise AnswerSetError(f"{where}: answer {reprlib.repr(value)} is listed more than once")
        seen.add(value)
    return tuple(values)


def parse_answer_set(data: bytes, name: str) -> tuple[str, ...]:
    """The answers in `data`, the bytes of the file `name` (its suffix picks the format: see the module docstring)."""
    suffix = Path(name.rsplit("/", 1)[-1]).suffix.lower()
    kind = FORMATS.get(suffix)
    if kind is None:
        raise AnswerSetError(f"{name}: an answer file ends in one of {sorted(FORMATS)} (plain text, JSON or OFA's "
                             f"ans2label pickle), not {suffix or 'no suffix'!r}")
    if len(data) > MAX_FILE_BYTES:
        raise AnswerSetError(f"{name}: {len(data):,} bytes, over the limit of {MAX_FILE_BYTES:,} for an answer file")
    if kind == "pickle":
        obj = _unpickle(data, name)
        if not isinstance(obj, dict):
            raise AnswerSetError(f"{name}: an answer pickle must hold a dict answer -> index (OFA's ans2label), "
                                 f"got {type(obj).__name__}")
        return _from_index_map(obj, name)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AnswerSetError(f"{name}: not UTF-8 text ({e})") from None
    if kind == "text":
        return check_answer_set([s for s in (line.strip() for line in text.splitlines()) if s], name)

    def reject(constant: str):
        raise AnswerSetError(f"{name}: {constant} is not a valid JSON number")

    try:
        obj = json.loads(text, parse_constant=reject)
    except AnswerSetError:
        raise
    except (ValueError, RecursionError) as e:
        raise AnswerSetError(f"{name}: not valid JSON ({e})") from None
    return _from_container(obj, name)


def read_answer_file(path: str | Path) -> tuple[str, ...]:
    """The answers of the local regular file at `path`, read no further than MAX_FILE_BYTES."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks on a FIFO
    except OSError as e:
        raise AnswerSetError(f"{path}: cannot open the answer file: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AnswerSetError(f"{path}: an answer file must be a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    return parse_answer_set(data, str(path))


def _from_container(obj: Any, name: str) -> tuple[str, ...]:
    """A list of answers as it is, an answer -> index map as its answers ordered by index."""
    if isinstance(obj, Mapping):
        return _from_index_map(obj, name)
    if isinstance(obj, list):
        return check_answer_set(obj, name)
    raise AnswerSetError(f"{name}: expected a list of answers or an object answer -> index, got "
                         f"{type(obj).__name__}")


def _from_index_map(obj: Mapping, name: str) -> tuple[str, ...]:
    if len(obj) > MAX_ANSWERS:
        raise AnswerSetError(f"{name}: {len(obj):,} answers, over the limit of {MAX_ANSWERS:,}")
    by_index: dict[int, str] = {}
    for answer, index in obj.items():
        if not isinstance(answer, str):
            raise AnswerSetError(f"{name}: key {reprlib.repr(answer)} is a {type(answer).__name__}, not a string "
                                 "(an ans2label maps answers to indices)")
        if not isinstance(index, int) or isinstance(index, bool):
            raise AnswerSetError(f"{name}: answer {reprlib.repr(answer)} maps to a {type(index).__name__} "
                                 f"({reprlib.repr(index)}), not an integer index")
        if index in by_index:
            raise AnswerSetError(f"{name}: answers {reprlib.repr(by_index[index])} and {reprlib.repr(answer)} "
                                 f"share index {index}")
        by_index[index] = answer
    return check_answer_set([by_index[i] for i in sorted(by_index)], name)


class _Refused(Exception):
    def __init__(self, module: str, qualname: str) -> None:
        super().__init__(f"{module}.{qualname}")


class _NoGlobals(pickle.Unpickler):
    """An unpickler that rebuilds plain containers, strings and numbers, and refuses every global (so every
    class and function a pickle names: nothing of the file is ever called)."""

    def find_class(self, module: str, name: str):
        raise _Refused(module, name)


def _unpickle(data: bytes, name: str) -> Any:
    try:
        return _NoGlobals(io.BytesIO(data)).load()
    except _Refused as e:
        raise AnswerSetError(f"{name}: refused to unpickle: the pickle names GLOBAL {e}; an answer pickle may hold "
                             "only a dict of answer -> index (strings and integers)") from None
    except MemoryError:
        raise
    except Exception as e:  # a malformed pickle fails in many exception types; all are about the file
        raise AnswerSetError(f"{name}: not a readable pickle ({type(e).__name__}: {str(e)[:200]})") from None


def answer_sets_of(sets: Mapping[str, Sequence[str]], where: str) -> dict[str, tuple[str, ...]]:
    """`sets` (task -> answers) checked: task names are strings, each set passes `check_answer_set`."""
    if not isinstance(sets, Mapping):
        raise AnswerSetError(f"{where}: answer sets must map task names to lists of answers, got "
                             f"{type(sets).__name__}")
    out = {}
    for task, values in sets.items():
        if not isinstance(task, str) or not task:
            raise AnswerSetError(f"{where}: task name {reprlib.repr(task)} is not a non-empty string")
        out[task] = check_answer_set(values, f"{where}.{task}")
    return out
