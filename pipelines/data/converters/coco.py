"""COCO captions (annotations/captions_<split><year>.json) -> caption rows.

Input per split: the captions JSON ({"images": [{"id", "file_name"}], "annotations": [{"id"?,
"image_id", "caption"}]}) and the directory (or URI) holding the images by file_name.
Split "train": one row per caption, id "<dataset>/train/<annotation id>" (the caption's index among
its image's captions, "<image id>.<k>", when the file has no annotation ids), target = the caption.
Any other split: one row per image, id "<dataset>/<split>/<image id>", targets = all its captions in
file order, target = the first. Captions have whitespace runs collapsed; nothing else is changed.
"""

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence

from ofa_model.errors import BAD_FORMAT, EMPTY_TEXT, MISSING_FIELD, UNKNOWN_IMAGE
from pipelines.data.converters._common import (
    FileRoot,
    LastImage,
    check_limit,
    load_json,
    per_split,
    record_text,
    select_splits,
)
from pipelines.data.readers.rows import BadInput, BadRow, make_row


def convert_coco(
    *,
    annotations: Mapping[str, str],
    image_root: str | Mapping[str, str],
    splits: Sequence[str] | None = None,
    limit: int | None = None,
    dataset: str = "coco",
) -> Iterator[dict | BadRow]:
    """Caption rows from COCO captions JSON files.

    annotations: split -> captions JSON path. image_root: one directory/URI for every split, or
    split -> directory/URI. limit: at most this many images per split (in the JSON's image order).
    """
    check_limit(limit)
    for split in select_splits(list(annotations), splits, dataset):
        path = annotations[split]
        data = load_json(path, "COCO captions file")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list
        ):
            raise ValueError(f"COCO captions file {path} needs top-level 'images' and 'annotations' lists")
        images = LastImage(FileRoot(per_split(image_root, split, "image_root")))
        yield from _split_rows(data, split, path, images, limit, dataset)


def _split_rows(
    data: dict, split: str, path: str, images: LastImage, limit: int | None, dataset: str
) -> Iterator[dict | BadRow]:
    file_names: dict[int, str] = {}
    order: list[int] = []
    for n, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            yield BadRow(id=f"{dataset}/{split}/image-entry-{n}", reason=MISSING_FIELD,
                         detail="image entry needs 'id' and 'file_name'", source=f"{path}: images[{n}]")
            continue
        file_names[im["id"]] = im["file_name"]
        order.append(im["id"])
    captions: dict[int, list[tuple[str, str]]] = defaultdict(list)  # image id -> [(caption key, caption)]
    for n, ann in enumerate(data["annotations"]):
        source = f"{path}: annotations[{n}]"
        if not isinstance(ann, dict):
            yield BadRow(id=f"{dataset}/{split}/annotation-{n}", reason=BAD_FORMAT,
                         detail=f"annotation is a {type(ann).__name__}, not an object", source=source)
            continue
        image_id = ann.get("image_id")
        try:
            if image_id is None:
                raise BadInput(MISSING_FIELD, "annotation has no 'image_id'")
            caption = record_text(ann, "caption")
        except BadInput as bad:
            yield bad.bad_row(f"{dataset}/{split}/{ann.get('id', f'annotation-{n}')}", source)
            continue
        key = str(ann["id"]) if "id" in ann else f"{image_id}.{len(captions[image_id])}"
        if image_id not in file_names:
            yield BadRow(id=f"{dataset}/{split}/{key}", reason=UNKNOWN_IMAGE,
                         detail=f"image_id {image_id} is not in 'images'", source=source)
            continue
        captions[image_id].append((key, caption))
    for image_id in order[:limit] if limit is not None else order:
        name = file_names[image_id]
        source = f"{path}: image {image_id}"
        if split == "train":
            for key, caption in captions.get(image_id, []):
                image = images.read(name, f"{dataset}/{split}/{key}", source)
                if isinstance(image, BadRow):
                    yield image
                    continue
                yield make_row(source, id=f"{dataset}/{split}/{key}", task="caption", split=split, dataset=dataset,
                               image=image, target=caption)
            continue
        row_id = f"{dataset}/{split}/{image_id}"
        refs = [c for _, c in captions.get(image_id, [])]
        if not refs:
            yield BadRow(id=row_id, reason=EMPTY_TEXT, detail="evaluation image without any caption", source=source)
            continue
        image = images.read(name, row_id, source)
        if isinstance(image, BadRow):
            yield image
            continue
        yield make_row(source, id=row_id, task="caption", split=split, dataset=dataset, image=image, target=refs[0],
                       targets=refs)
