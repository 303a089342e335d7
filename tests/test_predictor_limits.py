"""OFAPredictor under hostile requests: bounded settings and work, per-item errors, only input errors answered."""

import dataclasses
import io

import pytest
import torch
from PIL import Image

import ofa_model.predictor as predictor_module
from ofa_model import OFAModel, Vocabulary, get_config
from ofa_model.errors import ConfigError, InputError
from ofa_model.predictor import OFAPredictor, PredictorLimits
from ofa_model.preprocess import PreprocessConfig
from ofa_model.tasks import TASKS, TaskInputError
from ofa_model.vqgan import VQGAN, Tokenizer, tokenizer_config


def png(size=(48, 40), color=(20, 160, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


IMG = png()
HOSTILE = "<bin_5> <code_3> <mask>"


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return OFAModel(get_config("ofa-micro")), Vocabulary.gpt2(), PreprocessConfig(patch_image_size=32)


@pytest.fixture
def predictor(parts):
    model, vocab, pcfg = parts
    tokenizer = Tokenizer(VQGAN(tokenizer_config("vqgan-micro")), tokenizer_config("vqgan-micro"), {})
    return OFAPredictor(model, vocab, pcfg, max_batch_size=4, image_tokenizer=tokenizer)  # grid: 16 x 16 codes


@pytest.fixture
def no_model(predictor, monkeypatch):
    """The predictor with a model that must not be called and preprocessing that must not run."""

    def boom(*args, **kw):
        raise AssertionError("the model or preprocessing ran for a refused request")

    monkeypatch.setattr(predictor.model, "encode", boom)
    monkeypatch.setattr(predictor.model, "decode", boom)
    monkeypatch.setattr(predictor_module, "inference_request", boom)
    return predictor


def reasons(out: list[dict]) -> list[str | None]:
    return [o["error"]["reason"] if "error" in o else None for o in out]


# ---------------------------------------------------------------------------------------------- settings


HOSTILE_DECODING = [
    {"max_len_a": 1e308}, {"length_penalty": 1e308}, {"length_penalty": -1e308},
    {"sampling": True, "seed": 2**70}, {"sampling": True, "temperature": 1e-300}, {"sampling": True, "top_p": 1e-300},
    {"beam_size": True}, {"max_len_b": float("nan")}, {"beam_size": "5"}, {"top_k": 2.5}, {"min_len": None},
]


def test_hostile_settings_fail_only_their_own_item(predictor):
    good = {"image": IMG, "decoding": {"max_len_b": 4}}
    items = [good] + [{"image": IMG, "decoding": d} for d in HOSTILE_DECODING] + [
        {"image": IMG, "mode": "beam"}, {"image": IMG, "mode": ["open"]}, {"image": IMG, "decoding": [1]},
        {"image": IMG, "decoding": {1: 2}}, good]
    out = predictor.predict("caption", items)
    assert reasons(out) == [None] + ["bad_setting"] * (len(items) - 2) + [None]
    assert all(o["error"]["type"] == "TaskInputError" for o in out[1:-1])
    assert out[0]["text"] == out[-1]["text"] and out[0]["score"] == pytest.approx(out[-1]["score"], rel=1e-5)
    assert "GenerationConfig.max_len_a must lie in [0.0, 10.0], got 1e+308" in out[1]["error"]["message"]
    assert "GenerationConfig.seed must lie in" in out[4]["error"]["message"]
    assert "GenerationConfig.beam_size must be an integer, got bool True" in out[7]["error"]["message"]


# ---------------------------------------------------------------------------------------------- work limits


@pytest.mark.parametrize("task,item,message", [
    ("caption", {"decoding": {"beam_size": 64, "max_len_b": 4096, "min_len": 4096}},
     "64 beams x up to 1025 tokens is over the limit of 1024 decoded tokens"),
    ("caption", {"decoding": {"beam_size": 64, "num_return_sequences": 64}},
     "num_return_sequences=64 is over the limit of 8"),
    ("caption", {"decoding": {"beam_size": 2, "max_len_a": 10.0, "max_len_b": 0}},
     "2 beams x up to 820 tokens"),  # 10 x the longest source (80 + 2 tokens)
    ("text_to_image", {"text": "a cat", "decoding": {"sampling": False, "beam_size": 33}},
     "33 beams x 256 codes is over the limit of 8192 codes"),
    ("text_to_image", {"text": "a cat", "num_samples": 9}, "num_samples=9 is over the limit of 8"),
    ("image_classification", {"candidates": [f"class {i}" for i in range(10**4)]},
     "10000 candidates, over the limit of 1000"),
    ("vqa", {"text": "what?", "mode": "trie", "candidates": [f"answer {i}" for i in range(10**4)]},
     "10000 candidates"),
    ("vqa", {"text": "why? " * 10**4}, "field 'text' has 50000 characters, over the limit of 4096"),
    ("vqa", {"text": "what?", "mode": "allcand", "candidates": ["red", "x" * 5000]},
     "field 'candidates' has 5000 characters"),
    ("text_infilling", {"text": "a <mask> " * 1000}, "field 'text' has 9000 characters"),
])
def test_requests_over_the_limits_are_refused_before_any_work(no_model, task, item, message):
    [out] = no_model.predict(task, [{"image": IMG, **item}])
    assert out["error"]["reason"] == "limit_exceeded" and out["error"]["type"] == "TaskInputError"
    assert message in out["error"]["message"]


def test_too_many_items_fail_the_call(no_model):
    with pytest.raises(TaskInputError, match="65 inputs in one call, over the limit of 64") as info:
        no_model.predict("caption", [{"image": IMG}] * 65)
    assert info.value.reason == "limit_exceeded"
    with pytest.raises(TaskInputError, match="inputs must be a list") as info:
        no_model.predict("caption", "abc")
    assert info.value.reason == "bad_type"


def test_every_task_default_is_within_the_default_limits(no_model):
    for name, spec in TASKS.items():
        mode, gen = no_model._options(spec, {"candidates": ["a", "b"]})
        grid = {"max_len_a": 0.0, "max_len_b": 256, "min_len": 256} if spec.code_target else {}  # the model's
        assert gen == dataclasses.replace(spec.generation, **grid), name
    big = no_model._options(TASKS["text_to_image"], {})[1]  # 1 sample x the model's 16 x 16 codes
    assert (big.num_return_sequences, big.max_len_b, big.min_len, big.top_k) == (1, 256, 256, 256)


def test_limits_are_configurable_and_checked(parts):
    model, vocab, pcfg = parts
    limits = PredictorLimits(max_items=2, max_beam_tokens=10, max_return_sequences=1, max_candidates=2,
                             max_text_chars=5)
    pred = OFAPredictor(model, vocab, pcfg, limits=limits)
    assert pred.limits is limits and OFAPredictor(model, vocab, pcfg).limits == PredictorLimits()
    out = pred.predict("vqa", [{"image": IMG, "text": "what?", "decoding": {"beam_size": 2, "max_len_b": 5}},
                               {"image": IMG, "text": "what?", "decoding": {"beam_size": 2, "max_len_b": 6}}])
    assert "error" not in out[0] and out[1]["error"]["reason"] == "limit_exceeded"
    out = pred.predict("vqa", [{"image": IMG, "text": "what??", "decoding": {"beam_size": 1}},
                               {"image": IMG, "text": "what?", "mode": "allcand", "candidates": ["a", "b", "c"]}])
    assert reasons(out) == ["limit_exceeded", "limit_exceeded"]
    with pytest.raises(TaskInputError, match="3 inputs"):
        pred.predict("vqa", [{}] * 3)
    for bad in (0, -1, True, 2.0, "8"):
        with pytest.raises(ValueError, match=r"PredictorLimits.max_items must (be an integer|lie in \[1, inf\])"):
            PredictorLimits(max_items=bad)



def test_limits_may_be_a_mapping_validated_at_construction(parts):
    model, vocab, pcfg = parts
    pred = OFAPredictor(model, vocab, pcfg, limits={"max_items": 3})
    assert pred.limits == PredictorLimits(max_items=3)
    with pytest.raises(TaskInputError, match="4 inputs in one call, over the limit of 3"):
        pred.predict("caption", [{"image": IMG}] * 4)
    for bad, message in [({"max_itemz": 3}, r"unknown PredictorLimits keys: \['max_itemz'\]"),
                         ({"max_items": 0}, r"PredictorLimits\.max_items must lie in \[1, inf\], got 0"),
                         ({"max_items": "3"}, r"PredictorLimits\.max_items must be an integer, got str"),
                         ([("max_items", 3)], r"limits must be a PredictorLimits or a mapping of its fields, got list"),
                         (3, r"limits must be a PredictorLimits or a mapping of its fields, got int")]:
        with pytest.raises(ConfigError, match=message):
            OFAPredictor(model, vocab, pcfg, limits=bad)

# ---------------------------------------------------------------------------------------------- chunking


def test_inputs_are_preprocessed_and_run_one_chunk_at_a_time(predictor, monkeypatch):
    events = []
    real_request, real_run = predictor_module.inference_request, predictor._run

    def request(*args, **kw):
        events.append("prep")
        return real_request(*args, **kw)

    def run(spec, mode, gen, reqs):
        events.append(f"run{len(reqs)}")
        return real_run(spec, mode, gen, reqs)

    monkeypatch.setattr(predictor_module, "inference_request", request)
    monkeypatch.setattr(predictor, "_run", run)
    items = [{"image": IMG, "text": f"is it {i}?"} for i in range(10)]
    items[5] = {"image": b"", "text": "broken"}  # fails in preprocessing, alone
    out = predictor.predict("itm", items)
    assert events == ["prep"] * 4 + ["run4"] + ["prep"] * 4 + ["run3"] + ["prep"] * 2 + ["run2"]
    assert reasons(out) == [None] * 5 + ["empty_image"] + [None] * 4
    assert all(o["label"] in ("yes", "no") for i, o in enumerate(out) if i != 5)


# ---------------------------------------------------------------------------------------------- user text


def test_user_text_reaches_the_model_as_plain_text(predictor, monkeypatch):
    seen = []
    real_encode = predictor.model.encode

    def encode(src, *args, **kw):
        seen.append(src.clone())
        return real_encode(src, *args, **kw)

    monkeypatch.setattr(predictor.model, "encode", encode)
    out = predictor.predict("vqa", [{"image": IMG, "text": HOSTILE, "mode": "allcand", "candidates": [HOSTILE, "red"]}])
    assert set(out[0]["scores"]) == {HOSTILE, "red"}
    out = predictor.predict("glue_mnli", [{"text": HOSTILE, "text2": HOSTILE}])
    assert out[0]["label"] in ("yes", "maybe", "no")
    vocab = predictor.vocab
    ids = torch.cat([s.flatten() for s in seen]).tolist()
    assert not any(vocab.is_bin(t) or vocab.is_code(t) or t == vocab.mask_id for t in ids)


# ---------------------------------------------------------------------------------------------- bugs raise


@pytest.mark.parametrize("where,error", [("inference_request", ValueError), ("inference_request", TypeError),
                                         ("decode", RuntimeError), ("parse_output", ValueError)])
def test_bugs_raise_instead_of_becoming_input_errors(predictor, monkeypatch, where, error):
    def bug(*args, **kw):
        raise error("a bug in our code")

    target = predictor.model if where == "decode" else predictor_module
    monkeypatch.setattr(target, where, bug)
    with pytest.raises(error, match="a bug in our code") as info:
        predictor.predict("caption", [{"image": IMG, "decoding": {"max_len_b": 3}}])
    assert not isinstance(info.value, InputError)
