"""easy-VQA (PyPI `easy-vqa` 1.0): 64x64 PNGs with one coloured shape, and questions about them.

Rows per split ("train" / "test", the package's own split), with ids "easy-vqa/<split>/<task>/<key>":

* vqa, one per question (key = the question's index in questions.json): text = question,
  target = answer, targets = [answer], target_weights = [1.0].
* visual_entailment, one per yes/no question (same key): the question restated as a statement
  ("is there not a red shape?" -> text "there is not a red shape"); target = the answer ("yes"/"no").
  Every statement is the literal declarative form of its question, so the answer is its truth value.
* per image (key = image id), from the shape and colour its questions determine:
  caption (target "a blue circle", targets [it]), grounding (text "blue circle", box = the shape's pixel
  extent, see `shape_box`), image_classification (target = the shape name: circle / rectangle /
  triangle), itm twice: key "<id>/pos" (text = the true caption, target "yes") and "<id>/neg" (shape or
  colour swapped, chosen by a generator seeded with (seed, split, image id), target "no").
* with `pretraining`, stand-ins for two more of OFA's pretraining families: detection per image (key = image
  id; object_boxes = [the grounding box], object_labels = [the shape name], OFA's detection labels being
  categories), and text_infilling, one per caption (key "caption/<image id>", text = the caption) and one per
  question (key "question/<index>", text = the question). Image infilling has none: it needs image codes.

The shape and colour of an image come only from its questions' answers: a "what shape"/"what colour"
answer, a shape or colour named in a wh-question, a yes/no question that asserts or denies one, or the
one value left after the others were denied. About 10% of images are not determined that way; they get
a BadRow "attributes_undetermined" instead of their per-image rows (image_classification is still
written when the shape alone is known). Images are stored as the package's PNG bytes.
"""

import io
import random
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ofa_model.errors import (
    ATTRIBUTES_UNDETERMINED,
    INCONSISTENT_ANSWERS,
    MISSING_IMAGE,
    NO_SHAPE,
    UNPARSED_QUESTION,
)
from pipelines.data.converters._common import check_limit, select_splits
from pipelines.data.readers.rows import BadRow, make_row

DATASET = "easy-vqa"
SPLITS = ("train", "test")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
YES_NO = ("yes", "no")

# Shapes with less contrast than this (max channel difference to the background) count as absent.
MIN_CONTRAST = 32

_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_THING = rf"(?:(?P<color>{_COLOR_RE}) shape|(?P<shape>{_SHAPE_RE}))"
# (question pattern, statement template, whether the statement asserts presence); the {x} of the
# statement is the question's own object phrase ("red shape" / "circle").
_STATEMENTS = tuple(
    (re.compile(pattern.format(thing=_THING)), template, asserts)
    for pattern, template, asserts in (
        (r"does the image contain an? {thing}\?", "the image contains a {x}", True),
        (r"does the image not contain an? {thing}\?", "the image does not contain a {x}", False),
        (r"is an? {thing} present\?", "a {x} is present", True),
        (r"is no {thing} present\?", "no {x} is present", False),
        (r"is there an? {thing} in the image\?", "there is a {x} in the image", True),
        (r"is there not an? {thing} in the image\?", "there is not a {x} in the image", False),
        (r"is there an? {thing}\?", "there is a {x}", True),
        (r"is there not an? {thing}\?", "there is not a {x}", False),
    )
)


@dataclass(frozen=True)
class YesNoStatement:
    """A yes/no question read as a statement: its text, the attribute it names, whether it asserts it."""

    text: str
    attribute: str  # a shape or a colour name
    kind: str  # "shape" or "color"
    asserts: bool  # True: "there is a X"; False: "there is not a X"


def parse_yes_no(question: str) -> YesNoStatement | None:
    """The statement form of an easy-VQA yes/no question, or None for a form not in the package."""
    for pattern, template, asserts in _STATEMENTS:
        m = pattern.fullmatch(question.strip().lower())
        if m:
            kind = "color" if m["color"] else "shape"
            attribute = m[kind]
            phrase = f"{attribute} shape" if kind == "color" else attribute
            return YesNoStatement(template.format(x=phrase), attribute, kind, asserts)
    return None


@dataclass(frozen=True)
class Question:
    index: int  # position in questions.json
    text: str
    answer: str
    image_id: int


def package_questions(split: str) -> list[Question]:
    """The package's questions for `split` ("train"/"test"), via its helper functions, in file order."""
    import easy_vqa

    getter = {"train": easy_vqa.get_train_questions, "test": easy_vqa.get_test_questions}[split]
    texts, answers, image_ids = getter()
    return [Question(n, t, a, int(i)) for n, (t, a, i) in enumerate(zip(texts, answers, image_ids, strict=True))]


def package_image_paths(split: str) -> dict[int, str]:
    """image id -> PNG path of the package's images for `split`."""
    import easy_vqa

    getter = {"train": easy_vqa.get_train_image_paths, "test": easy_vqa.get_test_image_paths}[split]
    return {int(k): v for k, v in getter().items()}


def image_attributes(questions: Sequence[Question]) -> tuple[str | None, str | None, list[str]]:
    """(shape, colour, conflicts) that one image's questions determine; None where undetermined."""
    known: dict[str, set[str]] = {"shape": set(), "color": set()}
    denied: dict[str, set[str]] = {"shape": set(), "color": set()}
    for q in questions:
        if q.answer in YES_NO:
            st = parse_yes_no(q.text)
            if st is not None:
                present = (q.answer == "yes") == st.asserts
                (known if present else denied)[st.kind].add(st.attribute)
            continue
        if q.answer in SHAPES:
            known["shape"].add(q.answer)
        elif q.answer in COLORS:
            known["color"].add(q.answer)
        for word in re.findall(r"[a-z]+", q.text.lower()):  # "what is the blue shape?", "what color is the circle?"
            if word in SHAPES:
                known["shape"].add(word)
            elif word in COLORS:
                known["color"].add(word)
    result: dict[str, str | None] = {}
    conflicts: list[str] = []
    for kind, universe in (("shape", SHAPES), ("color", COLORS)):
        clash = known[kind] & denied[kind]
        if len(known[kind]) > 1 or clash:
            conflicts.append(f"{kind}: answers say {sorted(known[kind])}, deny {sorted(clash)}")
            result[kind] = None
        elif known[kind]:
            result[kind] = next(iter(known[kind]))
        else:
            left = [v for v in universe if v not in denied[kind]]
            result[kind] = left[0] if len(left) == 1 else None
    return result["shape"], result["color"], conflicts


def shape_box(png: bytes) -> tuple[float, float, float, float] | None:
    """The tight pixel box (x0, y0, x1, y1) of the shape in an easy-VQA image; None when there is none.

    The background is the most common colour of the border pixels (the tint is uniform). A pixel
    belongs to the shape when its largest channel difference to the background is at least half the
    largest difference in the image, i.e. anti-aliased edge pixels count when at least half covered.
    x0, y0 are the first shape column/row; x1, y1 are one past the last (exclusive edges), so the box
    spans x1 - x0 pixels, e.g. a shape covering columns 26..56 gives x0=26, x1=57.
    """
    with Image.open(io.BytesIO(png)) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int16)  # (H, W, 3)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])  # (2W + 2H, 3)
    colours, counts = np.unique(border, axis=0, return_counts=True)
    background = colours[counts.argmax()]  # (3,)
    diff = np.abs(rgb - background).max(axis=-1)  # (H, W)
    peak = int(diff.max())
    if peak < MIN_CONTRAST:
        return None
    ys, xs = np.nonzero(2 * diff >= peak)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def answer_set() -> tuple[str, ...]:
    """easy-VQA's 13 answers, in the package's order (the closed set its VQA is scored among)."""
    import easy_vqa

    return tuple(a for a in easy_vqa.get_answers() if a)


def caption_attributes(caption: str) -> tuple[set[str], set[str]]:
    """The colours and the shapes a caption names (whole words of COLORS and SHAPES, any case)."""
    words = set(re.findall(r"[a-z]+", str(caption).lower()))
    return words & set(COLORS), words & set(SHAPES)


def caption_fully_right(prediction: str | None, reference: str) -> bool:
    """Whether a predicted caption names the image's colour and shape, and no other: the image's labels are
    those of its reference caption, which `_image_rows` writes from them ("a <colour> <shape>")."""
    if prediction is None:
        return False
    colours, shapes = caption_attributes(reference)
    if len(colours) != 1 or len(shapes) != 1:
        raise ValueError(f"reference caption {reference!r} does not name one colour and one shape")
    return caption_attributes(prediction) == (colours, shapes)


def share_fully_right(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """The share of predicted captions that are `caption_fully_right` against their reference (0 for none)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return sum(map(caption_fully_right, predictions, references)) / len(references) if references else 0.0


def _negative_caption(shape: str, color: str, rng: random.Random) -> str:
    """A caption that is false for a (shape, colour) image: the shape or the colour swapped."""
    if rng.random() < 0.5:
        return f"a {color} {rng.choice([s for s in SHAPES if s != shape])}"
    return f"a {rng.choice([c for c in COLORS if c != color])} {shape}"


def _image_rows(
    split: str, image_id: int, png: bytes, questions: Sequence[Question], seed: int, source: str,
    pretraining: bool = False,
) -> Iterator[dict | BadRow]:
    """The derived per-image rows (caption, grounding, image_classification, itm; with `pretraining` also
    detection and the caption's text_infilling) or BadRows."""
    key = f"{DATASET}/{split}"
    shape, color, conflicts = image_attributes(questions)
    image_bad_id = f"{key}/image/{image_id}"
    if conflicts:
        yield BadRow(id=image_bad_id, reason=INCONSISTENT_ANSWERS, detail="; ".join(conflicts), source=source)
        return
    if shape is not None:
        yield make_row(
            source, id=f"{key}/image_classification/{image_id}", task="image_classification", split=split,
            dataset=DATASET, image=png, target=shape,
        )
    if shape is None or color is None:
        yield BadRow(
            id=image_bad_id, reason=ATTRIBUTES_UNDETERMINED,
            detail=f"shape={shape}, colour={color}: its {len(questions)} questions do not determine both; "
            "no caption/grounding/itm rows", source=source,
        )
        return
    caption = f"a {color} {shape}"
    yield make_row(
        source, id=f"{key}/caption/{image_id}", task="caption", split=split, dataset=DATASET, image=png,
        target=caption, targets=[caption],
    )
    box = shape_box(png)
    if box is None:
        yield BadRow(id=f"{key}/grounding/{image_id}", reason=NO_SHAPE, detail="no pixels differ from the "
                     "background", source=source)
    else:
        yield make_row(
            source, id=f"{key}/grounding/{image_id}", task="grounding", split=split, dataset=DATASET, image=png,
            text=f"{color} {shape}", box=list(box),
        )
    rng = random.Random(f"{seed}/{split}/{image_id}")
    yield make_row(source, id=f"{key}/itm/{image_id}/pos", task="itm", split=split, dataset=DATASET, image=png,
                   text=caption, target="yes")
    yield make_row(source, id=f"{key}/itm/{image_id}/neg", task="itm", split=split, dataset=DATASET, image=png,
                   text=_negative_caption(shape, color, rng), target="no")
    if not pretraining:
        return
    if box is None:
        yield BadRow(id=f"{key}/detection/{image_id}", reason=NO_SHAPE, detail="no pixels differ from the "
                     "background", source=source)
    else:
        yield make_row(source, id=f"{key}/detection/{image_id}", task="detection", split=split, dataset=DATASET,
                       image=png, object_boxes=[list(box)], object_labels=[shape])
    yield make_row(source, id=f"{key}/text_infilling/caption/{image_id}", task="text_infilling", split=split,
                   dataset=DATASET, text=caption)


def _question_text_rows(split: str, questions: Sequence[Question], source: str) -> Iterator[dict | BadRow]:
    """The text_infilling row of every question (the text alone: no image, no answer)."""
    for q in questions:
        yield make_row(source, id=f"{DATASET}/{split}/text_infilling/question/{q.index}", task="text_infilling",
                       split=split, dataset=DATASET, text=q.text)


def _question_rows(split: str, png: bytes, questions: Sequence[Question], source: str) -> Iterator[dict | BadRow]:
    """The vqa row of every question, then the visual_entailment row of every yes/no question."""
    key = f"{DATASET}/{split}"
    for q in questions:
        yield make_row(
            source, id=f"{key}/vqa/{q.index}", task="vqa", split=split, dataset=DATASET, image=png, text=q.text,
            target=q.answer, targets=[q.answer], target_weights=[1.0],
        )
    for q in questions:
        if q.answer not in YES_NO:
            continue
        st = parse_yes_no(q.text)
        if st is None:
            yield BadRow(id=f"{key}/visual_entailment/{q.index}", reason=UNPARSED_QUESTION,
                         detail=f"yes/no question {q.text!r} has no statement form", source=source)
            continue
        yield make_row(
            source, id=f"{key}/visual_entailment/{q.index}", task="visual_entailment", split=split, dataset=DATASET,
            image=png, text=st.text, target=q.answer,
        )


def convert_easy_vqa(
    *, splits: Sequence[str] | None = None, limit: int | None = None, seed: int = 0, pretraining: bool = False
) -> Iterator[dict | BadRow]:
    """Canonical rows from the installed easy-vqa package (see the module docstring for the rows).

    splits: "train" and/or "test" (default both). limit: at most this many images per split, the
    lowest image ids first, each with all its questions. seed: picks the ITM negatives. pretraining: also
    write detection and text_infilling rows (stand-ins for OFA's detection and text pretraining families);
    the other rows are the same either way.
    """
    check_limit(limit)
    for split in select_splits(SPLITS, splits, DATASET):
        paths = package_image_paths(split)
        by_image: dict[int, list[Question]] = defaultdict(list)
        for q in package_questions(split):
            by_image[q.image_id].append(q)
        image_ids = sorted(set(paths) | set(by_image))
        if limit is not None:
            image_ids = image_ids[:limit]
        for image_id in image_ids:
            questions = by_image.get(image_id, [])
            source = f"easy_vqa:{split}/images/{image_id}.png"
            if image_id not in paths:
                for q in questions:
                    yield BadRow(id=f"{DATASET}/{split}/vqa/{q.index}", reason=MISSING_IMAGE,
                                 detail=f"question names image {image_id}, which the package lacks", source=source)
                continue
            png = Path(paths[image_id]).read_bytes()
            yield from _question_rows(split, png, questions, source)
            yield from _image_rows(split, image_id, png, questions, seed, source, pretraining)
            if pretraining:
                yield from _question_text_rows(split, questions, source)

