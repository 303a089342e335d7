"""SNLI-VE (snli_ve_<split>.jsonl + Flickr30k images) -> visual_entailment rows.

Each JSON line has the image id in "Flickr30K_ID" or "Flikr30kID" (with or without ".jpg"), the premise
caption in "sentence1", the hypothesis in "sentence2" and "gold_label". One row per line: id
"snli-ve/<split>/<pairID>" ("line-<n>", n counting from 0, when the line has no pairID), text = the
hypothesis, text2 = the premise, target = OFA's label word (entailment "yes", contradiction "no",
neutral "maybe"), image = <image_root>/<image id>.jpg.
"""

import json
from collections.abc import Iterator, Mapping, Sequence

from ofa_model.errors import BAD_JSON, MISSING_FIELD, UNKNOWN_LABEL
from pipelines.data.converters._common import (
    FileRoot,
    LastImage,
    check_limit,
    per_split,
    record_text,
    select_splits,
)
from pipelines.data.readers.rows import BadInput, BadRow, make_row
from pipelines.data.schema import NLI_LABEL_WORDS

DATASET = "snli-ve"
LABEL_WORDS = NLI_LABEL_WORDS  # gold_label -> OFA's answer word
_IMAGE_ID_FIELDS = ("Flickr30K_ID", "Flikr30kID")


def convert_snli_ve(
    *,
    files: Mapping[str, str],
    image_root: str | Mapping[str, str],
    splits: Sequence[str] | None = None,
    limit: int | None = None,
) -> Iterator[dict | BadRow]:
    """Visual-entailment rows from SNLI-VE jsonl files.

    files: split -> jsonl path. image_root: one directory/URI or split -> directory/URI of the Flickr30k
    images. limit: at most this many lines per split.
    """
    check_limit(limit)
    for split in select_splits(list(files), splits, DATASET):
        images = LastImage(FileRoot(per_split(image_root, split, "image_root")))
        with open(files[split], encoding="utf-8") as f:
            for n, line in enumerate(f):
                if limit is not None and n >= limit:
                    break
                if line.strip():
                    yield _line_row(line, n, split, f"{files[split]}:{n + 1}", images)


def _line_row(line: str, n: int, split: str, source: str, images: LastImage) -> dict | BadRow:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return BadRow(id=f"{DATASET}/{split}/line-{n}", reason=BAD_JSON, detail=str(e), source=source)
    if not isinstance(rec, dict):
        return BadRow(id=f"{DATASET}/{split}/line-{n}", reason=BAD_JSON, detail="line is not a JSON object",
                      source=source)
    row_id = f"{DATASET}/{split}/{rec.get('pairID', f'line-{n}')}"
    image_id = next((str(rec[k]) for k in _IMAGE_ID_FIELDS if rec.get(k) not in (None, "")), None)
    try:
        if image_id is None or "gold_label" not in rec:
            raise BadInput(MISSING_FIELD, "needs Flickr30K_ID/Flikr30kID, sentence1, sentence2 and gold_label")
        premise, hypothesis = record_text(rec, "sentence1"), record_text(rec, "sentence2")
    except BadInput as bad:
        return bad.bad_row(row_id, source)
    if rec["gold_label"] not in LABEL_WORDS:
        return BadRow(id=row_id, reason=UNKNOWN_LABEL, detail=f"gold_label {rec['gold_label']!r} is not one of "
                      f"{sorted(LABEL_WORDS)}", source=source)
    name = image_id if image_id.endswith(".jpg") else f"{image_id}.jpg"
    image = images.read(name, row_id, source)
    if isinstance(image, BadRow):
        return image
    return make_row(source, id=row_id, task="visual_entailment", split=split, dataset=DATASET, image=image,
                    text=hypothesis, text2=premise, target=LABEL_WORDS[rec["gold_label"]])
