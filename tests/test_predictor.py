"""OFAPredictor end to end on an ofa-micro bundle: every task, values against direct computation.

Floats that come out of a batch are compared with tolerances: the CPU's instruction set, the thread count and
a row's position in the batch may change their last bits. Token ids, strings and labels are compared exactly.
"""

import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from ofa_model import OFAModel, Vocabulary, get_config, save_bundle
from ofa_model.errors import error_dict
from ofa_model.generation import GenerationConfig, SpecialIds, generate, score_candidates
from ofa_model.predictor import OFAPredictor
from ofa_model.preprocess import PreprocessConfig, normalize_caption
from ofa_model.tasks import TASKS, TaskInputError, inference_request


def png(size=(80, 60), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def huge_header_png(w=30000, h=30000) -> bytes:
    """A valid PNG skeleton whose header claims w x h pixels (no pixel data)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    torch.manual_seed(0)
    model = OFAModel(get_config("ofa-micro"))
    path = tmp_path_factory.mktemp("bundle") / "micro"
    save_bundle(path, model, Vocabulary.gpt2(), preprocess=PreprocessConfig(patch_image_size=64))
    return OFAPredictor.from_bundle(path, max_batch_size=4)


IMG = png()
SHORT = {"max_len_b": 6}
INPUTS = {
    "caption": {"image": IMG, "decoding": SHORT},
    "vqa": {"image": IMG, "text": "what color is it?", "decoding": SHORT},
    "grounding": {"image": IMG, "text": "the red thing"},
    "visual_entailment": {"image": IMG, "text": "it is red"},
    "image_classification": {"image": IMG, "candidates": ["red square", "blue circle", "green"]},
    "itm": {"image": IMG, "text": "a red square"},
    "qa_matching": {"image": IMG, "text": "what color?", "text2": "red"},
    "grounded_caption": {"image": IMG, "box": [10, 10, 40, 40], "decoding": SHORT},
    "glue_cola": {"text": "him went home"},
    "glue_sst2": {"text": "great movie"},
    "glue_mnli": {"text": "a man runs", "text2": "a person moves"},
    "glue_rte": {"text": "a man runs", "text2": "a person moves"},
    "glue_mrpc": {"text": "a b", "text2": "a c"},
    "glue_qqp": {"text": "how?", "text2": "why?"},
    "glue_qnli": {"text": "who?", "text2": "bob"},
    "summarization": {"text": "the quick brown fox jumps over the lazy dog", "decoding": SHORT},
    "text_to_image": {"text": "a red square", "seed": 0},  # images: tests/test_text_to_image.py
    "image_infilling": {"image": png((64, 64)), "seed": 0},
    "text_infilling": {"text": "hello world", "decoding": SHORT},
    "detection": {"image": IMG, "decoding": {"max_len_b": 10}},
}


def test_inputs_cover_every_task():
    assert set(INPUTS) == set(TASKS)


def assert_same_answer(a, b, path="result"):
    """Equal structure, strings and ints exactly; floats within 1e-5 relative / 1e-6 absolute."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, float) and isinstance(b, float), path
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same_answer(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_answer(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("task", sorted(INPUTS))
def test_every_task_end_to_end(predictor, task):
    spec = TASKS[task]
    out = predictor.predict(task, [INPUTS[task], INPUTS[task]])
    if spec.code_target:  # this bundle has no image tokenizer (tests/test_text_to_image.py has one)
        assert [o["error"]["reason"] for o in out] == ["no_image_tokenizer"] * 2
        return
    assert len(out) == 2 and "error" not in out[0], out[0]
    if not spec.generation.sampling:
        assert_same_answer(out[0], out[1])  # batched copies agree (floats to rounding)
    if spec.inference != "generate":
        scores = out[0]["scores"]
        assert set(scores) == set(INPUTS[task].get("candidates") or spec.labels)
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
        assert out[0]["label"] == max(scores, key=scores.get)
    elif spec.target_kind == "box":
        x0, y0, x1, y1 = out[0]["box"]
        assert 0 <= x0 <= x1 <= 80 and 0 <= y0 <= y1 <= 60
    elif spec.target_kind == "objects":
        assert isinstance(out[0]["objects"], list)
    else:
        assert out[0].keys() == {spec.answer_key, "score"} and spec.answer_key == ("answer" if task == "vqa" else "text")
        assert isinstance(out[0][spec.answer_key], str) and isinstance(out[0]["score"], float)


def test_generation_equals_direct_decoding(predictor):
    vocab, pcfg, model = predictor.vocab, predictor.preprocess, predictor.model
    spec = TASKS["caption"]
    [res] = predictor.predict("caption", [{"image": IMG, "decoding": SHORT}])
    req = inference_request(spec, {"image": IMG}, vocab, pcfg)
    hyps = generate(model, torch.tensor([req.source]), req.image[None], cfg=GenerationConfig(
        beam_size=5, max_len_b=6, no_repeat_ngram_size=3), ids=SpecialIds.of(vocab))
    assert res["score"] == pytest.approx(hyps[0][0].score, abs=1e-5)
    assert res["text"] == normalize_caption(vocab.decode(hyps[0][0].tokens))  # OFA's caption post-processing


def test_grounding_box_equals_decoded_bins(predictor):
    vocab, pcfg, model = predictor.vocab, predictor.preprocess, predictor.model
    item = {"image": png((120, 90)), "text": "the red thing"}
    [res] = predictor.predict("grounding", [item])
    req = inference_request(TASKS["grounding"], item, vocab, pcfg)
    hyps = generate(model, torch.tensor([req.source]), req.image[None], cfg=TASKS["grounding"].generation,
                    ids=SpecialIds.of(vocab), constraints=[req.constraint])
    bins = [t - vocab.bin_offset for t in hyps[0][0].tokens]
    assert len(bins) == 4 and max(bins) <= 125  # 64 px of a 512 px bin range: bins 0..ceil(999 / 8)
    m = 512 / 64  # coordinate = bin / 999 * max_image_size / (resized / original)
    xs = sorted(min(b / 999 * m * 120, 120) for b in (bins[0], bins[2]))
    ys = sorted(min(b / 999 * m * 90, 90) for b in (bins[1], bins[3]))
    want = [xs[0], ys[0], xs[1], ys[1]]
    assert res["box"] == pytest.approx(want)


def test_vqa_modes(predictor):
    vocab, pcfg, model = predictor.vocab, predictor.preprocess, predictor.model
    cands = ["red", "blue", "dark green"]
    base = {"image": IMG, "text": "what color is it?", "candidates": cands}
    trie, allcand = predictor.predict("vqa", [{**base, "mode": "trie"}, {**base, "mode": "allcand"}])
    assert trie["answer"] in cands and allcand["answer"] in cands
    req = inference_request(TASKS["vqa"], base, vocab, pcfg, "allcand")
    enc = model.encode(torch.tensor([req.source]), req.image[None])
    direct = score_candidates(model, enc, [req.candidate_tokens], ids=SpecialIds.of(vocab), prefix_tokens=[req.prefix],
                              restrict_to_candidates=True)[0]
    probs = torch.tensor(direct).softmax(-1)
    assert [allcand["scores"][c] for c in cands] == pytest.approx(probs.tolist(), abs=1e-5)



@pytest.mark.parametrize("task, item", [
    ("vqa", {"text": "what color is it?", "mode": "allcand"}),
    ("vqa", {"text": "what color is it?", "mode": "trie"}),
    ("image_classification", {}),
])
def test_duplicate_candidates_are_refused_not_collapsed(predictor, task, item):
    """`scores` is keyed by candidate, so a repeated one would silently merge: it is an error naming it."""
    dup, ok = predictor.predict(task, [{"image": IMG, **item, "candidates": ["red", "blue", "red"]},
                                       {"image": IMG, **item, "candidates": ["red", "blue"]}])
    assert dup.keys() == {"error"} and dup["error"]["type"] == "TaskInputError"
    assert dup["error"]["reason"] == "duplicate_candidate"
    assert "'candidates' lists 'red' more than once" in dup["error"]["message"]
    assert "error" not in ok


def test_glue_last_token_equals_manual_logits(predictor):
    vocab, pcfg, model = predictor.vocab, predictor.preprocess, predictor.model
    item = {"text": "a man runs", "text2": "a person moves"}
    [res] = predictor.predict("glue_mnli", [item])
    req = inference_request(TASKS["glue_mnli"], item, vocab, pcfg)
    src = torch.tensor([req.source])
    logits = model(src, prev_output_tokens=src)[0, -1]
    ids = [vocab.encode(" " + w)[0] for w in ("yes", "maybe", "no")]
    probs = logits[ids].softmax(-1)
    assert [res["scores"][w] for w in ("yes", "maybe", "no")] == pytest.approx(probs.tolist(), abs=1e-5)


def test_bad_inputs_give_typed_errors_and_keep_the_rest(predictor):
    good = {"image": IMG, "decoding": SHORT}
    truncated = png()[:40]
    items = [good, {"image": truncated}, {"image": b""}, {"image": b"hello, this is text\n" * 5},
             {"image": huge_header_png()}, {"decoding": SHORT}, {**good, "decoding": {"beam": 3}},
             {**good, "decoding": {"seed": [1]}}, "not an object", good]
    out = predictor.predict("caption", items)
    assert "text" in out[0] and out[0]["text"] == out[-1]["text"]
    assert out[0]["score"] == pytest.approx(out[-1]["score"], rel=1e-5)
    errors = [o["error"] for o in out[1:-1]]
    assert all(o.keys() == {"error"} and o["error"].keys() == {"type", "reason", "message"} for o in out[1:-1])
    assert [(e["type"], e["reason"]) for e in errors] == [
        ("TruncatedImageError", "truncated_image"), ("EmptyImageError", "empty_image"),
        ("NotAnImageError", "not_an_image"), ("ImageTooLargeError", "image_too_large"),
        ("TaskInputError", "missing_field"), ("TaskInputError", "bad_setting"), ("TaskInputError", "bad_setting"),
        ("TaskInputError", "bad_type")]
    assert "seed must be an integer" in out[7]["error"]["message"]
    assert "field 'image' is missing" in out[5]["error"]["message"]
    assert "unknown decoding settings ['beam']" in out[6]["error"]["message"]
    for task in ("poetry", ["caption"], None):
        with pytest.raises(TaskInputError, match="unknown task") as info:
            predictor.predict(task, [good])
        assert error_dict(info.value)["error"]["reason"] == "unknown_task"
    [no_cands] = predictor.predict("image_classification", [{"image": IMG}])
    assert no_cands["error"]["reason"] == "missing_field" and "needs 'candidates'" in no_cands["error"]["message"]


def test_grounding_without_a_box_answers_in_the_error_shape(predictor):
    [out] = predictor.predict("grounding", [{"image": IMG, "text": "it", "decoding": {"max_len_b": 2, "min_len": 2}}])
    assert out["box"] is None and isinstance(out["score"], float)
    assert out["error"] == {"type": "NoAnswerError", "reason": "no_hypothesis",
                            "message": "task grounding: the model produced 2 location tokens, expected 4"}
