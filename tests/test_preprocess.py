"""Tests for ofa_model.preprocess: image decoding and its errors, tensors, boxes, text normalisation, collation."""

from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ofa_model.errors import ConfigError, InputError
from ofa_model.preprocess import (
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    NotAnImageError,
    PreprocessConfig,
    TruncatedImageError,
    blank_centre,
    collate,
    decode_image,
    grounding_train_augment,
    normalize_caption,
    normalize_pixels,
    normalize_question,
    normalize_text,
    pad_sequences,
    resize_pixels,
)

CFG = PreprocessConfig(patch_image_size=8)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise_image(size: tuple[int, int] = (32, 32), seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid signature, an IHDR (8-bit RGB) with a correct CRC, and IEND -- no pixel data at all."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(img.getpixel(xy))


# ---------------------------------------------------------------------------------------------------------------
# Bad images


def test_empty_bytes():
    with pytest.raises(EmptyImageError, match="empty") as err:
        decode_image(b"", CFG, source="ex-1")
    assert err.value.source == "ex-1"
    assert "ex-1" in str(err.value)


def test_text_file_is_not_an_image():
    with pytest.raises(NotAnImageError, match="not an image") as err:
        decode_image(b"hello world, this is a text file\n", CFG, source="notes.txt")
    assert "notes.txt" in str(err.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_stream(fmt):
    data = encode(noise_image(), fmt)
    with pytest.raises(TruncatedImageError, match="truncated or corrupt") as err:
        decode_image(data[: len(data) // 2], CFG, source="id-9")
    assert "id-9" in str(err.value)


@pytest.mark.parametrize("fmt, keep", [("PNG", 20), ("PNG", 4), ("JPEG", 2)])
def test_truncated_header(fmt, keep):
    data = encode(noise_image(), fmt)
    with pytest.raises(TruncatedImageError, match="header"):
        decode_image(data[:keep], CFG)


def test_corrupt_png_stream():
    data = bytearray(encode(noise_image(), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start: start + 40] = bytes(40)  # zero out the start of the deflate stream
    with pytest.raises(TruncatedImageError):
        decode_image(bytes(data), CFG)


def test_bytes_over_limit():
    data = encode(noise_image((8, 8)), "PNG")
    cfg = PreprocessConfig(patch_image_size=8, max_image_bytes=len(data) - 1)
    with pytest.raises(ImageTooLargeError, match=f"{len(data)} bytes"):
        decode_image(data, cfg, source="big")
    ok = PreprocessConfig(patch_image_size=8, max_image_bytes=len(data))
    assert decode_image(data, ok).size == (8, 8)


@pytest.mark.parametrize("side", [30000, 9000])
def test_header_declared_pixel_bomb_fails_fast_without_decoding(side):
    # 30000^2 trips Pillow's own bomb guard inside Image.open; 9000^2 = 81M passes Pillow's but not our 64 Mi limit.
    # The file has no IDAT: reaching the decoder would give TruncatedImageError, so the type proves the order.
    data = png_header_only(side, side)
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="pixels") as err:
        decode_image(data, PreprocessConfig(), source="bomb.png")
    assert time.perf_counter() - t0 < 0.5
    assert "bomb.png" in str(err.value)


def test_pixel_limit_from_config():
    data = encode(noise_image((20, 20)), "PNG")
    with pytest.raises(ImageTooLargeError, match="20x20 = 400 pixels"):
        decode_image(data, PreprocessConfig(patch_image_size=8, max_image_pixels=399))
    assert decode_image(data, PreprocessConfig(patch_image_size=8, max_image_pixels=400)).size == (20, 20)


def test_error_hierarchy():
    for cls in (EmptyImageError, NotAnImageError, TruncatedImageError, ImageTooLargeError):
        assert issubclass(cls, ImageError) and issubclass(cls, ValueError)
    assert str(ImageError("bad")) == "bad"


# ---------------------------------------------------------------------------------------------------------------
# Modes and orientation


def test_exif_orientation_6_png():
    img = Image.new("RGB", (4, 2), (0, 0, 255))
    img.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    out = decode_image(encode(img, "PNG", exif=exif), CFG)
    assert out.size == (2, 4)
    # (x, y) -> (H - 1 - y, x): the stored top-left pixel ends at the top-right.
    assert pixel(out, (1, 0)) == (255, 0, 0)
    for xy in [(0, 0), (0, 3), (1, 3), (1, 1)]:
        assert pixel(out, xy) == (0, 0, 255)


def test_exif_orientation_6_jpeg():
    img = Image.new("RGB", (16, 8), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 4))  # red block at x 0..7, y 0..3
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(img, "JPEG", exif=exif, quality=95), CFG)
    assert out.size == (8, 16)
    r, g, b = pixel(out, (6, 2))  # red block now at x 4..7, y 0..7
    assert r > 200 and g < 60 and b < 60
    for xy in [(1, 2), (6, 12)]:
        r, g, b = pixel(out, xy)
        assert b > 200 and r < 60


def test_palette_with_transparency_over_white():
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 0])
    img.putpixel((1, 0), 1)
    img.putpixel((2, 0), 2)
    out = decode_image(encode(img, "PNG", transparency=1), CFG)  # palette index 1 fully transparent
    assert out.mode == "RGB"
    assert [pixel(out, (x, 0)) for x in range(3)] == [(255, 0, 0), (255, 255, 255), (0, 0, 0)]


def test_palette_with_alpha_table():
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 255, 0])
    img.putpixel((1, 0), 1)
    out = decode_image(encode(img, "PNG", transparency=b"\xff\x80"), CFG)  # index 1 alpha 128
    assert pixel(out, (0, 0)) == (255, 0, 0)
    r, g, b = pixel(out, (1, 0))  # 0 * 128/255 + 255 * 127/255 = 127 for R and B
    assert g == 255 and abs(r - 127) <= 1 and abs(b - 127) <= 1


def test_rgba_and_la_over_white():
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 255), (0, 0, 255, 0), (0, 0, 0, 128)])
    out = decode_image(encode(img, "PNG"), CFG)
    assert pixel(out, (0, 0)) == (255, 0, 0)
    assert pixel(out, (1, 0)) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in pixel(out, (2, 0)))
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    out = decode_image(encode(la, "PNG"), CFG)
    assert [pixel(out, (x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 0)]


def test_cmyk_to_rgb():
    img = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # no cyan/key, full magenta+yellow = red
    out = decode_image(encode(img, "TIFF"), CFG)
    assert out.mode == "RGB" and pixel(out, (1, 1)) == (255, 0, 0)
    out = decode_image(encode(img, "JPEG", quality=95), CFG)
    r, g, b = pixel(out, (1, 1))
    assert r > 240 and g < 15 and b < 15


def test_16bit_grayscale_scaled_not_clipped():
    arr = np.array([[0, 257 * 128, 65535, 257]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = decode_image(encode(img, "PNG"), CFG)
    assert out.mode == "RGB"
    assert [pixel(out, (x, 0)) for x in range(4)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (1, 1, 1)]



def test_16bit_grayscale_rounds_every_value_like_float_division():
    values = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    out = decode_image(encode(Image.fromarray(values), "PNG"), PreprocessConfig())
    want = np.rint(values / 257.0).astype(np.uint8)
    assert np.array_equal(np.asarray(out), np.repeat(want[:, :, None], 3, axis=2))


def test_16bit_grayscale_decodes_without_wide_temporaries():
    """The 16-bit path held float64 copies: 28 bytes a pixel of peak RSS, 1.8 GB for 8192x8192 (the issue's
    figure, measured). numpy's and Python's allocations are traced: 24 bytes a pixel then, 7 now."""
    values = (np.arange(1024 * 1024, dtype=np.uint32) % 65536).astype(np.uint16).reshape(1024, 1024)
    data = encode(Image.fromarray(values), "PNG")
    tracemalloc.start()
    try:
        decode_image(data, PreprocessConfig())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * values.size, f"{peak / values.size:.1f} bytes a pixel"


def test_grayscale_and_bilevel_to_rgb():
    gray = Image.new("L", (2, 1))
    gray.putdata([10, 200])
    out = decode_image(encode(gray, "PNG"), CFG)
    assert [pixel(out, (x, 0)) for x in range(2)] == [(10, 10, 10), (200, 200, 200)]
    bw = Image.new("1", (2, 1))
    bw.putpixel((1, 0), 1)
    out = decode_image(encode(bw, "PNG"), CFG)
    assert [pixel(out, (x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]


# ---------------------------------------------------------------------------------------------------------------
# Tensors and boxes


def to_tensor(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """The library's image path: resize to uint8 pixels, then normalise."""
    return normalize_pixels(resize_pixels(img, cfg), cfg)


def test_solid_red_gives_plus_and_minus_one():
    t = to_tensor(Image.new("RGB", (10, 7), (255, 0, 0)), CFG)
    assert t.shape == (3, 8, 8) and t.dtype == torch.float32
    torch.testing.assert_close(t[0], torch.ones(8, 8), rtol=0, atol=1e-6)
    torch.testing.assert_close(t[1:], -torch.ones(2, 8, 8), rtol=0, atol=1e-6)


def test_tensor_layout_and_custom_mean_std():
    arr = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5  # (H, W, C), no resize at S=4
    cfg = PreprocessConfig(patch_image_size=4, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    t = to_tensor(Image.fromarray(arr), cfg)
    expected = (arr.transpose(2, 0, 1) / 255.0 - np.array(cfg.mean)[:, None, None]) / np.array(cfg.std)[:, None, None]
    np.testing.assert_allclose(t.numpy(), expected, rtol=0, atol=1e-6)
    assert t[2, 1, 3].item() == pytest.approx((arr[1, 3, 2] / 255 - 0.406) / 0.225, abs=1e-6)


def _reference_tensor(img, cfg):
    """Resize and normalise written out by hand: the values the two library steps must give."""
    size = cfg.patch_image_size
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def test_resize_pixels_then_normalize_pixels_match_a_hand_reference():
    rng = np.random.default_rng(0)
    cfg = PreprocessConfig(patch_image_size=24, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    for shape in ((31, 17), (24, 24)):  # resized, and used as is
        img = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
        pixels = resize_pixels(img, cfg)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 24, 24) and pixels.is_contiguous()
        expected_pixels = np.array(img.resize((24, 24), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
        assert np.array_equal(pixels.numpy(), expected_pixels)  # uint8: exact
        torch.testing.assert_close(normalize_pixels(pixels, cfg), _reference_tensor(img, cfg), rtol=0, atol=1e-6)
    torch.testing.assert_close(to_tensor(img, CFG), _reference_tensor(img, CFG), rtol=0, atol=1e-6)  # mean = std = .5


def test_normalize_pixels_batch_equals_per_image_and_hand_values():
    cfg = PreprocessConfig(patch_image_size=6, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    batch = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (5, 3, 6, 6), dtype=np.uint8))
    out = normalize_pixels(batch, cfg)
    assert out.dtype == torch.float32 and out.shape == (5, 3, 6, 6)
    for i in range(5):
        torch.testing.assert_close(out[i], normalize_pixels(batch[i], cfg), rtol=0, atol=1e-6)
    ends = normalize_pixels(torch.tensor([0, 255], dtype=torch.uint8).view(1, 2, 1).expand(3, 2, 1), CFG)
    assert ends.flatten().tolist() == pytest.approx([-1.0, 1.0] * 3, abs=1e-6)  # (0 - .5) / .5 and (1 - .5) / .5
    with pytest.raises(ValueError, match="uint8"):
        normalize_pixels(batch.float(), cfg)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, S, S\)"):
        normalize_pixels(batch[:, :2], cfg)
    with pytest.raises(ValueError, match="RGB"):
        resize_pixels(Image.new("L", (4, 4)), cfg)


def test_blank_centre_zeroes_the_middle_square_in_place():
    images = torch.ones(2, 3, 8, 8)
    assert blank_centre(images) is images
    assert images[:, :, 2:6, 2:6].eq(0).all() and images.sum() == 2 * 3 * (64 - 16)


def test_decode_keeps_the_original_size_and_the_tensor_is_resized():
    img = decode_image(encode(Image.new("RGB", (30, 20), (255, 0, 0)), "PNG"), CFG, source="x")
    assert img.size == (30, 20)
    expected = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8)
    torch.testing.assert_close(to_tensor(img, CFG), expected, rtol=0, atol=1e-6)


def rect_canvas(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    img = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(img).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(0, 0, 0))  # inclusive corners
    return img


def dark_extent(img: Image.Image) -> np.ndarray:
    ys, xs = np.nonzero(np.asarray(img.convert("L")) < 128)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


@pytest.mark.parametrize("box", [(30, 20, 60, 50), (0, 0, 20, 15), (75, 60, 100, 80), (2, 3, 97, 78)])
def test_grounding_augment_box_matches_pixels(box):
    img = rect_canvas((100, 80), box)
    cfg = PreprocessConfig(patch_image_size=64)
    widths = set()
    for seed in range(8):
        out, new_box = grounding_train_augment(img, np.array(box, dtype=float), cfg, np.random.default_rng(seed))
        assert out.size == (64, 64) and out.mode == "RGB"
        assert new_box.shape == (4,)
        assert (new_box >= 0).all() and (new_box <= 64).all()
        np.testing.assert_allclose(new_box, dark_extent(out), atol=2)
        widths.add(round(new_box[2] - new_box[0], 3))
    if box != (2, 3, 97, 78):  # a near-full box leaves no room to jitter
        assert len(widths) > 1


def test_grounding_augment_deterministic_and_zooms():
    img = rect_canvas((100, 80), (30, 20, 60, 50))
    cfg = PreprocessConfig(patch_image_size=64)
    a_img, a_box = grounding_train_augment(img, np.array([30, 20, 60, 50.0]), cfg, np.random.default_rng(3))
    b_img, b_box = grounding_train_augment(img, np.array([30, 20, 60, 50.0]), cfg, np.random.default_rng(3))
    assert np.array_equal(a_box, b_box) and a_img.tobytes() == b_img.tobytes()
    # The crop spans 80..100 % of each side, so the box is scaled by S/side .. S/(0.8 side) (+1 px rounding).
    for seed in range(10):
        _, bx = grounding_train_augment(img, np.array([30, 20, 60, 50.0]), cfg, np.random.default_rng(seed))
        assert 30 * 64 / 100 - 1e-9 <= bx[2] - bx[0] <= 30 * 64 / 79
        assert 30 * 64 / 80 - 1e-9 <= bx[3] - bx[1] <= 30 * 64 / 63


def test_grounding_augment_rejects_bad_boxes():
    img = Image.new("RGB", (50, 40))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="outside"):
        grounding_train_augment(img, np.array([0, 0, 60, 10.0]), CFG, rng)
    with pytest.raises(ValueError, match="empty"):
        grounding_train_augment(img, np.array([10, 10, 10, 20.0]), CFG, rng)
    # up to 1 px outside is clipped
    _, b = grounding_train_augment(img, np.array([-0.5, 0, 50.5, 40]), CFG, rng)
    np.testing.assert_allclose(b, [0, 0, 8, 8])


# ---------------------------------------------------------------------------------------------------------------
# Text


def test_normalize_caption():
    assert normalize_caption("  A man, riding a HORSE!\t On the  beach. ") == "a man riding a horse on the beach"
    assert normalize_caption("Don't stop-the well-known car", max_words=3) == "dont stopthe wellknown"
    assert normalize_caption("one two", max_words=0) == ""


def test_normalize_question():
    assert normalize_question("...What is ON the table") == "what is on the table?"
    assert normalize_question("Is it black-and-white/gray?") == "is it black and white gray?"
    assert normalize_question("How many dogs are there in the picture?", max_words=4) == "how many dogs are?"
    assert normalize_question("what\tis   this\n") == "what is this?"
    with pytest.raises(ValueError, match="empty"):
        normalize_question("?!  ")


def test_normalize_text():
    assert normalize_text("#Man in RED shirt-left/side\n") == "man in red shirt left side"
    assert normalize_text("the man, on the LEFT.") == "the man, on the left."  # inner punctuation kept
    assert normalize_text("~~A  big   dog", max_words=2) == "a big"
    assert normalize_text("  ,hello") == ",hello"  # OFA strips the prefix before trimming spaces
    with pytest.raises(ValueError, match="max_words"):
        normalize_text("x", max_words=-1)


# ---------------------------------------------------------------------------------------------------------------
# Padding and collation


def test_pad_sequences():
    seqs = [[5, 6, 7], [8], []]
    assert pad_sequences(seqs, 1).tolist() == [[5, 6, 7], [8, 1, 1], [1, 1, 1]]
    assert pad_sequences(seqs, 1, left=True).tolist() == [[5, 6, 7], [1, 1, 8], [1, 1, 1]]
    out = pad_sequences(seqs, 0, max_len=5)
    assert out.dtype == torch.int64 and out.tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [0] * 5]
    with pytest.raises(ValueError, match="sequence 0 has 3 tokens"):
        pad_sequences(seqs, 1, max_len=2)


def test_collate_values():
    img = torch.full((3, 4, 4), 0.5)
    samples = [
        {"source": [0, 10, 11, 2], "image": img, "prev_output": [0, 20, 21], "target": [20, 21, 2],
         "target_weight": 0.5, "id": "a"},
        {"source": [0, 12, 2], "image": None, "prev_output": [0, 22], "target": [22, 2], "code_mask": True},
    ]
    b = collate(samples, pad_id=1)
    assert b["src_tokens"].tolist() == [[0, 10, 11, 2], [0, 12, 2, 1]]
    assert b["src_lengths"].tolist() == [4, 3]
    assert b["prev_output_tokens"].tolist() == [[0, 20, 21], [0, 22, 1]]
    assert b["target"].tolist() == [[20, 21, 2], [22, 2, 1]]
    assert b["patch_masks"].tolist() == [True, False]
    assert torch.equal(b["patch_images"][0], img) and torch.equal(b["patch_images"][1], torch.zeros(3, 4, 4))
    assert b["target_weights"].dtype == torch.float32 and b["target_weights"].tolist() == [0.5, 1.0]
    assert b["code_masks"].tolist() == [False, True]
    assert b["ntokens"].item() == 5 and b["src_tokens"].dtype == torch.int64


def test_collate_without_images_omits_image_keys():
    b = collate([{"source": [0, 2], "prev_output": [0], "target": [2]}], pad_id=1)
    assert "patch_images" not in b and "patch_masks" not in b
    assert b["ntokens"].item() == 1


def test_collate_errors():
    base = {"source": [0, 2], "prev_output": [0], "target": [2]}
    with pytest.raises(ValueError, match="mixed image"):
        collate([{**base, "image": torch.zeros(3, 4, 4)}, {**base, "image": torch.zeros(3, 8, 8)}], pad_id=1)
    with pytest.raises(ValueError, match="align"):
        collate([{**base, "target": [5, 2]}], pad_id=1)
    with pytest.raises(ValueError, match="lacks"):
        collate([{"source": [0, 2]}], pad_id=1)


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_config_round_trip():
    cfg = PreprocessConfig(patch_image_size=512, mean=(0.485, 0.456, 0.406), max_src_length=64)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["mean"] == [0.485, 0.456, 0.406] and d["patch_image_size"] == 512
    back = PreprocessConfig.from_dict(d)
    assert back == cfg and isinstance(back.mean, tuple)
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ValueError, match=r"\['image_size', 'zzz'\]"):
        PreprocessConfig.from_dict({"zzz": 1, "image_size": 3, "max_tgt_length": 4})
    with pytest.raises(ValueError, match="patch_image_size"):
        PreprocessConfig(patch_image_size=0)
    with pytest.raises(ValueError, match="std"):
        PreprocessConfig(std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="mean"):
        PreprocessConfig(mean=(0.5, 0.5))


def test_config_errors_are_typed_and_name_the_key():
    with pytest.raises(ConfigError, match=r"PreprocessConfig\.patch_image_size must be an integer, got str"):
        PreprocessConfig(patch_image_size="480")
    with pytest.raises(ConfigError, match=r"PreprocessConfig\.max_src_length must be an integer, got bool"):
        PreprocessConfig(max_src_length=True)
    with pytest.raises(ConfigError, match=r"PreprocessConfig\.max_tgt_length must lie in \[1, 65536\], got -3"):
        PreprocessConfig(max_tgt_length=-3)
    with pytest.raises(ConfigError, match=r"patch_image_size must lie in \[1, 8192\], got 1000000"):
        PreprocessConfig(patch_image_size=10**6)
    with pytest.raises(ConfigError, match="finite"):
        PreprocessConfig(mean=(0.5, float("nan"), 0.5))
    with pytest.raises(ConfigError, match="must be a mapping"):
        PreprocessConfig.from_dict([("patch_image_size", 480)])
    assert issubclass(ConfigError, InputError) and ConfigError("x").reason == "bad_config"



@pytest.mark.parametrize("kw, message", [
    (dict(std=(1e-300,) * 3), r"PreprocessConfig\.std\[0\] 1e-300 is 0\.0 in float32 .* must be finite and "
                              r"non-zero after the cast"),
    (dict(std=(0.5, 0.5, 1e39)), r"PreprocessConfig\.std\[2\] 1e\+39 is inf in float32"),
    (dict(mean=(1e308, 0.5, 0.5)), r"PreprocessConfig\.mean\[0\] 1e\+308 is not finite in float32"),
    (dict(std=(0.5, 1e-40, 0.5)), r"PreprocessConfig\.mean\[1\] 0\.5 and std\[1\] 1e-40 normalise pixels "
                                  r"\(x - mean\) / std beyond float32's range"),
], ids=["std-vanishes", "std-overflows", "mean-overflows", "std-subnormal"])
def test_mean_and_std_are_checked_as_float32(kw, message):
    """float64-finite values that vanish or overflow in float32 made every image inf or NaN (every answer
    no_hypothesis); they are refused when the config is built, so a bundle holding them does not load."""
    with pytest.raises(ConfigError, match=message):
        PreprocessConfig(**kw)
    with pytest.raises(ConfigError, match=message):
        PreprocessConfig.from_dict({**PreprocessConfig().to_dict(), **{k: list(v) for k, v in kw.items()}})
    tiny = PreprocessConfig(std=(1e-3, 1e-3, 1e-3), mean=(0.0, 0.5, 1.0))  # extreme but representable
    assert torch.isfinite(normalize_pixels(torch.tensor([0, 255], dtype=torch.uint8).expand(3, 2, 2), tiny)).all()


def test_complete_from_dict_requires_every_field():
    full = PreprocessConfig(patch_image_size=384, max_src_length=80, max_tgt_length=30).to_dict()
    assert PreprocessConfig.from_dict(full, complete=True).patch_image_size == 384
    del full["max_tgt_length"], full["std"]
    assert PreprocessConfig.from_dict(full).max_tgt_length == 30  # a YAML data config may name a few
    with pytest.raises(ConfigError, match=r"incomplete: missing keys \['max_tgt_length', 'std'\]"):
        PreprocessConfig.from_dict(full, complete=True)
