"""ImageNet-style class folders (<root>/<class folder>/<image file>) -> image_classification rows.

One row per image file, classes and files in sorted order: id "<dataset>/<split>/<class folder>/<file
name>", target = the class folder name with "_" replaced by " " ("rugby_ball" -> "rugby ball"), or
its entry in a class-name map JSON ({"n04118538": "rugby ball", ...}) when one is given. Files in the
root itself are ignored; files with a non-image extension and folders missing from the map are BadRows.
"""

import json
from collections.abc import Iterator, Mapping, Sequence

from ofa_model.errors import UNKNOWN_LABEL, UNSUPPORTED_FILE
from pipelines.data.converters._common import FileRoot, check_limit, read_image, select_splits, take
from pipelines.data.readers.rows import BadRow, make_row
from pipelines.data.schema import IMAGE_EXTENSIONS


def load_class_names(path: str) -> dict[str, str]:
    """A {folder name: class name} map from a JSON object of strings."""
    with open(path, encoding="utf-8") as f:
        names = json.load(f)
    if not isinstance(names, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise ValueError(f"class-name map {path} must be a JSON object of folder name -> class name strings")
    return names


def convert_imagefolder(
    *,
    roots: Mapping[str, str],
    class_names: str | None = None,
    dataset: str = "imagefolder",
    splits: Sequence[str] | None = None,
    limit: int | None = None,
) -> Iterator[dict | BadRow]:
    """Image-classification rows from class folders.

    roots: split -> directory/URI holding one folder per class. class_names: optional JSON map path.
    dataset: the dataset name in ids and rows. limit: at most this many files per split.
    """
    check_limit(limit)
    names = load_class_names(class_names) if class_names else None
    for split in select_splits(list(roots), splits, dataset):
        root = FileRoot(roots[split])
        if not root.is_dir():
            raise FileNotFoundError(f"{dataset}: image folder root {roots[split]!r} for split {split!r} is not a directory")
        for folder, file_name in take(_class_files(root), limit):
            yield _file_row(root, folder, file_name, split, dataset, names)


def _class_files(root: FileRoot) -> Iterator[tuple[str, str]]:
    """(class folder, file name) of every file one level below the class folders, sorted."""
    for folder, is_dir in root.listdir():
        if is_dir:
            for file_name, file_is_dir in root.listdir(folder):
                if not file_is_dir:
                    yield folder, file_name


def _file_row(
    root: FileRoot, folder: str, file_name: str, split: str, dataset: str, names: dict[str, str] | None
) -> dict | BadRow:
    row_id = f"{dataset}/{split}/{folder}/{file_name}"
    source = root.path(f"{folder}/{file_name}")
    stem, dot, extension = file_name.rpartition(".")
    if not (dot and stem) or extension.lower() not in IMAGE_EXTENSIONS:
        return BadRow(id=row_id, reason=UNSUPPORTED_FILE, detail=f"extension is not one of {IMAGE_EXTENSIONS}",
                      source=source)
    if names is not None and folder not in names:
        return BadRow(id=row_id, reason=UNKNOWN_LABEL, detail=f"class folder {folder!r} is not in the class-name map",
                      source=source)
    label = names[folder] if names is not None else folder.replace("_", " ")
    image = read_image(root, f"{folder}/{file_name}", row_id, source)
    if isinstance(image, BadRow):
        return image
    return make_row(source, id=row_id, task="image_classification", split=split, dataset=dataset, image=image, target=label)
