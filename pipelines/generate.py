"""Images from a caption on the command line (`python -m jobs.generate_images`): the predictor's text_to_image
answer written as PNG files, best first, with their scores in images.json.

The model is any source `resolve_model` takes (a bundle directory, s3://bucket/prefix, models:/name@alias); its
bundle must carry an image tokenizer. Decoding, limits and ranking are `OFAPredictor`'s.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ofa_model.errors import InputError
from ofa_model.predictor import OFAPredictor
from pipelines.tracking.registry import resolve_model

logger = logging.getLogger(__name__)

IMAGES_JSON = "images.json"


@dataclass(frozen=True)
class GeneratedImages:
    output: str  # the directory written
    files: list[str]  # PNG paths, best first
    images: list[dict[str, Any]]  # per image: file, rank, itm_score, logprob


def generate_images(model: str, text: str, output: str | Path, *, settings: Mapping[str, Any] | None = None,
                    device: str = "cpu", tracking: str | None = None) -> GeneratedImages:
    """Generate images of `text` with `model` and write them into directory `output` as rank01.png, rank02.png,
    ... and images.json. `settings`: the predictor's text_to_image input fields (num_samples, top_k, top_p,
    temperature, seed). A caption or setting the predictor refuses, or a model without an image tokenizer, is an
    InputError, raised before anything is written. An `output` that cannot be a writable directory is an OSError
    before the model is loaded. Rank files of an earlier run there that this run does not write are removed, so
    the directory holds exactly this run's images."""
    out = _check_output(Path(output))
    predictor = OFAPredictor.from_bundle(resolve_model(model, tracking=tracking).path, device=device)
    [result] = predictor.predict("text_to_image", [{**(settings or {}), "text": text}])
    if "error" in result:
        raise InputError(result["error"]["message"], result["error"]["reason"])
    out.mkdir(parents=True, exist_ok=True)
    files, images = [], []
    for image in result["images"]:
        path = out / f"rank{image['rank']:02d}.png"
        path.write_bytes(base64.b64decode(image["png"]))
        files.append(str(path))
        images.append({"file": path.name, **{k: v for k, v in image.items() if k != "png"}})
    for stale in sorted(set(out.glob("rank[0-9][0-9].png")) - {Path(f) for f in files}):
        stale.unlink()
    (out / IMAGES_JSON).write_text(json.dumps({"model": model, "text": text, "width": result["width"],
                                               "height": result["height"], "images": images}, indent=2))
    logger.info("wrote %d images of %dx%d px to %s", len(files), result["width"], result["height"], out)
    return GeneratedImages(str(out), files, images)


def _check_output(out: Path) -> Path:
    """`out` when it is, or can be made as, a writable directory; OSError naming the path otherwise."""
    if out.exists() and not out.is_dir():
        raise OSError(f"{out} exists and is not a directory")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OSError(f"{existing} is not a writable directory, so {out} cannot be written")
    return out
