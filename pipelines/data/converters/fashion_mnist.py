"""Fashion-MNIST idx files -> image_classification (and optional caption) rows.

Files: <data_dir>/{train,t10k}-images-idx3-ubyte[.gz] and -labels-idx1-ubyte[.gz] (the Debian package
`dataset-fashion-mnist` installs them in /usr/share/datasets/fashion-mnist). Split "train" reads
train-*, "test" reads t10k-*. Images are stored as 28x28 grayscale PNG bytes. Rows:
image_classification, id "fashion-mnist/<split>/image_classification/<n>" (n = index in the file),
target = the class name; with captions=True also caption, id ".../caption/<n>", target "a photo of a
<class>" ("an" before a vowel). Class names are the official ones, lowercased, with "T-shirt/top" as
"t-shirt" so that it reads as a word.
"""

import gzip
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ofa_model.errors import UNKNOWN_LABEL
from pipelines.data.converters._common import check_limit, select_splits
from pipelines.data.readers.rows import BadRow, make_row

DATASET = "fashion-mnist"
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
FILE_PREFIX = {"train": "train", "test": "t10k"}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """The uint8 array of an idx file (gzip-compressed when the name ends in .gz); shape from its header."""
    path = Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        raise ValueError(f"{path}: not an idx file with magic {magic:#010x}")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes), body has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(f"neither {stem}.gz nor {stem} in {data_dir} "
                            "(apt-get install dataset-fashion-mnist, or pass data_dir)")


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a (H, W) uint8 grayscale image."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def photo_caption(name: str) -> str:
    """'a photo of a <name>' with "an" before a vowel."""
    return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


def convert_fashion_mnist(
    *,
    data_dir: str = DEFAULT_DIR,
    captions: bool = False,
    splits: Sequence[str] | None = None,
    limit: int | None = None,
) -> Iterator[dict | BadRow]:
    """Fashion-MNIST rows (see the module docstring). limit: at most this many images per split."""
    check_limit(limit)
    root = Path(data_dir)
    for split in select_splits(list(FILE_PREFIX), splits, DATASET):
        prefix = FILE_PREFIX[split]
        images_path = _find(root, f"{prefix}-images-idx3-ubyte")
        labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_path, IDX_IMAGES_MAGIC), read_idx(labels_path, IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
        count = len(images) if limit is None else min(limit, len(images))
        for n in range(count):
            key, label, source = f"{DATASET}/{split}", int(labels[n]), f"{labels_path}[{n}]"
            if label >= len(CLASS_NAMES):
                yield BadRow(id=f"{key}/image_classification/{n}", reason=UNKNOWN_LABEL,
                             detail=f"label {label} is not in 0..{len(CLASS_NAMES) - 1}", source=source)
                continue
            png, name = encode_png(images[n]), CLASS_NAMES[label]
            yield make_row(source, id=f"{key}/image_classification/{n}", task="image_classification", split=split,
                           dataset=DATASET, image=png, target=name)
            if captions:
                yield make_row(source, id=f"{key}/caption/{n}", task="caption", split=split, dataset=DATASET, image=png,
                               target=photo_caption(name), targets=[photo_caption(name)])
