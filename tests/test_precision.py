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


@pytest.mark.parametrize("precision,memory_format", [("fp32", "channels_last"), ("bf16", "contiguous")])
def test_predictor_answers_agree_with_fp32(precision, memory_format):
    """Same weights: channels-last fp32 is the same computation up to rounding; bf16 keeps the ranking of
    well-separated candidates and the greedy tokens of a short caption on this fixed set."""
    torch.manual_seed(0)
    model = OFAModel(get_config("ofa-micro"))
    vocab, pre = Vocabulary.gpt2(), PreprocessConfig(patch_image_size=64)
    base = OFAPredictor(model, vocab, pre)
    other = OFAPredictor(OFAModel(get_config("ofa-micro")), vocab, pre, precision=precision,
                         memory_format=memory_format)
    other.model.load_state_dict(model.state_dict())
    assert other.execution.describe() == f"cpu {precision} {memory_format}"
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
