"""Pure preprocessing shared by training (Ray Data ``map_batches``), evaluation and serving.

Images: bytes -> validated RGB ``PIL.Image`` -> ``(3, S, S)`` uint8 pixels (``resize_pixels``: bicubic square
resize, aspect not kept) -> float tensor (``normalize_pixels``: ``(x / 255 - mean) / std``), as OFA does for caption /
VQA / entailment / grounding (the data pipeline ships the uint8 pixels and normalises later). Text: OFA's caption,
question and generic-text normalisation. Batches: padding and collation of already-tokenised samples.

The parameters live in :class:`PreprocessConfig`; every model bundle carries a complete one, so training,
evaluation and serving agree.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ofa_model import errors
from ofa_model.errors import ConfigError, InputError, check_keys, check_value

__all__ = [
    "SUPPORTED_FORMATS",
    "EmptyImageError",
    "ImageError",
    "ImageTooLargeError",
    "NotAnImageError",
    "PreprocessConfig",
    "TruncatedImageError",
    "blank_centre",
    "centre_square",
    "check_box",
    "collate",
    "decode_image",
    "grounding_train_augment",
    "normalize_caption",
    "normalize_question",
    "model_pixels",
    "normalize_pixels",
    "normalize_text",
    "pad_sequences",
    "resize_pixels",
]

# Pillow format names that decode_image accepts (multi-picture JPEGs, MPO, open through "JPEG"). An allow-list
# keeps Pillow's magic-less plugins (e.g. TGA) from "recognising" arbitrary bytes and keeps exotic decoders (EPS
# needs Ghostscript) out of a serving path.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")

# Leading bytes of the supported formats; used to tell a cut-short image header from data that is not an image.
_MAGIC_PREFIXES: tuple[bytes, ...] = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF",
)

_BICUBIC = Image.Resampling.BICUBIC
_QUESTION_LEAD = ",.!?*#:;~"
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_WS = re.compile(r"\s+")


# ---------------------------------------------------------------------------------------------------------------
# Errors


class ImageError(InputError):
    """An image could not be used. ``source`` (example id or path) is kept and named in the message.
    ``reason`` is a short code data pipelines count bad rows by."""

    reason = errors.BAD_IMAGE

    def __init__(self, what: str, source: str | None = None) -> None:
        self.what = what
        self.source = source
        super().__init__(what if source is None else f"{what} (source: {source})")


class EmptyImageError(ImageError):
    """The image payload has zero bytes."""

    reason = errors.EMPTY_IMAGE


class NotAnImageError(ImageError):
    """The bytes are not an image in a supported format (bad magic, e.g. a text file)."""

    reason = errors.NOT_AN_IMAGE


class TruncatedImageError(ImageError):
    """The image header was recognised but the file is cut short or its stream is corrupt."""

    reason = errors.TRUNCATED_IMAGE


class ImageTooLargeError(ImageError):
    """The payload exceeds ``max_image_bytes`` or the header declares more than ``max_image_pixels`` pixels."""

    reason = errors.IMAGE_TOO_LARGE


# ---------------------------------------------------------------------------------------------------------------
# Config


# Upper bounds of PreprocessConfig's integer fields (all must be >= 1): far above any OFA setting.
_INT_LIMITS: dict[str, int] = {
    "patch_image_size": 8192,
    "max_image_bytes": 2**34,
    "max_image_pixels": 2**34,
    "max_src_length": 65536,
    "max_tgt_length": 65536,
    "max_object_length": 65536,
    "max_image_size": 65536,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing parameters; saved with a model so training, evaluation and serving agree."""

    patch_image_size: int = 480
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_image_bytes: int = 32 * 2**20
    max_image_pixels: int = 64 * 2**20  # width * height limit, checked from the header before decoding
    max_src_length: int = 80  # source text length in BPE tokens (OFA --max-src-length)
    max_tgt_length: int = 30
    max_object_length: int = 30
    max_image_size: int = 512  # OFA normalises box coordinates by this (--max-image-size), not by the image size

    @property
    def box_scale(self) -> float:
        """Fraction of the location-bin range the resized image spans: patch_image_size / max_image_size."""
        return self.patch_image_size / self.max_image_size

    def __post_init__(self) -> None:
        for name, hi in _INT_LIMITS.items():
            check_value(f"PreprocessConfig.{name}", getattr(self, name), int, 1, hi)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 3:
                raise ConfigError(f"PreprocessConfig.{name} must have 3 values (R, G, B), got {value!r}")
            for i, v in enumerate(value):
                check_value(f"PreprocessConfig.{name}[{i}]", v, float, 0.0 if name == "std" else -math.inf, math.inf,
                            low_open=name == "std")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        _check_float32_normalisation(self.mean, self.std)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, complete: bool = False) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`. Unknown keys raise :class:`ConfigError`; missing keys take the defaults
        unless ``complete`` (a bundle's config must name every field), when they raise too."""
        check_keys(cls, d, "PreprocessConfig")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d)
        if complete and missing:
            raise ConfigError(f"PreprocessConfig is incomplete: missing keys {missing}")
        return cls(**d)



def _check_float32_normalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """ConfigError unless `normalize_pixels`, which computes in float32, keeps every pixel finite: each mean and std
    finite after the cast to float32, each std non-zero after it, and (x - mean) / std finite for x in [0, 1].
    (std = 1e-300 is 0 in float32 and mean = 1e308 is inf: both turned every image into inf/NaN.)"""
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        m32, s32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
        widest = np.maximum(np.abs(np.float32(0) - m32), np.abs(np.float32(1) - m32)) / s32
    for i in range(3):
        if not np.isfinite(m32[i]):
            raise ConfigError(f"PreprocessConfig.mean[{i}] {mean[i]!r} is not finite in float32 (the pixels' dtype)")
        if not np.isfinite(s32[i]) or s32[i] == 0:
            raise ConfigError(f"PreprocessConfig.std[{i}] {std[i]!r} is {float(s32[i])!r} in float32 (the pixels' "
                              "dtype); it must be finite and non-zero after the cast")
        if not np.isfinite(widest[i]):
            raise ConfigError(f"PreprocessConfig.mean[{i}] {mean[i]!r} and std[{i}] {std[i]!r} normalise pixels "
                              "(x - mean) / std beyond float32's range")


# ---------------------------------------------------------------------------------------------------------------
# Images


def _looks_like_image_start(data: bytes) -> bool:
    """True when ``data`` starts with (or is a prefix of) a supported format's magic bytes."""
    for magic in _MAGIC_PREFIXES:
        if data.startswith(magic) or (len(data) < len(magic) and magic.startswith(data)):
            return True
    return False


def _gray16_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit grayscale ('I;16*', or 'I' holding 16-bit samples) -> 8-bit RGB by scaling 0..65535 to 0..255.

    Pillow's own convert clips values above 255 instead of scaling them, which whitens almost every pixel.
    round(v / 257) is computed in integers, (v + 128) // 257 (v / 257 is never a tie): the float64 version it
    replaces held 28 bytes a pixel at its peak (449 MiB more RSS for a 4096x4096 PNG), this one 12 (see
    `decode_image`).
    """
    return Image.fromarray(_to_8bit(np.asarray(img), img.mode)).convert("RGB")  # the wide arrays are freed first


def _to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) 16-bit samples -> (H, W) uint8 round(v / 257)."""
    if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ValueError(f"32-bit integer image with values outside 0..65535 ({arr.min()}..{arr.max()})")
    scaled = arr.astype(np.uint32)
    scaled += 128
    scaled //= 257  # 65535 -> 255 exactly
    return scaled.astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any supported mode -> RGB; transparency (alpha band, palette or tRNS) is composited over white."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        if "transparency" in img.info:
            raise ValueError(f"16-bit grayscale with transparency (mode {mode!r}) is not supported")
        return _gray16_to_rgb(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    if mode in ("L", "1", "P", "CMYK", "YCbCr"):
        return img.convert("RGB")
    raise ValueError(f"unsupported image mode {mode!r}")


def decode_image(data: bytes, cfg: PreprocessConfig, source: str | None = None) -> Image.Image:
    """Decode image bytes to an RGB ``PIL.Image`` with EXIF orientation applied.

    Size limits are checked before any pixel is decoded: the payload length against ``cfg.max_image_bytes`` and
    the header's width * height against ``cfg.max_image_pixels`` (Pillow's own decompression-bomb limit,
    ``PIL.Image.MAX_IMAGE_PIXELS``, also applies). Transparent images are composited over white; palette, CMYK,
    grayscale and 16-bit grayscale are converted to RGB. Raises an :class:`ImageError` subclass naming ``source``.

    Memory: ``max_image_pixels`` is also the decoded-bytes budget. Pillow holds at most 4 bytes a pixel in any mode
    it decodes (16-bit RGB PNG and TIFF are reduced to 8 bits while decoding), so no image costs more than
    ``4 * max_image_pixels`` bytes once decoded, and a separate byte budget from the header's bit depth would only
    refuse images that cost no more than 8-bit ones. Peak RSS of one call, measured on 8192x8192 PNGs (64 Mi
    pixels, the default limit): +515 MiB for 8-bit or 16-bit RGB, +705 MiB for 16-bit grayscale (11 bytes a
    pixel; 1.8 GB before its conversion used integers). Size a process for about 11 x max_image_pixels bytes per
    image decoded at once.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"image data must be bytes, got {type(data).__name__}"
                        + ("" if source is None else f" (source: {source})"))
    data = bytes(data)
    if len(data) == 0:
        raise EmptyImageError("image payload is empty (0 bytes)", source)
    if len(data) > cfg.max_image_bytes:
        raise ImageTooLargeError(
            f"image payload is {len(data)} bytes, over max_image_bytes={cfg.max_image_bytes}", source)

    try:
        img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image header declares too many pixels: {e}", source) from e
    except UnidentifiedImageError as e:
        if _looks_like_image_start(data):
            raise TruncatedImageError(
                f"image header is unreadable (cut short or corrupt; {len(data)} bytes)", source) from e
        raise NotAnImageError(
            f"bytes are not an image in a supported format {list(SUPPORTED_FORMATS)} "
            f"(first bytes {data[:8]!r})", source) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise TruncatedImageError(f"image header is cut short or corrupt: {type(e).__name__}: {e}", source) from e

    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise TruncatedImageError(f"image header declares an empty size {width}x{height}", source)
        if width * height > cfg.max_image_pixels:
            raise ImageTooLargeError(
                f"image header declares {width}x{height} = {width * height} pixels, "
                f"over max_image_pixels={cfg.max_image_pixels}", source)
        try:
            img.load()
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"image declares too many pixels: {e}", source) from e
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
            raise TruncatedImageError(
                f"{img.format} image is truncated or corrupt ({len(data)} bytes): {type(e).__name__}: {e}",
                source) from e
        try:
            oriented = ImageOps.exif_transpose(img)  # always a new image
        except Exception as e:  # malformed EXIF blocks raise a variety of errors inside Pillow
            raise TruncatedImageError(f"{img.format} image has corrupt EXIF data: {e}", source) from e
    try:
        return _to_rgb(oriented)
    except ValueError as e:
        raise ImageError(f"{e} (format {img.format})", source) from e


def resize_pixels(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """RGB image -> ``(3, S, S)`` uint8 pixels, S = ``cfg.patch_image_size``: bicubic resize to S x S (aspect ratio
    not kept, as OFA; an S x S image is used as is). Then :func:`normalize_pixels`."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image (see decode_image), got mode {img.mode!r}")
    size = cfg.patch_image_size
    if img.size != (size, size):
        img = img.resize((size, size), _BICUBIC)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, S, S)


def normalize_pixels(pixels: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 pixels ``(..., 3, S, S)`` -> float32 ``(x / 255 - mean) / std`` per channel (a new tensor), after
    :func:`resize_pixels`. Elementwise, so a batch gives exactly the values of its images one by one."""
    if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8:
        what = pixels.dtype if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"normalize_pixels expects a uint8 tensor, got {what}")
    if pixels.ndim < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"normalize_pixels expects shape (..., 3, S, S), got {tuple(pixels.shape)}")
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)
    return pixels.float().div_(255.0).sub_(mean).div_(std).contiguous()


def model_pixels(pixels: torch.Tensor, cfg: PreprocessConfig, *, blank: bool = False) -> torch.Tensor:
    """uint8 pixels ``(..., 3, S, S)`` -> the float32 model input: :func:`normalize_pixels`, then, for image
    infilling (``blank``), :func:`blank_centre`. The one path from resized pixels to what the model sees, for
    a sample built here and for uint8 pixels shipped by the data pipeline."""
    images = normalize_pixels(pixels, cfg)
    return blank_centre(images) if blank else images


def blank_centre(images: torch.Tensor) -> torch.Tensor:
    """Zero the centre square [S/4, 3S/4) of ``(..., 3, S, S)`` images in place (image infilling); returns them."""
    lo, hi = centre_square(images.shape[-1])
    images[..., lo:hi, lo:hi] = 0
    return images


def centre_square(side: int) -> tuple[int, int]:
    """[lo, hi): the centre square of a side x side image that image infilling blanks in the input and predicts
    as codes (OFA: the 128 px centre of a 256 px image)."""
    return side // 4, side * 3 // 4


def check_box(value: Any, where: str = "box") -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) as floats from 4 finite numbers (or numeric strings, as text formats hold them) with
    x0 < x1 and y0 < y1: the one check of a box in data, for every task and reader. ``InputError`` (bad_box)
    naming ``where`` otherwise."""
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else []
    if len(values) != 4 or any(isinstance(v, (bool, np.bool_)) for v in values):
        raise InputError(f"{where} must be 4 numbers x0, y0, x1, y1, got {value!r}", errors.BAD_BOX)
    try:
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"{where} must be 4 numbers x0, y0, x1, y1, got {value!r}", errors.BAD_BOX) from None
    if not all(math.isfinite(v) for v in box) or box[0] >= box[2] or box[1] >= box[3]:
        raise InputError(f"{where} must be finite x0, y0, x1, y1 with x1 > x0 and y1 > y0, got {value!r}",
                         errors.BAD_BOX)
    return box


def _as_boxes(boxes: Any) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4) as x0, y0, x1, y1; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"boxes must be finite, got {arr.tolist()}")
    return arr


def grounding_train_augment(img: Image.Image, box: np.ndarray, cfg: PreprocessConfig,
                            rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """Scale-jitter + random crop for visual grounding that always keeps the whole box.

    A crop window covering a random fraction s ~ U[0.8, 1.0] of each image side (widened where needed to contain
    the box) is placed at a random integer offset that keeps the box inside, then resized bicubically to S x S,
    S = ``cfg.patch_image_size``. Equivalently: resize by S/s (so the crop side is S) and crop S x S around the
    box, as OFA's ObjectCenterCrop. No horizontal flip (the text may say left/right). ``box`` (4,) x0, y0, x1, y1
    in ``img`` pixels; it may stick out of the image by at most 1 px (it is clipped). Returns the S x S image and
    the (4,) float64 box in its pixels. Deterministic given ``rng``.
    """
    arr = _as_boxes(np.asarray(box, dtype=np.float64).reshape(1, -1) if np.ndim(box) == 1 else box)
    if arr.shape[0] != 1:
        raise ValueError(f"grounding_train_augment takes one box of 4 values, got shape {np.shape(box)}")
    x0, y0, x1, y1 = arr[0]
    width, height = img.size
    if x0 < -1 or y0 < -1 or x1 > width + 1 or y1 > height + 1:
        raise InputError(f"box {arr[0].tolist()} lies outside the {width}x{height} image", errors.BAD_BOX)
    x0, x1 = max(x0, 0.0), min(x1, float(width))
    y0, y1 = max(y0, 0.0), min(y1, float(height))
    if not (x1 > x0 and y1 > y0):
        raise InputError(f"box {arr[0].tolist()} is empty inside the {width}x{height} image", errors.BAD_BOX)

    frac = rng.uniform(0.8, 1.0)

    def window(lo: float, hi: float, side: int) -> tuple[int, int]:
        """Integer crop (start, length) along one axis that contains [lo, hi] and spans ~frac of the side."""
        need = math.ceil(hi) - math.floor(lo)
        length = min(side, max(math.ceil(frac * side), need))
        first = max(0, math.ceil(hi) - length)
        last = min(math.floor(lo), side - length)
        return int(rng.integers(first, last + 1)), length

    left, crop_w = window(x0, x1, width)
    top, crop_h = window(y0, y1, height)
    size = cfg.patch_image_size
    out = img.resize((size, size), _BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    sx, sy = size / crop_w, size / crop_h
    new_box = np.array([(x0 - left) * sx, (y0 - top) * sy, (x1 - left) * sx, (y1 - top) * sy])
    return out, np.clip(new_box, 0.0, float(size))


# ---------------------------------------------------------------------------------------------------------------
# Text


def _check_max_words(max_words: int | None) -> None:
    if max_words is not None and (isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 0):
        raise ValueError(f"max_words must be a non-negative int or None, got {max_words!r}")


def _first_words(text: str, max_words: int | None) -> str:
    if max_words is None:
        return text
    return " ".join(text.split(" ")[:max_words]) if text else text


def normalize_caption(text: str, max_words: int | None = None) -> str:
    """OFA caption target text: lowercase, drop ``string.punctuation``, collapse whitespace, keep ``max_words``."""
    _check_max_words(max_words)
    words = text.lower().translate(_PUNCT_TABLE).split()
    return " ".join(words if max_words is None else words[:max_words])


def _pre_text(text: str) -> str:
    """Shared body of OFA's pre_caption / pre_question: lowercase, strip leading ``,.!?*#:;~``, '-' and '/' to
    spaces, whitespace runs to one space, trim."""
    text = text.lower().lstrip(_QUESTION_LEAD).replace("-", " ").replace("/", " ")
    return _WS.sub(" ", text).strip()


def normalize_text(text: str, max_words: int | None = None) -> str:
    """OFA ``pre_caption`` (grounding, entailment, GLUE text): see :func:`_pre_text`, then keep ``max_words``."""
    _check_max_words(max_words)
    return _first_words(_pre_text(text), max_words)


def normalize_question(text: str, max_words: int | None = None) -> str:
    """OFA VQA question: ``pre_question`` normalisation, keep ``max_words`` words, then append '?' if missing.

    Raises ``ValueError`` when nothing is left of the question.
    """
    _check_max_words(max_words)
    question = _first_words(_pre_text(text), max_words)
    if not question:
        raise ValueError(f"question is empty after normalisation: {text!r}")
    return question if question.endswith("?") else question + "?"


# ---------------------------------------------------------------------------------------------------------------
# Batching


def pad_sequences(seqs: list[list[int]], pad_id: int, max_len: int | None = None,
                  left: bool = False) -> torch.Tensor:
    """Pad token lists to ``(B, T)`` int64, T = ``max_len`` if given else the longest; ``left`` pads on the left.

    A sequence longer than ``max_len`` raises ``ValueError`` (nothing is truncated silently).
    """
    if len(seqs) == 0:
        raise ValueError("pad_sequences needs at least one sequence")
    lengths = [len(s) for s in seqs]
    width = max(lengths) if max_len is None else max_len
    if max_len is not None and max(lengths) > max_len:
        i = int(np.argmax(lengths))
        raise ValueError(f"sequence {i} has {lengths[i]} tokens, over max_len={max_len}")
    out = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    for i, seq in enumerate(seqs):
        if len(seq) == 0:
            continue
        values = torch.as_tensor(seq, dtype=torch.int64)
        if left:
            out[i, width - len(seq):] = values
        else:
            out[i, : len(seq)] = values
    return out


def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch tokenised samples into model inputs.

    Each sample has ``source`` (``<s> ... </s>`` ids), ``prev_output`` and ``target`` (same length), optionally
    ``image`` (``(3, S, S)`` tensor or None), ``target_weight`` (float, default 1.0), ``code_mask`` (bool,
    default False); other keys are ignored. Returns ``src_tokens`` (B, S_src), ``src_lengths`` (B,),
    ``patch_images`` (B, 3, S, S) zeros where absent and ``patch_masks`` (B,) bool (both omitted when no sample has
    an image), ``prev_output_tokens`` and ``target`` (B, T) right-padded with ``pad_id``, ``target_weights`` (B,)
    float32, ``code_masks`` (B,) bool, ``ntokens`` (scalar int64: non-pad target tokens).
    """
    if len(samples) == 0:
        raise ValueError("collate needs at least one sample")
    for i, s in enumerate(samples):
        missing = [k for k in ("source", "prev_output", "target") if k not in s]
        if missing:
            raise ValueError(f"sample {i} lacks {missing}; it has {sorted(s)}")
        if len(s["prev_output"]) != len(s["target"]):
            raise ValueError(f"sample {i}: prev_output has {len(s['prev_output'])} tokens but target has "
                             f"{len(s['target'])}; they must align position by position")

    batch: dict[str, torch.Tensor] = {
        "src_tokens": pad_sequences([s["source"] for s in samples], pad_id),
        "src_lengths": torch.tensor([len(s["source"]) for s in samples], dtype=torch.int64),
    }

    images = [s.get("image") for s in samples]
    present = [i for i, im in enumerate(images) if im is not None]
    if present:
        ref = images[present[0]]
        for i in present:
            im = images[i]
            if not isinstance(im, torch.Tensor) or im.ndim != 3 or im.shape[0] != 3:
                raise ValueError(f"sample {i}: image must be a (3, S, S) tensor, got "
                                 f"{tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__}")
            if im.shape != ref.shape or im.dtype != ref.dtype:
                raise ValueError(f"mixed image shapes/dtypes in one batch: sample {present[0]} has "
                                 f"{tuple(ref.shape)} {ref.dtype}, sample {i} has {tuple(im.shape)} {im.dtype}")
        zeros = torch.zeros_like(ref)
        batch["patch_images"] = torch.stack([zeros if im is None else im for im in images])
        batch["patch_masks"] = torch.tensor([im is not None for im in images], dtype=torch.bool)

    target = pad_sequences([s["target"] for s in samples], pad_id)
    batch["prev_output_tokens"] = pad_sequences([s["prev_output"] for s in samples], pad_id)
    batch["target"] = target
    batch["target_weights"] = torch.tensor([float(s.get("target_weight", 1.0)) for s in samples],
                                           dtype=torch.float32)
    batch["code_masks"] = torch.tensor([bool(s.get("code_mask", False)) for s in samples], dtype=torch.bool)
    batch["ntokens"] = (target != pad_id).sum()
    return batch
