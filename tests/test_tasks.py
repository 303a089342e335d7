"""Tasks: exact prompts, rows -> model inputs, box codec through the task path, instruction parser."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ofa_model.preprocess import PreprocessConfig, blank_centre, normalize_pixels
from ofa_model.tasks import (
    TASKS,
    TaskInputError,
    build_example,
    inference_request,
    parse_instruction,
    parse_output,
)
from ofa_model.vocab import Vocabulary

PCFG = PreprocessConfig(patch_image_size=64, max_image_size=64)  # bins span the whole image

OFA_PROMPTS = {  # OFA's wording, leading spaces included (two for grounded captioning)
    "caption": " what does the image describe?",
    "vqa": " {question}",
    "grounding": ' which region does the text " {text} " describe?',
    "visual_entailment": ' does the image describe " {text} "?',
    "image_classification": " what does the image describe?",
    "itm": ' does the image describe " {text} "?',
    "qa_matching": ' what is the answer to question " {question} ". is " {answer} "?',
    "grounded_caption": "  what does the region describe? region:",
    "glue_cola": ' is the text " {text} " grammatically correct?',
    "glue_sst2": ' is the sentiment of text " {text} " positive or negative?',
    "glue_mnli": ' can text1 " {text1} " imply text2 " {text2} "?',
    "glue_rte": ' can text1 " {text1} " imply text2 " {text2} "?',
    "glue_mrpc": ' does text1 " {text1} " and text2 " {text2} " have the same semantics?',
    "glue_qqp": ' is question " {q1} " and question " {q2} " equivalent?',
    "glue_qnli": ' does " {sentence} " contain the answer to question " {question} "?',
    "summarization": ' what is the summary of article " {text} "?',
    "text_to_image": " what is the complete image? caption: {text}",
    "image_infilling": " what is the image in the middle part?",
    "text_infilling": ' what is the complete text of " "?',
    "detection": " what are the objects in the image?",
}


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.gpt2()


def png(size=(80, 60), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_every_prompt_is_exact():
    assert {name: spec.prompt for name, spec in TASKS.items()} == OFA_PROMPTS
    assert TASKS["visual_entailment"].labels == ("no", "yes", "maybe")
    assert TASKS["glue_mnli"].labels == ("yes", "maybe", "no")
    assert TASKS["glue_sst2"].labels == ("positive", "negative")


def test_caption_example(vocab):
    ex = build_example(TASKS["caption"], {"image": png(), "target": "A red, square!"}, vocab, PCFG)
    cap = vocab.encode(" a red square")
    assert ex["source"] == [0] + vocab.encode(" what does the image describe?") + [2]
    assert ex["prev_output"] == [0] + cap and ex["target"] == cap + [2]
    assert ex["image"].shape == (3, 64, 64) and ex["image_size"] == (80, 60)
    assert ex["image"][0, 0, 0].item() == pytest.approx(200 / 255 * 2 - 1, abs=1e-6)


def test_vqa_prev_output_and_confidence(vocab):
    row = {"image": png(), "text": "What colour is it", "target": "red", "targets": ["red", "pink"],
           "target_weights": [0.6, 0.3]}
    ex = build_example(TASKS["vqa"], row, vocab, PCFG)
    q, a = vocab.encode(" what colour is it?"), vocab.encode(" red")
    assert ex["source"] == [0] + q + [2]
    assert ex["prev_output"] == [0] + q + a
    assert ex["target"] == [1] * len(q) + a + [2]  # question positions are ignored (pad)
    assert ex["target_weight"] == pytest.approx(0.6)


def test_grounding_bins_and_round_trip(vocab):
    row = {"image": png((80, 60)), "text": "The red thing.", "box": [8.0, 6.0, 40.0, 30.0]}
    ex = build_example(TASKS["grounding"], row, vocab, PCFG)
    assert ex["source"][1:-1] == vocab.encode(' which region does the text " the red thing. " describe?')
    bins = [t - vocab.bin_offset for t in ex["target"][:4]]
    assert bins == [100, 100, 500, 500] and ex["target"][4] == vocab.eos_id  # round(8/80*999), round(6/60*999)...
    req = inference_request(TASKS["grounding"], row, vocab, PCFG)
    box = parse_output(TASKS["grounding"], ex["target"][:4], vocab, req, PCFG)["box"]
    assert np.allclose(box, [8, 6, 40, 30], atol=80 / 999)  # within one bin
    rng = np.random.default_rng(0)
    aug = build_example(TASKS["grounding"], row, vocab, PCFG, train=True, rng=rng)
    assert aug["image"].shape == (3, 64, 64) and all(vocab.is_bin(t) for t in aug["target"][:4])


def test_box_bins_are_normalised_by_max_image_size(vocab):
    # OFA divides resized-pixel coordinates by --max-image-size (512): at 480 px a full-image box is bin 937
    pcfg = PreprocessConfig(patch_image_size=480)
    row = {"image": png((80, 60)), "text": "all", "box": [0, 0, 80, 60]}
    ex = build_example(TASKS["grounding"], row, vocab, pcfg)
    assert [t - vocab.bin_offset for t in ex["target"][:4]] == [0, 0, 937, 937]
    req = inference_request(TASKS["grounding"], row, vocab, pcfg)
    box = parse_output(TASKS["grounding"], ex["target"][:4], vocab, req, pcfg)["box"]
    assert np.allclose(box, [0, 0, 80, 60], atol=0.1)


def test_glue_src_prompt(vocab):
    row = {"text": "A gripping film", "target": "positive"}
    ex = build_example(TASKS["glue_sst2"], row, vocab, PCFG)
    assert ex["image"] is None and ex["prev_output"] == ex["source"]
    assert ex["target"] == [1] * (len(ex["source"]) - 1) + vocab.encode(" positive")
    with pytest.raises(TaskInputError, match="label 'great' is not one of"):
        build_example(TASKS["glue_sst2"], {"text": "x", "target": "great"}, vocab, PCFG)
    two = build_example(TASKS["glue_qnli"], {"text": "who?", "text2": "Bob did it", "target": "yes"}, vocab, PCFG)
    assert two["source"][1:-1] == vocab.encode(' does " bob did it " contain the answer to question " who? "?')


def test_summarization_has_no_leading_space_and_noise(vocab):
    row = {"text": "Stocks Rose Today in a big rally", "target": "Stocks rise"}
    ex = build_example(TASKS["summarization"], row, vocab, PCFG)
    assert ex["target"] == vocab.encode("stocks rise") + [2]
    unk = build_example(TASKS["summarization"], {"text": "The <unk> rose", "target": "x"}, vocab, PCFG)
    assert unk["source"][1:-1] == vocab.encode(' what is the summary of article " the unk rose "?')
    noisy = build_example(TASKS["summarization"], {**row, "text": "a " * 50, "target": "b " * 25}, vocab, PCFG,
                          train=True, rng=np.random.default_rng(1))
    clean = build_example(TASKS["summarization"], {**row, "text": "a " * 50, "target": "b " * 25}, vocab, PCFG)
    changed = sum(x != y for x, y in zip(noisy["prev_output"], clean["prev_output"], strict=True))
    assert 0 < changed < len(clean["prev_output"]) and noisy["target"] == clean["target"]


def test_text_infilling(vocab):
    text = "the quick brown fox jumps over the lazy dog and runs far away into the woods"
    ex = build_example(TASKS["text_infilling"], {"text": text}, vocab, PCFG, train=True, rng=np.random.default_rng(3))
    prompt = vocab.encode(' what is the complete text of " "?')
    src = ex["source"]
    assert src[:len(prompt) - 1] == [0] + prompt[:-2] and src[-3:] == prompt[-2:] + [2]
    body = src[len(prompt) - 1:-3]
    assert vocab.mask_id in body and len(body) < len(vocab.encode(" " + text))
    assert ex["target"] == vocab.encode(" " + text) + [2]
    long = " ".join(["word"] * 300)  # OFA keeps the last 256 tokens and never cuts the closing '"?'
    ex = build_example(TASKS["text_infilling"], {"text": long}, vocab, PCFG, train=True, rng=np.random.default_rng(0))
    assert ex["source"][-3:] == prompt[-2:] + [2] and len(ex["target"]) == 257
    req = inference_request(TASKS["text_infilling"], {"text": "the quick <mask> jumps"}, vocab, PCFG)
    assert req.source == [0] + prompt[:-2] + vocab.encode(" the quick <mask> jumps") + prompt[-2:] + [2]


def test_codes_and_detection_targets(vocab):
    ex = build_example(TASKS["text_to_image"], {"text": "A cat", "codes": [0, 5, 8191]}, vocab, PCFG)
    assert ex["target"] == [vocab.code_offset, vocab.code_offset + 5, vocab.code_offset + 8191, 2]
    assert ex["code_mask"] is True and ex["image"] is None
    det = build_example(TASKS["detection"], {"image": png((100, 100)), "object_boxes": [[0, 0, 50, 50]],
                                             "object_labels": ["Cat"]}, vocab, PCFG)
    assert det["target"] == [vocab.bin_id(b) for b in (0, 0, 500, 500)] + vocab.encode(" cat") + [2]
    req = inference_request(TASKS["detection"], {"image": png((100, 100))}, vocab, PCFG)
    out = parse_output(TASKS["detection"], det["target"][:-1], vocab, req, PCFG)
    assert out["objects"][0]["label"] == "cat" and np.allclose(out["objects"][0]["box"], [0, 0, 50.05, 50.05], atol=0.1)


def test_image_infilling_blanks_the_centre(vocab):
    ex = build_example(TASKS["image_infilling"], {"image": png((64, 64)), "codes": list(range(4))}, vocab, PCFG)
    assert ex["image"][:, 16:48, 16:48].abs().sum() == 0 and ex["image"][:, :16].abs().sum() > 0


def noisy_png(size=(80, 60), seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_uint8_pixels_normalise_to_the_float_image_bit_for_bit(vocab):
    pcfg = PreprocessConfig(patch_image_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    cases = [("caption", {"target": "a cat"}, False), ("image_infilling", {"codes": [1, 2]}, False),
             ("grounding", {"text": "it", "box": [10, 5, 60, 40]}, True)]  # train: random crop, same rng seed
    for name, fields, train in cases:
        row = {"image": noisy_png(), **fields}
        kw = {"train": train, "rng": np.random.default_rng(7)} if train else {}
        ref = build_example(TASKS[name], row, vocab, pcfg, **kw)
        kw = {"train": train, "rng": np.random.default_rng(7)} if train else {}
        got = build_example(TASKS[name], row, vocab, pcfg, pixels="uint8", **kw)
        assert got["image"].dtype == torch.uint8 and got["image"].shape == (3, 32, 32)
        assert got["image_blank"] is (name == "image_infilling")
        image = normalize_pixels(got["image"], pcfg)
        if got["image_blank"]:
            assert not torch.equal(image, ref["image"])  # the centre is still there before blanking
            blank_centre(image)
        assert torch.equal(image, ref["image"]), name
        assert {k: v for k, v in got.items() if k not in ("image", "image_blank")} == \
            {k: v for k, v in ref.items() if k != "image"}
    text = build_example(TASKS["glue_sst2"], {"text": "fine", "target": "positive"}, vocab, pcfg, pixels="uint8")
    assert text["image"] is None and text["image_blank"] is False
    with pytest.raises(ValueError, match="pixels must be one of"):
        build_example(TASKS["caption"], {"image": png(), "target": "x"}, vocab, pcfg, pixels="float16")


def test_grounded_caption_renders_region_bins(vocab):
    row = {"image": png((100, 100)), "box": [0, 0, 50, 50], "target": "A red region."}
    ex = build_example(TASKS["grounded_caption"], row, vocab, PCFG)
    expected = vocab.encode("  what does the region describe? region:") + [vocab.bin_id(b) for b in (0, 0, 500, 500)]
    assert ex["source"] == [0] + expected + [2]


@pytest.mark.parametrize("row,message", [
    ({"target": "x"}, "field 'image' is missing"),
    ({"image": png(), "target": "   "}, "field 'target' is empty"),
    ({"image": png(), "target": 5}, "must be text"),
    ({"image": "not bytes", "target": "x"}, "must be image bytes"),
])
def test_row_errors_name_the_field(vocab, row, message):
    with pytest.raises(TaskInputError, match=message):
        build_example(TASKS["caption"], row, vocab, PCFG)


@pytest.mark.parametrize("box,message", [
    ([10, 10, 5, 20], "x1 > x0"), ([0, 0, 10], "x0, y0, x1, y1"), ([0, 0, 500, 50], "outside the 80x60 image"),
    ([0, float("nan"), 5, 5], "x1 > x0"),
])
def test_absurd_boxes_are_rejected(vocab, box, message):
    with pytest.raises(TaskInputError, match=message):
        build_example(TASKS["grounding"], {"image": png(), "text": "x", "box": box}, vocab, PCFG)


def test_instruction_parser_matches_builtin_tasks(vocab):
    cap = parse_instruction("[IMAGE:image] what does the image describe? -> [TEXT:caption]")
    assert cap.prompt == TASKS["caption"].prompt and cap.target_field == "caption" and cap.image_field == "image"
    a = build_example(cap, {"image": png(), "caption": "A dog"}, vocab, PCFG)
    b = build_example(TASKS["caption"], {"image": png(), "target": "A dog"}, vocab, PCFG)
    assert a["source"] == b["source"] and a["target"] == b["target"]
    grd = parse_instruction('[IMAGE:img] which region does the text " [TEXT:phrase] " describe? -> [BOX:box]')
    row = {"img": png(), "phrase": "the red thing", "box": [8, 6, 40, 30]}
    a = build_example(grd, row, vocab, PCFG)
    b = build_example(TASKS["grounding"], {"image": png(), "text": "the red thing", "box": [8, 6, 40, 30]}, vocab, PCFG)
    assert a["source"] == b["source"] and a["target"] == b["target"]
    lab = parse_instruction("[TEXT:review] is this review positive? -> [LABEL:sentiment]")
    assert lab.inference == "candidates" and lab.image_field is None and lab.prompt == " {slot0} is this review positive?"
    with pytest.raises(TaskInputError, match="field 'phrase' is missing"):
        build_example(grd, {"img": png(), "box": [1, 1, 2, 2]}, vocab, PCFG)


@pytest.mark.parametrize("line,message", [
    ("[IMAGE:image] describe it", "exactly one '->'"),
    ("[IMAGE:image] describe -> [TEXT:a] -> [TEXT:b]", "exactly one '->'"),
    ("[PICTURE:image] describe -> [TEXT:caption]", r"unknown source slot \[PICTURE:image\]"),
    ("[IMAGE:] describe -> [TEXT:caption]", r"slot \[IMAGE:\] needs a column name"),
    ("[IMAGE:image] describe -> [TEXT:caption] [TEXT:other]", "exactly one slot"),
    ("[IMAGE:image] describe -> the caption", "exactly one slot"),
    ("[TEXT:phrase] where? -> [BOX:box]", r"target \[BOX:box\] needs an \[IMAGE:column\]"),
    ("[IMAGE:a] [IMAGE:b] describe -> [TEXT:c]", "at most one"),
    ("[IMAGE:image] describe -> [CODES:c]", r"unknown target slot \[CODES:c\]"),
    ("[IMAGE:image] [TEXT:bad col] -> [TEXT:c]", r"slot \[TEXT:bad col\] needs a column name"),
])
def test_instruction_parser_errors(line, message):
    with pytest.raises(ValueError, match=message):
        parse_instruction(line)
