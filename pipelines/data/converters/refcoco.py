"""RefCOCO / RefCOCO+ / RefCOCOg (refs + instances.json + COCO images) -> grounding rows.

refs: a JSON list of {ref_id, ann_id, image_id, split, sentences: [{sent}]}, or the original release's
pickle (refs(unc).p, refs(google).p), which is read with an unpickler that refuses every class and
function reference, so only plain lists, dicts, strings and numbers load (no code can run). instances:
{"images": [{id, file_name}], "annotations": [{id, bbox: [x, y, w, h]}]}.
One row per sentence: id "<dataset>/<split>/<ref_id>/<k>" (k = the sentence's index), text = the
sentence, box = [x, y, x + w, y + h] in pixels. Splits are the refs' own ("train", "val", "test",
"testA", "testB").
"""

import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path

from ofa_model.errors import BAD_BOX, BAD_FORMAT, MISSING_ANNOTATION, MISSING_FIELD, UNKNOWN_IMAGE
from pipelines.data.converters._common import (
    FileRoot,
    LastImage,
    check_limit,
    load_json,
    record_text,
    select_splits,
)
from pipelines.data.readers.rows import BadInput, BadRow, check_box, make_row


class _PlainDataUnpickler(pickle.Unpickler):
    """Loads only pickle's built-in containers and scalars: every global (class, function) is refused."""

    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(
            f"refs pickle references {module}.{name}; only plain lists/dicts/strings/numbers are accepted"
        )


def load_refs(path: str | Path) -> list[dict]:
    """The refs list from a .json file or, safely, from the original pickle (any other suffix)."""
    path = Path(path)
    if path.suffix == ".json":
        refs = load_json(path, "refs file")
    else:
        with open(path, "rb") as f:
            unpickler = _PlainDataUnpickler(f, encoding="utf-8")
            try:
                refs = unpickler.load()
            except Exception as e:  # any failure of a garbage or hostile pickle: report it with the path
                raise ValueError(f"refs file {path} is neither JSON (.json) nor a plain-data pickle: {e}") from e
    if not isinstance(refs, list):
        raise ValueError(f"refs file {path} must hold a list of refs, got {type(refs).__name__}")
    return refs


def xywh_to_xyxy(bbox: object) -> list[float]:
    """[x, y, w, h] -> [x0, y0, x1, y1]; BadInput "bad_box" unless 4 finite numbers with w, h > 0."""
    if not isinstance(bbox, list | tuple) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                      for v in bbox) or len(bbox) != 4:
        raise BadInput(BAD_BOX, f"bbox {bbox!r} is not 4 numbers [x, y, w, h]")
    x, y, w, h = (float(v) for v in bbox)
    return check_box([x, y, x + w, y + h], f"bbox {list(bbox)!r} as [x0, y0, x1, y1]")


def convert_refcoco(
    *,
    refs: str,
    instances: str,
    image_root: str,
    dataset: str = "refcoco",
    splits: Sequence[str] | None = None,
    limit: int | None = None,
) -> Iterator[dict | BadRow]:
    """Grounding rows, one per referring sentence.

    refs: refs JSON or pickle path. instances: instances.json path. image_root: directory/URI of the
    COCO images named by the instances' file_name. dataset: "refcoco", "refcoco+" or "refcocog" (ids,
    dataset field). limit: at most this many refs per split, in file order.
    """
    check_limit(limit)
    all_refs = load_refs(refs)
    inst = load_json(instances, "instances file")
    if not isinstance(inst, dict) or not isinstance(inst.get("images"), list) or not isinstance(
        inst.get("annotations"), list
    ):
        raise ValueError(f"instances file {instances} needs top-level 'images' and 'annotations' lists")
    file_names = {im["id"]: im.get("file_name") for im in inst["images"] if isinstance(im, dict) and "id" in im}
    boxes = {a["id"]: a.get("bbox") for a in inst["annotations"] if isinstance(a, dict) and "id" in a}
    available = list(dict.fromkeys(r.get("split") for r in all_refs if isinstance(r, dict) and r.get("split")))
    images = LastImage(FileRoot(image_root))
    for split in select_splits(available, splits, dataset):
        chosen = [(n, r) for n, r in enumerate(all_refs) if isinstance(r, dict) and r.get("split") == split]
        for n, ref in chosen[:limit] if limit is not None else chosen:
            yield from _ref_rows(ref, n, split, dataset, file_names, boxes, images, str(refs))


def _ref_rows(
    ref: dict, n: int, split: str, dataset: str, file_names: dict, boxes: dict, images: LastImage, refs_path: str
) -> Iterator[dict | BadRow]:
    source = f"{refs_path}: refs[{n}]"
    ref_key = ref.get("ref_id", f"ref-{n}")
    base_id = f"{dataset}/{split}/{ref_key}"
    sentences = ref.get("sentences")
    if "ref_id" not in ref or "ann_id" not in ref or "image_id" not in ref or not isinstance(sentences, list):
        yield BadRow(id=base_id, reason=MISSING_FIELD, detail="ref needs ref_id, ann_id, image_id and a "
                     "sentences list", source=source)
        return
    if ref["ann_id"] not in boxes:
        yield BadRow(id=base_id, reason=MISSING_ANNOTATION, detail=f"ann_id {ref['ann_id']} is not in the "
                     "instances", source=source)
        return
    try:
        box = xywh_to_xyxy(boxes[ref["ann_id"]])
    except BadInput as bad:
        yield bad.bad_row(base_id, source)
        return
    name = file_names.get(ref["image_id"])
    if not isinstance(name, str):
        yield BadRow(id=base_id, reason=UNKNOWN_IMAGE, detail=f"image_id {ref['image_id']} has no file_name in "
                     "the instances", source=source)
        return
    for k, sentence in enumerate(sentences):
        row_id = f"{base_id}/{k}"
        if not isinstance(sentence, dict):
            yield BadRow(id=row_id, reason=BAD_FORMAT, detail=f"sentence is a {type(sentence).__name__}, not an "
                         "object", source=source)
            continue
        try:
            text = record_text(sentence, "sent")
        except BadInput as bad:
            yield bad.bad_row(row_id, source)
            continue
        image = images.read(name, row_id, source)
        if isinstance(image, BadRow):
            yield image
            continue
        yield make_row(source, id=row_id, task="grounding", split=split, dataset=dataset, image=image, text=text,
                       box=list(box))

