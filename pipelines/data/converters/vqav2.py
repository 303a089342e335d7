"""VQA v2 (questions JSON + annotations JSON + COCO images) -> vqa rows.

One row per question, id "vqav2/<split>/<question_id>", text = the question. With annotations:
targets = the distinct answers among the 10 human answers (whitespace collapsed, otherwise as given;
answer normalisation belongs to the metric), target_weights = the soft score min(1, count / 3) of each,
sorted by weight (ties: first occurrence), target = the highest-weighted one (a tie is broken in favour
of `multiple_choice_answer`, then the first occurrence). `answer_confidence` is not used. Without an
annotations file for a split (the test-dev/test splits) target, targets and weights are None.
"""

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence

from ofa_model.errors import BAD_TYPE, EMPTY_TEXT, MISSING_ANNOTATION, MISSING_FIELD
from pipelines.data.converters._common import (
    FileRoot,
    LastImage,
    check_limit,
    load_json,
    per_split,
    record_text,
    select_splits,
    text_or_none,
)
from pipelines.data.readers.rows import BadInput, BadRow, make_row

DATASET = "vqav2"
DEFAULT_IMAGE_PATTERN = "COCO_{split}2014_{image_id:012d}.jpg"


def soft_targets(answers: Sequence[str], preferred: str | None = None) -> tuple[str, list[str], list[float]]:
    """(target, distinct answers, min(1, count/3) weights) for one question's human answers."""
    counts = Counter(answers)
    first = {a: answers.index(a) for a in counts}
    distinct = sorted(counts, key=lambda a: (-counts[a], first[a]))
    weights = [min(1.0, counts[a] / 3) for a in distinct]
    best = [a for a, w in zip(distinct, weights, strict=True) if w == weights[0]]
    target = preferred if preferred in best else best[0]
    return target, distinct, weights


def convert_vqav2(
    *,
    questions: Mapping[str, str],
    image_root: str | Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
    image_pattern: str = DEFAULT_IMAGE_PATTERN,
    splits: Sequence[str] | None = None,
    limit: int | None = None,
) -> Iterator[dict | BadRow]:
    """VQA rows from VQA v2 JSON files.

    questions / annotations: split -> JSON path (annotations may lack a split: unlabelled rows).
    image_root: one directory/URI or split -> directory/URI. image_pattern: the image file name, formatted
    with split and image_id (use e.g. "COCO_test2015_{image_id:012d}.jpg" for test). limit: at most this
    many questions per split, in file order.
    """
    check_limit(limit)
    annotations = annotations or {}
    for split in select_splits(list(questions), splits, DATASET):
        qpath = questions[split]
        qdata = load_json(qpath, "VQA questions file")
        if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
            raise ValueError(f"VQA questions file {qpath} needs a top-level 'questions' list")
        answers_by_qid: dict | None = None
        if split in annotations:
            adata = load_json(annotations[split], "VQA annotations file")
            if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
                raise ValueError(f"VQA annotations file {annotations[split]} needs a top-level 'annotations' list")
            answers_by_qid = {a.get("question_id"): a for a in adata["annotations"] if isinstance(a, dict)}
        images = LastImage(FileRoot(per_split(image_root, split, "image_root")))
        qs = qdata["questions"][:limit] if limit is not None else qdata["questions"]
        for n, q in enumerate(qs):
            yield _question_row(q, n, split, qpath, answers_by_qid, images, image_pattern)


def _question_row(
    q: object, n: int, split: str, qpath: str, answers_by_qid: dict | None, images: LastImage, image_pattern: str
) -> dict | BadRow:
    source = f"{qpath}: questions[{n}]"
    q = q if isinstance(q, dict) else {}
    qid, image_id = q.get("question_id"), q.get("image_id")
    row_id = f"{DATASET}/{split}/{qid if qid is not None else f'question-{n}'}"
    try:
        if qid is None or image_id is None:
            raise BadInput(MISSING_FIELD, "question needs 'question_id' and 'image_id'")
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise BadInput(BAD_TYPE, f"'image_id' must be an integer, got {image_id!r}")
        text = record_text(q, "question")
    except BadInput as bad:
        return bad.bad_row(row_id, source)
    fields: dict = {}
    if answers_by_qid is not None:
        ann = answers_by_qid.get(qid)
        if ann is None:
            return BadRow(id=row_id, reason=MISSING_ANNOTATION, detail=f"question_id {qid} has no annotation",
                          source=source)
        if not ann.get("answers"):
            return BadRow(id=row_id, reason=MISSING_FIELD, detail=f"annotation of question {qid} has no "
                          "'answers'", source=source)
        answers = [text_or_none(a.get("answer")) if isinstance(a, dict) else None for a in ann["answers"]]
        answers = [a for a in answers if a is not None]
        if not answers:
            return BadRow(id=row_id, reason=EMPTY_TEXT, detail=f"every answer of question {qid} is blank or "
                          "missing", source=source)
        target, distinct, weights = soft_targets(answers, text_or_none(ann.get("multiple_choice_answer")))
        fields = {"target": target, "targets": distinct, "target_weights": weights}
    image = images.read(image_pattern.format(split=split, image_id=image_id), row_id, source)
    if isinstance(image, BadRow):
        return image
    return make_row(source, id=row_id, task="vqa", split=split, dataset=DATASET, image=image, text=text, **fields)
