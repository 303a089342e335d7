"""The image tokenizer (`ofa_model.vqgan`) at its micro size: shapes, ranges, its pieces against explicit
computations, bundles written and refused, configs refused, and a few training steps that improve reconstruction."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import easy_vqa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from ofa_model.bundle import BundleError
from ofa_model.errors import ConfigError
from ofa_model.vqgan import (
    DIGEST_KEY,
    VQGAN,
    VQGAN_SIZES,
    _Attn,
    _Resample,
    load_tokenizer,
    psnr,
    save_tokenizer,
    tokenizer_config,
    tokenizer_digest,
    tokenizer_pixels,
    weights_digest,
)
from ofa_model.weights import CheckpointMismatchError

pytestmark = pytest.mark.timeout(180)

MICRO = VQGAN_SIZES["vqgan-micro"]
EASY_VQA_IMAGES = Path(easy_vqa.__file__).parent / "data" / "train" / "images"


@pytest.fixture(scope="module")
def model() -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(MICRO).eval()


def _pixels(b: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("size", [64, 32])
def test_encode_decode_shapes_and_code_range(model, size):
    pixels = _pixels(2, size)
    codes = model.encode(pixels)
    grid = size // 8
    assert codes.shape == (2, grid * grid) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < MICRO.n_embed
    with torch.no_grad():
        assert torch.equal(codes, model.logits(pixels).argmax(1).flatten(1))  # the argmax, row-major
        out = model.decode(codes)
    assert out.shape == (2, 3, size, size)
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0


def test_decode_clamps_and_forward_does_not(model):
    clone = VQGAN(MICRO).eval()
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        clone.decoder.conv_out.bias.fill_(5.0)  # every pixel far above 1 before clamping
        decoded = clone.decode(torch.zeros(1, 64, dtype=torch.long))
        raw = clone(_pixels(1, 64)).pixels
    assert torch.equal(decoded, torch.ones_like(decoded))
    assert float(raw.min()) > 1.0


@pytest.mark.parametrize("codes, message", [
    (torch.zeros(1, 63, dtype=torch.long), r"codes of shape \(B, g \* g\)"),
    (torch.full((1, 64), 512), r"codes must lie in \[0, 512\)"),
    (torch.full((1, 64), -1), r"codes must lie in \[0, 512\)"),
])
def test_decode_refuses_bad_codes(model, codes, message):
    with pytest.raises(ValueError, match=message):
        model.decode(codes)


def test_forward_kl_against_an_independent_formula():
    torch.manual_seed(1)
    m = VQGAN(tokenizer_config("vqgan-micro", kl_weight=0.5)).eval()
    pixels = _pixels(2, 32, seed=3)
    out = m(pixels, temperature=1.0)
    with torch.no_grad():
        assert torch.equal(out.logits, m.logits(pixels))
    # KL(q || uniform) per position, by torch.distributions, averaged over batch and grid
    q = torch.distributions.Categorical(logits=out.logits.permute(0, 2, 3, 1))
    uniform = torch.distributions.Categorical(logits=torch.zeros(MICRO.n_embed))
    expected = 0.5 * torch.distributions.kl_divergence(q, uniform).mean()
    torch.testing.assert_close(out.kl, expected, rtol=1e-4, atol=1e-6)
    assert out.pixels.shape == (2, 3, 32, 32) and out.codes.shape == (2, 4, 4)


def test_attention_block_against_explicit_bmm_softmax():
    torch.manual_seed(2)
    attn = _Attn(32, 32).eval()
    for p in attn.parameters():  # non-trivial norm and projections
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 32, 5, 3)
    b, c, h, w = x.shape
    n = F.group_norm(x, 32, attn.norm.weight, attn.norm.bias, eps=1e-6)

    def proj(conv):  # a 1x1 convolution as a matrix product: (B, C, HW)
        return torch.einsum("oc,bcn->bon", conv.weight[:, :, 0, 0], n.reshape(b, c, h * w)) + conv.bias[None, :, None]

    q, k, v = proj(attn.q), proj(attn.k), proj(attn.v)
    weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(c), dim=2)  # (B, HW queries, HW keys)
    mixed = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)  # (B, C, HW)
    out = torch.einsum("oc,bchw->bohw", attn.proj_out.weight[:, :, 0, 0], mixed) + attn.proj_out.bias[None, :, None, None]
    with torch.no_grad():
        torch.testing.assert_close(attn(x), x + out, rtol=1e-5, atol=1e-5)


def test_downsample_pads_right_and_bottom_then_strides_by_two():
    torch.manual_seed(3)
    down = _Resample(32, down=True)
    x = torch.randn(1, 32, 6, 7)
    w, bias = down.conv.weight, down.conv.bias
    # zero padding of one row at the bottom and one column at the right, then a 3x3 kernel every second pixel
    padded = torch.zeros(1, 32, 7, 8)
    padded[:, :, :6, :7] = x
    rows, cols = (7 - 3) // 2 + 1, (8 - 3) // 2 + 1
    expected = torch.empty(1, 32, rows, cols)
    for i in range(rows):
        for j in range(cols):
            patch = padded[0, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]  # (C, 3, 3)
            expected[0, :, i, j] = (w * patch).sum((1, 2, 3)) + bias
    with torch.no_grad():
        got = down(x)
    assert got.shape == (1, 32, 3, 3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_decodes_bitwise_equal(model, tmp_path):
    save_tokenizer(tmp_path / "tok", model, metadata={"trained_on": "unit test"})
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.config == MICRO and tok.metadata == {"trained_on": "unit test"} and not tok.model.training
    codes = torch.randint(0, MICRO.n_embed, (2, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(tok.model.decode(codes), model.decode(codes))
    image = Image.open(EASY_VQA_IMAGES / "0.png")
    assert torch.equal(tok.encode_images([image]), model.encode(tokenizer_pixels([image], 64)))
    assert tok.decode_codes(codes).shape == (2, 64, 64, 3)


def test_the_weights_digest_is_sha256_of_the_tensors_in_name_order():
    """Against the format written out by hand: per tensor in name order, "<name>\t<dtype>\t<shape>\n" and its
    little-endian bytes; it ignores the dict's order and changes with any value, dtype or name."""
    state = {"b.weight": torch.tensor([[1.5, -2.0]]), "a.bias": torch.tensor([3, 258], dtype=torch.int64)}
    expected = hashlib.sha256(b"a.bias\tint64\t[2]\n" + (3).to_bytes(8, "little") + (258).to_bytes(8, "little")
                              + b"b.weight\tfloat32\t[1, 2]\n" + bytes.fromhex("0000c03f") + bytes.fromhex("000000c0"))
    assert weights_digest(state) == expected.hexdigest()
    assert weights_digest(dict(reversed(state.items()))) == expected.hexdigest()
    assert weights_digest({"b.weight": state["b.weight"].t(), "a.bias": state["a.bias"]}) != expected.hexdigest()
    for changed in ({**state, "a.bias": torch.tensor([3, 259])}, {**state, "a.bias": torch.tensor([3, 258.0])},
                    {"a.bias": state["a.bias"], "c.weight": state["b.weight"]}):
        assert weights_digest(changed) != expected.hexdigest()


def test_a_saved_tokenizer_records_its_digest_readable_without_its_weights(model, tmp_path):
    save_tokenizer(tmp_path / "tok", model)
    digest = weights_digest(model.state_dict())
    assert json.loads((tmp_path / "tok" / "config.json").read_text())[DIGEST_KEY] == digest
    assert load_tokenizer(tmp_path / "tok").digest == digest
    save_tokenizer(tmp_path / "again", load_tokenizer(tmp_path / "tok").model)  # re-saved: the same identity
    assert tokenizer_digest(tmp_path / "again") == digest
    (tmp_path / "tok" / "model.safetensors").unlink()
    assert tokenizer_digest(tmp_path / "tok") == digest  # config.json alone
    torch.manual_seed(1)
    assert weights_digest(VQGAN(MICRO).state_dict()) != digest  # another tokenizer of the same architecture


def test_an_older_tokenizer_without_a_digest_loads_and_a_bad_or_false_digest_is_refused(model, tmp_path):
    save_tokenizer(tmp_path / "tok", model)
    config = tmp_path / "tok" / "config.json"
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({k: v for k, v in saved.items() if k != DIGEST_KEY}))
    assert tokenizer_digest(tmp_path / "tok") is None and load_tokenizer(tmp_path / "tok").digest is None
    for bad in ("ABC", saved[DIGEST_KEY].upper(), 5, None):
        config.write_text(json.dumps({**saved, DIGEST_KEY: bad}))
        with pytest.raises(BundleError, match=f"config.json: {DIGEST_KEY} must be a sha256 in lowercase hex"):
            tokenizer_digest(tmp_path / "tok")
    torch.manual_seed(1)
    other = weights_digest(VQGAN(MICRO).state_dict())
    config.write_text(json.dumps({**saved, DIGEST_KEY: other}))  # weights swapped after saving
    with pytest.raises(BundleError, match=f"model.safetensors: the weights' sha256 {saved[DIGEST_KEY]} is not the "
                                          f"{DIGEST_KEY} {other}"):
        load_tokenizer(tmp_path / "tok")


def _rewrite_weights(bundle: Path, change) -> None:
    state = load_file(str(bundle / "model.safetensors"))
    save_file(change(state), str(bundle / "model.safetensors"))


@pytest.mark.parametrize("change, error, message", [
    (lambda s: {**s, "quantize.embed.weight": torch.zeros(256, 64)}, CheckpointMismatchError,
     r"shape mismatches:\n    quantize\.embed\.weight: checkpoint \(256, 64\) vs model \(512, 64\)"),
    (lambda s: {k: v for k, v in s.items() if k != "decoder.conv_out.bias"}, CheckpointMismatchError,
     r"missing keys:\n    decoder\.conv_out\.bias"),
    (lambda s: {**s, "loss.discriminator.main.0.weight": torch.zeros(1)}, CheckpointMismatchError,
     r"unexpected keys:\n    loss\.discriminator\.main\.0\.weight"),
])
def test_a_bundle_with_bad_weights_is_refused_naming_the_key(model, tmp_path, change, error, message):
    save_tokenizer(tmp_path / "tok", model)
    _rewrite_weights(tmp_path / "tok", change)
    with pytest.raises(error, match=message):
        load_tokenizer(tmp_path / "tok")


@pytest.mark.parametrize("edit, message", [
    (lambda c: {**c, "format": "ofa-ray-bundle"}, r"format is 'ofa-ray-bundle', not an image tokenizer"),
    (lambda c: {**c, "format_version": 2}, r"format_version 2 is not 1"),
    (lambda c: {**c, "model": {**c["model"], "ch": 40}}, r"VQGANConfig\.ch 40 must be a multiple of norm_groups 32"),
    (lambda c: {**c, "model": {**c["model"], "codebook": 3}}, r"unknown .*model keys: \['codebook'\]"),
])
def test_a_bundle_with_a_foreign_or_bad_config_is_refused(model, tmp_path, edit, message):
    save_tokenizer(tmp_path / "tok", model)
    config = tmp_path / "tok" / "config.json"
    config.write_text(json.dumps(edit(json.loads(config.read_text()))))
    with pytest.raises(BundleError, match=message):
        load_tokenizer(tmp_path / "tok")


@pytest.mark.parametrize("overrides, message", [
    (dict(ch=48), r"VQGANConfig\.ch 48 must be a multiple of norm_groups 32"),
    (dict(z_channels=40, embed_dim=40), r"VQGANConfig\.z_channels 40 must be a multiple of norm_groups 32"),
    (dict(ch_mult=(1, 2, 2)), r"ch_mult \(1, 2, 2\) has 3 levels; a factor-8 tokenizer has 4"),
    (dict(ch_mult=[1, 1, 2, 2]), r"ch_mult must be a tuple"),
    (dict(num_res_blocks=True), r"VQGANConfig\.num_res_blocks must be an integer, got bool True"),
    (dict(ch_mult=(1, 1, True, 2)), r"VQGANConfig\.ch_mult\[2\] must be an integer, got bool"),
    (dict(resolution=60), r"resolution 60 must be a multiple of 8"),
    (dict(embed_dim=32), r"embed_dim 32 must equal z_channels 64"),
    (dict(kl_weight=float("nan")), r"kl_weight must be finite"),
])
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tokenizer_config("vqgan-micro", **overrides)


def test_reconstruction_improves_with_training_steps():
    """40 Adam steps on 4 easy-VQA images (straight-through Gumbel, L1 + KL) raise the PSNR of encode -> decode."""
    torch.manual_seed(0)
    x = tokenizer_pixels([Image.open(EASY_VQA_IMAGES / f"{i}.png") for i in range(4)], 64)  # (4, 3, 64, 64)
    m = VQGAN(MICRO)

    def reconstruction_psnr() -> float:
        m.eval()
        with torch.no_grad():
            return float(psnr(m.decode(m.encode(x)), x).mean())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 4 s of CPU on one thread; threads spinning on a busy 2-core machine took minutes
    try:
        before = reconstruction_psnr()
        opt = torch.optim.Adam(m.parameters(), lr=2e-3)
        m.train()
        for _ in range(40):
            out = m(x, temperature=1.0, hard=True)
            loss = (out.pixels - x).abs().mean() + out.kl
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = reconstruction_psnr()
    finally:
        torch.set_num_threads(threads)
    assert after > before + 4.0, (before, after)  # measured: 6.5 dB -> 15.3 dB


def test_norm_groups_default_to_taming_and_a_narrow_tokenizer_may_use_fewer():
    """Every GroupNorm has norm_groups groups: 32 for OFA's tokenizer (and a taming checkpoint, which has no such
    key); a config whose channel counts it does not divide is refused naming the field."""
    from torch import nn

    assert VQGAN_SIZES["vqgan_gumbel_f8"].norm_groups == 32
    model = VQGAN(dataclasses.replace(VQGAN_SIZES["vqgan-micro"], norm_groups=4))
    groups = {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {4}
    with pytest.raises(ConfigError, match=r"VQGANConfig\.ch 36 must be a multiple of norm_groups 8"):
        dataclasses.replace(VQGAN_SIZES["vqgan-micro"], ch=36, norm_groups=8)
