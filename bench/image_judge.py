"""A judge of easy-VQA pictures: a small CNN that names an image's shape and colour (not part of the model).

`bench.text_to_image` asks it whether a generated picture shows its caption. It is trained on the real easy-VQA
train images, labelled from the converter's captions ("a <colour> <shape>"), and its own accuracy on the real
test images is the ceiling a generated picture can be judged against.

    python -m bench.image_judge            # train it and print its accuracy on the real test images
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipelines.data.converters.easyvqa import COLORS, SHAPES, caption_attributes

SIZE = 64  # easy-VQA's side


def labels_of(caption: str) -> tuple[int, int]:
    """(shape index, colour index) a caption names, e.g. "a red circle" -> (SHAPES.index("circle"), ...)."""
    colours, shapes = caption_attributes(caption)
    if len(colours) != 1 or len(shapes) != 1:
        raise ValueError(f"caption {caption!r} does not name one colour and one shape")
    return SHAPES.index(next(iter(shapes))), COLORS.index(next(iter(colours)))


def to_batch(images: Sequence[np.ndarray | bytes | Image.Image]) -> torch.Tensor:
    """(B, 3, 64, 64) floats in [0, 1] from uint8 (H, W, 3) arrays, PNG bytes or PIL images."""
    arrays = []
    for img in images:
        if isinstance(img, bytes):
            img = Image.open(io.BytesIO(img))
        if isinstance(img, Image.Image):
            img = np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        arrays.append(np.asarray(img, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


class Judge(nn.Module):
    """Four conv blocks, then one linear head for the shape and one for the colour."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, c = [], 3
        for c_out in (width, width, 2 * width, 2 * width):
            layers += [nn.Conv2d(c, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.shape, self.colour = nn.Linear(c, len(SHAPES)), nn.Linear(c, len(COLORS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.shape(h), self.colour(h)

    @torch.no_grad()
    def predict(self, images: Sequence, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(shape indices, colour indices) of images."""
        self.eval()
        shapes, colours = [], []
        for i in range(0, len(images), batch_size):
            s, c = self(to_batch(images[i:i + batch_size]))
            shapes.append(s.argmax(1).numpy())
            colours.append(c.argmax(1).numpy())
        empty = np.zeros(0, dtype=np.int64)
        return (np.concatenate(shapes) if shapes else empty), (np.concatenate(colours) if colours else empty)


@dataclass(frozen=True)
class Accuracy:
    shape: float
    colour: float
    both: float
    n: int


def accuracy(judge: Judge, images: Sequence, captions: Sequence[str]) -> Accuracy:
    """How often the judge finds each caption's shape, colour, and both, in its image."""
    want = np.array([labels_of(c) for c in captions]).reshape(-1, 2)
    shape, colour = judge.predict(images)
    ok_s, ok_c = shape == want[:, 0], colour == want[:, 1]
    n = max(len(captions), 1)
    return Accuracy(float(ok_s.sum() / n), float(ok_c.sum() / n), float((ok_s & ok_c).sum() / n), len(captions))


def blurred(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 3, S, S) images averaged over factor x factor blocks and scaled back up: the detail a tokenizer of
    factor-times-coarser codes can lose."""
    if factor == 1:
        return x
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="bilinear", align_corners=False)


def train_judge(images: Sequence, captions: Sequence[str], *, epochs: int = 12, seed: int = 0,
                batch_size: int = 64) -> Judge:
    """A Judge trained on (image, caption) pairs, with flips and blur (1x, 2x or 4x blocks) and pixel noise, so it
    judges a shape and its colour, not crisp pixels: a picture a person would call a blurry red circle counts."""
    torch.manual_seed(seed)
    x = to_batch(images)
    y = torch.tensor([labels_of(c) for c in captions])
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        judge.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            xb = x[idx]
            if torch.rand((), generator=gen) < 0.5:
                xb = xb.flip(3)
            pick = torch.randint(0, 3, (len(xb), 1, 1, 1), generator=gen)  # per image (BatchNorm sees a mix): 1, 2, 4
            xb = torch.where(pick == 1, blurred(xb, 2), torch.where(pick == 2, blurred(xb, 4), xb))
            xb = (xb + 0.03 * torch.randn(xb.shape, generator=gen)).clamp(0, 1)
            s, c = judge(xb)
            loss = F.cross_entropy(s, y[idx, 0]) + F.cross_entropy(c, y[idx, 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return judge.eval()


def package_pairs(split: str) -> tuple[list[bytes], list[str]]:
    """easy-VQA's images of `split` as PNG bytes with the caption the converter writes for each."""
    from pipelines.data.converters.easyvqa import image_attributes, package_image_paths, package_questions

    by_image: dict[int, list] = {}
    for q in package_questions(split):
        by_image.setdefault(q.image_id, []).append(q)
    images, captions = [], []
    for image_id, path in sorted(package_image_paths(split).items()):
        shape, colour, conflicts = image_attributes(by_image.get(image_id, []))
        if shape is None or colour is None or conflicts:
            continue
        with open(path, "rb") as f:
            images.append(f.read())
        captions.append(f"a {colour} {shape}")
    return images, captions


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.image_judge", description=__doc__)
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args(argv)
    t = time.perf_counter()
    train_x, train_y = package_pairs("train")
    test_x, test_y = package_pairs("test")
    judge = train_judge(train_x, train_y, epochs=args.epochs)
    acc = accuracy(judge, test_x, test_y)
    print(f"judge: {len(train_x)} train images, {args.epochs} epochs, {time.perf_counter() - t:.0f} s; on "
          f"{acc.n} real test images: shape {acc.shape:.4f}, colour {acc.colour:.4f}, both {acc.both:.4f}")
    for factor in (2, 4, 8):
        x = (blurred(to_batch(test_x), factor) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        acc = accuracy(judge, list(x), test_y)
        print(f"  the same images blurred over {factor}x{factor} blocks: shape {acc.shape:.4f}, colour "
              f"{acc.colour:.4f}, both {acc.both:.4f}")


if __name__ == "__main__":
    main()
