"""Pretraining's auxiliary examples, derived from the main ones as OFA builds them (reference/ofa.md §4.1).

OFA's `vision_language_examples.tsv` rows are captions, questions and regions; from each it also builds an
auxiliary example of another task:

* `itm` from a caption row: ' does the image describe " {caption} "?' -> yes, or, half the time, the same image
  with another caption from the corpus -> no;
* `qa_matching` from a VQA row: ' what is the answer to question " {q} ". is " {a} "?' -> yes with its answer,
  or no with another answer from the corpus;
* `grounded_caption` from a grounding row: the region's box -> the text that names it.

Nothing of this is written at conversion: `derive_row` turns a source row into the derived one as it is
preprocessed, with the row's own generator (seeded by the run's seed, the epoch and the row's number), so the
negatives change from epoch to epoch and a resumed epoch draws the ones the uninterrupted run drew. The
negatives come from a pool of the corpus's captions or answers (`pool_value`), the same in every process
because it is read from the corpus in manifest order. (OFA also swaps a caption's object word for a random
object 40 % of the time; rows here keep no object list, so every negative is another caption.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ofa_model.errors import MISSING_FIELD
from ofa_model.tasks import TaskInputError

# derived task -> the task whose rows it is made from
DERIVED: dict[str, str] = {"itm": "caption", "qa_matching": "vqa", "grounded_caption": "grounding"}
POOL_SIZE = 4096  # negatives drawn from at most this many distinct captions / answers
NEGATIVE_TRIES = 16  # draws before a row whose every pool entry equals its own text is refused


def source_task(task: str) -> str:
    """The task `task` is derived from; ValueError for one that is not derived."""
    if task not in DERIVED:
        raise ValueError(f"task {task!r} is not derived from another; derived tasks: {', '.join(sorted(DERIVED))}")
    return DERIVED[task]


def needs_pool(task: str) -> bool:
    """Whether `task`'s negatives come from a pool (itm, qa_matching) or it has none (grounded_caption)."""
    return source_task(task) in ("caption", "vqa")


def pool_value(row: Mapping[str, Any]) -> str | None:
    """What a source row adds to the negative pool: its caption (caption rows) or its answer (VQA rows)."""
    value = row.get("target")
    if not isinstance(value, str) or not value.strip():
        targets = row.get("targets")
        value = targets[0] if isinstance(targets, Sequence) and targets and isinstance(targets[0], str) else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def derive_row(task: str, row: Mapping[str, Any], rng: np.random.Generator, pool: Sequence[str]) -> dict[str, Any]:
    """The `task` row made from the source row `row` (see the module docstring). The source's other fields
    (id, image, split, ...) are kept, its targets replaced. TaskInputError when the row lacks what the derived
    example needs."""
    source = source_task(task)
    if row.get("task") != source:
        raise TaskInputError(f"task {task}: derived from {source} rows, got a {row.get('task')!r} row")
    derived = {**row, "task": task, "targets": None, "target_weights": None}
    if task == "grounded_caption":
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise TaskInputError(f"task {task}: the grounding row has no region text", MISSING_FIELD)
        return {**derived, "target": text, "text": None}
    own = pool_value(row)
    if own is None:
        raise TaskInputError(f"task {task}: the {source} row has no {'caption' if source == 'caption' else 'answer'}",
                             MISSING_FIELD)
    match = bool(rng.random() < 0.5)
    shown = own if match else _negative(task, own, rng, pool)
    if task == "itm":
        return {**derived, "text": shown, "target": "yes" if match else "no"}
    return {**derived, "text2": shown, "target": "yes" if match else "no"}  # qa_matching: text is the question


def _negative(task: str, own: str, rng: np.random.Generator, pool: Sequence[str]) -> str:
    for _ in range(NEGATIVE_TRIES):
        if not pool:
            break
        other = pool[int(rng.integers(len(pool)))]
        if other != own:
            return other
    raise TaskInputError(f"task {task}: no negative to pair with {own[:60]!r}: the corpus's pool of "
                         f"{len(pool)} has no other {'caption' if task == 'itm' else 'answer'}", MISSING_FIELD)
