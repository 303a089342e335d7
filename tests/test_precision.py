"""The shared precision / memory-format setting (`ofa_model.precision`) and its use by the predictor."""

import pytest
import torch

from ofa_model import OFAModel, Vocabulary, get_config
from ofa_model.precision import Execution, native_bf16
from ofa_model.predictor import OFAPredictor
from ofa_model.preprocess import PreprocessConfig
from tests.test_predictor import png

CPU = torch.device("cpu")


def test_resolve_names_and_rejects():
    assert Execution.resolve("fp32", "contiguous", "cpu") == Execution(CPU, "fp32", "contiguous")
    auto = Execution.resolve("auto", "auto", "cpu")
    assert auto.precision == ("bf16" if native_bf16(CPU) else "fp32")
    assert auto.memory_format == "channels_last"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Execution.resolve("fp16", "auto", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        Execution.resolve("int4", "auto", "cpu")
    with pytest.raises(ValueError, match="memory_format must be one of"):
        Execution.resolve("fp32", "nhwc", "cpu")


def test_autocast_and_layout_apply():
    ex = Execution.resolve("bf16", "channels_last", "cpu")
    with ex.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with Execution.resolve("fp32", "contiguous", "cpu").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    model = ex.prepare_model(OFAModel(get_config("ofa-micro")))
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never casts the weights
    img = ex.images(torch.zeros(2, 3, 8, 8))
    assert img.is_contiguous(memory_format=torch.channels_last)
    assert ex.images(None) is None


def _random_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (a fresh model's are 0/1, which folding keeps)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


@pytest.mark.parametrize("precision,memory_format,fold", [("fp32", "channels_last", False),
                                                          ("fp32", "auto", True), ("bf16", "contiguous", False)])
def test_predictor_answers_agree_with_fp32(precision, memory_format, fold):
    """Same weights: channels-last fp32, and the default (channels-last, folded BatchNorms), are the same
    computation as plain fp32 up to rounding; bf16 keeps the ranking of well-separated candidates and the
    greedy tokens of a short caption on this fixed set."""
    torch.manual_seed(0)
    model = OFAModel(get_config("ofa-micro"))
    if fold:  # folding a fresh model's 0/1 statistics would test nothing
        _random_batchnorm(model)
    vocab, pre = Vocabulary.gpt2(), PreprocessConfig(patch_image_size=64)
    base = OFAPredictor(model, vocab, pre, memory_format="contiguous", fold_batchnorm=False)
    other = OFAPredictor(OFAModel(get_config("ofa-micro")), vocab, pre, precision=precision,
                         memory_format=memory_format, fold_batchnorm=fold)
    other.model.load_state_dict(model.state_dict())
    layout = "channels_last" if memory_format == "auto" else memory_format
    assert other.execution.describe() == f"cpu {precision} {layout}"
    assert other.model.encoder.embed_images.fold is fold
    inputs = [{"image": png(color=c), "candidates": ["red", "blue", "green square"]}
              for c in [(200, 30, 30), (20, 20, 220), (10, 200, 10)]]
    want = base.predict("image_classification", inputs)
    got = other.predict("image_classification", inputs)
    tol = 1e-4 if precision == "fp32" else 3e-2
    for w, g in zip(want, got, strict=True):
        assert g["scores"] == pytest.approx(w["scores"], abs=tol)
    caps = [{"image": png(color=c), "decoding": {"max_len_b": 5}} for c in [(200, 30, 30), (0, 0, 0)]]
    want_caps = [r["text"] for r in base.predict("caption", caps)]
    got_caps = [r["text"] for r in other.predict("caption", caps)]
    if precision == "fp32":
        assert got_caps == want_caps
    else:  # bf16 may flip a near-tie of random weights; most tokens agree
        agree = sum(a == b for a, b in zip(" ".join(got_caps).split(), " ".join(want_caps).split(), strict=False))
        assert agree >= 0.5 * len(" ".join(want_caps).split())


def test_predictor_default_is_fp32_channels_last_folded():
    pred = OFAPredictor(OFAModel(get_config("ofa-micro")), Vocabulary.gpt2(), PreprocessConfig(patch_image_size=64))
    assert pred.execution.describe() == "cpu fp32 channels_last"
    assert pred.model.encoder.embed_images.fold is True


def _resnet_pair():
    torch.manual_seed(0)
    model = OFAModel(get_config("ofa-micro"))
    _random_batchnorm(model, seed=1)
    return model.encoder.embed_images.eval(), torch.randn(2, 3, 32, 32)


def _bn_calls(resnet) -> list[int]:
    """A counter of BatchNorm forward calls (a folded forward makes none)."""
    calls = [0]
    for m in resnet.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_folded_batchnorm_matches_and_follows_weight_changes():
    resnet, x = _resnet_pair()
    keys = set(resnet.state_dict())
    calls = _bn_calls(resnet)
    with torch.no_grad():
        want = resnet(x)
        assert calls[0] > 0
        resnet.fold_batchnorm(True)
        calls[0] = 0
        got = resnet(x)
        assert calls[0] == 0  # the folded path ran
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        # in-place changes that bump no version counter (a fused optimizer step, BatchNorm's running statistics
        # in a training forward) are seen by the next folded forward
        opt = torch.optim.AdamW(resnet.parameters(), lr=0.1, fused=True)
        with torch.enable_grad():
            resnet.train()
            resnet(x).sum().backward()  # also updates the running statistics
            resnet.eval()
        opt.step()
        got = resnet(x)
        resnet.fold_batchnorm(False)
        want = resnet(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert set(resnet.state_dict()) == keys  # the weights the checkpoint holds are untouched


def test_folding_never_reaches_training_or_autograd():
    resnet, x = _resnet_pair()
    want = resnet(x)  # eval mode with autograd: never folded
    want.sum().backward()
    grads = {n: p.grad.clone() for n, p in resnet.named_parameters()}
    resnet.zero_grad()
    resnet.fold_batchnorm(True)
    calls = _bn_calls(resnet)
    got = resnet(x)
    got.sum().backward()
    assert calls[0] > 0  # not folded under autograd
    assert torch.equal(got, want)
    assert all(torch.equal(p.grad, grads[n]) for n, p in resnet.named_parameters())
    resnet.train()  # training mode: batch statistics, as without folding
    torch.manual_seed(1)
    a = resnet(x)
    resnet.fold_batchnorm(False)
    torch.manual_seed(1)
    assert torch.equal(a, resnet(x))
