"""The model core: sizes, position buckets, parity with an independent forward, KV cache."""

import pytest
import torch

from ofa_model.architecture import OFAConfig, get_config
from ofa_model.model import (
    DecoderState,
    OFAModel,
    decoder_image_position_ids,
    image_position_ids,
    image_rel_bucket,
    token_bucket_matrix,
    token_rel_bucket,
)
from tests.reference_ofa import official_image_buckets, official_token_buckets, reference_logits

OFFICIAL_PARAMS = {  # unique parameters of the released models (tied embedding counted once)
    "ofa-tiny": 33.49e6,
    "ofa-medium": 92.89e6,
    "ofa-base": 182.24e6,
    "ofa-large": 472.98e6,
    "ofa-huge": 929.49e6,
}


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_parameter_counts_match_official(name):
    with torch.device("meta"):
        model = OFAModel(get_config(name))
    n = model.num_parameters()
    assert abs(n - OFFICIAL_PARAMS[name]) / OFFICIAL_PARAMS[name] < 0.005, n
    assert abs(n - OFFICIAL_PARAMS[name]) < 0.01e6  # in fact equal to the rounding shown


def test_micro_is_small():
    with torch.device("meta"):
        assert 3e6 < OFAModel(get_config("ofa-micro")).num_parameters() < 10e6


def test_config_round_trip_and_errors():
    cfg = get_config("ofa-base", code_image_size=256)
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown architecture"):
        get_config("ofa-gigantic")
    with pytest.raises(ValueError, match="unknown OFAConfig keys: \\['bogus'\\]"):
        type(cfg).from_dict({**cfg.to_dict(), "bogus": 1})


def test_token_buckets_hand_worked():
    rel = torch.tensor([0, 1, -1, 128, -128, 129, 200, -200, 1023, -1023])
    got = token_rel_bucket(rel, 256, 1024).tolist()
    # 200: ceil(log(200/128) / log(1023/128) * 127) + 128 = ceil(27.27) + 128 = 156 -> +255 = 411
    assert got == [255, 256, 254, 383, 127, 384, 411, 99, 510, 0]


def test_token_buckets_equal_official_matrix():
    full = official_token_buckets(256, 1024)
    ar = torch.arange(1024)
    assert torch.equal(token_bucket_matrix(ar, ar, 256, 1024), full)
    rows = torch.arange(500, 530)
    assert torch.equal(token_bucket_matrix(rows, ar[:700], 256, 1024), full[500:530, :700])


def test_image_buckets_hand_worked_and_official():
    b = 42
    ids = torch.tensor([0, 1, 2, 43])  # nothing, (r0,c0), (r0,c1), (r1,c0)
    m = image_rel_bucket(ids, ids, b)
    assert m[0, 0] == 6891 and m[0, 1] == 6889 and m[1, 0] == 6890
    assert m[1, 1] == 41 * 83 + 41 == 3444  # zero offset is the centre of the 83 x 83 table
    assert m[1, 2] == 41 * 83 + 40  # key one column right: dc = -1
    assert m[1, 3] == 40 * 83 + 41  # key one row down: dr = -1
    full = official_image_buckets(b)
    allid = torch.arange(b * b + 1)
    assert torch.equal(image_rel_bucket(allid, allid, b), full)


def test_image_position_ids():
    assert image_position_ids(2, 3, 42).tolist() == [1, 2, 3, 43, 44, 45]
    ids = decoder_image_position_ids(get_config("ofa-tiny"))
    assert ids.shape == (1026,) and ids[0] == 0 and ids[1] == 1 and ids[16] == 16 and ids[17] == 43
    assert ids[256] == 15 * 42 + 16 and ids[257] == 1024


def _batch(seed=0, b=3, length=7, t=9, size=64):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 5000, (b, length), generator=g)
    src[:, 0] = 0
    src[1, 5:] = 1  # padding
    img = torch.randn(b, 3, size, size, generator=g)
    pm = torch.ones(b, dtype=torch.bool)
    pm[2] = False  # a text-only sample in a multimodal batch
    prev = torch.randint(4, 5000, (b, t), generator=g)
    prev[:, 0] = 0
    return src, img, pm, prev


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model = OFAModel(get_config("ofa-micro")).eval()
    with torch.no_grad():  # non-trivial values everywhere (fresh init leaves LN/c_attn at 1/0)
        for name, p in model.named_parameters():
            if "norm" in name or "_ln" in name or "c_attn" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return model


def test_forward_matches_independent_reference(micro):
    src, img, pm, prev = _batch()
    prev[0, 7:] = 1  # right-padded target
    with torch.no_grad():
        ours = micro(src, img, pm, prev)
    ref = reference_logits(micro, src, img, pm, prev)
    assert ours.shape == (3, 9, 59457)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_text_only_batch_runs_and_ignores_padding(micro):
    src, _, _, prev = _batch()
    with torch.no_grad():
        a = micro(src[:1, :5], prev_output_tokens=prev[:1])
        padded = torch.cat([src[:1, :5], torch.ones(1, 3, dtype=torch.long)], dim=1)
        b = micro(padded, prev_output_tokens=prev[:1])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_kv_cache_equals_full_recompute(micro):
    src, img, pm, prev = _batch(seed=1, t=12)
    with torch.no_grad():
        full = micro(src, img, pm, prev)
        enc = micro.encode(src, img, pm)
        state = DecoderState()
        steps = [micro.decode(prev[:, : i + 1], enc, state)[:, -1] for i in range(prev.shape[1])]
        chunked_state = DecoderState()
        first = micro.decode(prev[:, :5], enc, chunked_state)
        rest = micro.decode(prev, enc, chunked_state)
    assert (torch.stack(steps, 1) - full).abs().max() <= 1e-4
    assert (torch.cat([first, rest], 1) - full).abs().max() <= 1e-4


def test_kv_cache_equals_full_for_image_codes(micro):
    src, img, pm, prev = _batch(seed=2)
    codes = torch.tensor([True, False, True])
    with torch.no_grad():
        enc = micro.encode(src, img, pm)
        full = micro.decode(prev, enc, code_masks=codes)
        text = micro.decode(prev, enc)
        state = DecoderState()
        steps = torch.stack([micro.decode(prev[:, : i + 1], enc, state, codes)[:, -1] for i in range(prev.shape[1])], 1)
    assert (steps - full).abs().max() <= 1e-4
    torch.testing.assert_close(full[1], text[1], atol=1e-5, rtol=1e-5)  # text rows ignore code rows
    assert (full[0] - text[0]).abs().max() > 1e-3  # code rows use image positions / code layernorm


def test_patch_sampling_is_seeded(micro):
    src, img, pm, _ = _batch()
    with torch.no_grad():
        a = micro.encode(src, img, pm, sample_patch_num=5, generator=torch.Generator().manual_seed(3))
        b = micro.encode(src, img, pm, sample_patch_num=5, generator=torch.Generator().manual_seed(3))
    assert a.hidden.shape[1] == 5 + src.shape[1]
    assert torch.equal(a.hidden, b.hidden)


def test_errors_are_clear(micro):
    src, _, _, prev = _batch()
    with pytest.raises(ValueError, match="exceeds image_bucket_size 42"):
        micro.encode(src[:1], torch.zeros(1, 3, 688, 688))
    with pytest.raises(ValueError, match="prev_output_tokens is required"):
        micro(src)


def test_a_narrow_resnet_is_an_architecture_field_and_the_default_is_ofas():
    """resnet_width sizes the ResNet's stem and stages (channels width, 2w, 4w; 16w out) and the image projection;
    every named size keeps OFA's 64 (1024 channels), so checkpoints and bundles without the field are unchanged."""
    from ofa_model.architecture import get_config
    from ofa_model.model import OFAModel

    assert all(get_config(n).resnet_width == 64 and get_config(n).resnet_out_channels == 1024
               for n in ("ofa-micro", "ofa-tiny", "ofa-base"))
    cfg = get_config("ofa-micro", resnet_width=16)
    assert cfg.resnet_out_channels == 256
    model = OFAModel(cfg)
    assert model.encoder.embed_images.conv1.weight.shape == (16, 3, 7, 7)
    assert model.encoder.image_proj.weight.shape == (cfg.embed_dim, 256)
    full = sum(p.numel() for p in OFAModel(get_config("ofa-micro")).encoder.embed_images.parameters())
    narrow = sum(p.numel() for p in model.encoder.embed_images.parameters())
    assert narrow * 14 < full  # convolution weights scale with width squared (BatchNorm's linearly)
    images = torch.rand(2, 3, 64, 64)
    assert model.encoder.embed_images(images).shape == (2, 256, 4, 4)
    assert OFAConfig.from_dict({k: v for k, v in get_config("ofa-micro").to_dict().items()
                                if k != "resnet_width"}).resnet_width == 64  # an older bundle's config
