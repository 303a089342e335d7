"""Tasks: exact prompts, rows -> model inputs, box codec through the task path, instruction parser."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ofa_model.errors import ConfigError, InputError
from ofa_model.instructions import MAX_INSTRUCTION_SLOTS, parse_instruction
from ofa_model.preprocess import PreprocessConfig, blank_centre, normalize_pixels
from ofa_model.tasks import (
    INFERENCE_KINDS,
    PROMPT_TYPES,
    TARGET_KINDS,
    TARGETS,
    TASKS,
    TaskInputError,
    build_example,
    inference_request,
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


def test_grounding_decodes_an_ordered_box_of_the_bins_inside_the_image(vocab):
    row = {"image": png((80, 60)), "text": "it"}
    for pcfg, last in ((PreprocessConfig(patch_image_size=64), 125), (PCFG, 999)):  # 64 of 512 px: bins 0..125
        cons = inference_request(TASKS["grounding"], row, vocab, pcfg).constraint
        assert cons.allowed_ranges == ((vocab.bin_offset, vocab.bin_offset + last + 1),) and cons.ordered_box
    assert inference_request(TASKS["text_to_image"], {"text": "a cat"}, vocab, PCFG).constraint.ordered_box is False


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
    words = [vocab.token_to_id(t) for t in ("Ġthe", "Ġquick")], [vocab.token_to_id("Ġjumps")]
    assert req.source == [0] + prompt[:-2] + words[0] + [vocab.mask_id] + words[1] + prompt[-2:] + [2]


@pytest.mark.parametrize("seed", range(8))
def test_text_infilling_training_and_inference_see_the_same_tokens(vocab, seed):
    text = "a cat sat on the mat, and the dog ran far away into the woods"
    ex = build_example(TASKS["text_infilling"], {"text": text}, vocab, PCFG, train=True,
                       rng=np.random.default_rng(seed))
    prompt = vocab.encode(' what is the complete text of " "?')
    masked = ex["source"][len(prompt) - 1:-3]
    assert vocab.mask_id in masked
    # the masked text as a user would send it: words around each <mask> keep their leading space (Ġ)
    typed = vocab.decode(masked)
    assert "<mask>" in typed
    req = inference_request(TASKS["text_infilling"], {"text": typed}, vocab, PCFG)
    assert req.source == ex["source"]
    after = [masked[i + 1] for i in range(len(masked) - 1) if masked[i] == vocab.mask_id]
    assert all(vocab.id_to_token(t).startswith("Ġ") for t in after)


def test_user_text_never_becomes_special_tokens(vocab):
    hostile = "<bin_5> <code_3> <mask>"
    special = {vocab.mask_id, *range(*vocab.code_range), *range(*vocab.bin_range)}
    plain = vocab.encode(" " + hostile)
    rows = [
        ("vqa", {"image": png(), "text": hostile, "candidates": [hostile, "red"]}, "allcand"),
        ("vqa", {"image": png(), "text": hostile, "candidates": [hostile]}, "trie"),
        ("grounding", {"image": png(), "text": hostile}, None),
        ("qa_matching", {"image": png(), "text": hostile, "text2": hostile}, None),
        ("glue_mnli", {"text": hostile, "text2": hostile}, None),
        ("summarization", {"text": hostile}, None),
        ("text_to_image", {"text": hostile}, None),
        ("text_infilling", {"text": hostile}, None),
    ]
    for name, item, mode in rows:
        req = inference_request(TASKS[name], item, vocab, PCFG, mode)
        ids = req.source + [t for c in req.candidate_tokens for t in c]
        if name == "text_infilling":  # the one field that reads <mask>; bins and codes stay text
            assert req.source.count(vocab.mask_id) == 1 and vocab.mask_id not in ids[:-4]
            ids = [t for t in ids if t != vocab.mask_id]
        assert not special & set(ids), name
    req = inference_request(TASKS["vqa"], rows[0][1], vocab, PCFG, "allcand")
    assert req.candidate_tokens[0] == plain  # " <bin_5> <code_3> <mask>" as ordinary BPE
    # training rows too: a text target, an infilling text and a detection label
    ex = build_example(TASKS["summarization"], {"text": "x", "target": hostile}, vocab, PCFG)
    assert ex["target"] == vocab.encode("<bin_5> <code_3> <mask>") + [2] and not special & set(ex["target"])
    det = build_example(TASKS["detection"], {"image": png((100, 100)), "object_boxes": [[0, 0, 50, 50]],
                                             "object_labels": [hostile]}, vocab, PCFG)
    assert det["target"][4:] == vocab.encode(" <bin_5> <code_3> <mask>") + [2]
    ex = build_example(TASKS["text_infilling"], {"text": hostile}, vocab, PCFG, train=True,
                       rng=np.random.default_rng(0))
    assert not special & set(ex["target"])


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



def test_an_instruction_over_the_slot_limit_is_a_typed_error():
    line = "[IMAGE:image] " + " ".join(f"[TEXT:c{i}]" for i in range(MAX_INSTRUCTION_SLOTS + 1)) + " -> [TEXT:t]"
    with pytest.raises(ConfigError, match=r"101 \[TEXT:column\] slots, over the limit of 100 "
                                          r"\(MAX_INSTRUCTION_SLOTS\)") as err:
        parse_instruction(line, "wide")
    assert err.value.reason == "bad_config"
    at_limit = line.replace(f" [TEXT:c{MAX_INSTRUCTION_SLOTS}]", "")
    assert len(parse_instruction(at_limit, "wide").slots) == MAX_INSTRUCTION_SLOTS


@pytest.mark.parametrize("words", ["{0}", "{__class__}", "{slot0}", "{x.y} {", "}{a!r}"])
def test_braces_in_an_instruction_are_literal_text(vocab, words):
    spec = parse_instruction(f"[IMAGE:image] what {words} [TEXT:q] -> [TEXT:a]", "braces")
    assert spec.slots == (("slot0", "q"),)
    example = build_example(spec, {"image": png(), "q": "is it", "a": "red"}, vocab, PCFG)
    assert vocab.decode(example["source"][1:-1]) == f" what {words} is it"


@pytest.mark.parametrize("prompt, message", [
    (" {0}", r"prompt field \{0\} must be a slot name"),
    (" {text.__class__}", r"prompt field \{text.__class__\} must be a slot name"),
    (" {text!r}", r"prompt field \{text!r\} must be a slot name"),
    (" {text:>99999}", r"prompt field \{text:>99999\} must be a slot name"),
    (" what } is", r"Single '\}' encountered"),
    (" {__class__}", r"prompt placeholders \['__class__'\] != slots"),
])
def test_a_prompt_names_only_its_slots(prompt, message):
    with pytest.raises(ConfigError, match=message):
        TASKS["vqa"].replace(name="mine", prompt=prompt, slots=(("text", "text"),) if "__class__" not in prompt else ())


def test_instruction_errors_are_typed():
    for line in ("[IMAGE:image] describe it", "[PICTURE:image] describe -> [TEXT:caption]", 7):
        with pytest.raises(ConfigError, match="instruction"):
            parse_instruction(line)


def test_answer_keys_and_caption_clean_up_are_spec_fields(vocab):
    keys = {name: spec.answer_key for name, spec in TASKS.items()}
    assert keys == {**{n: "label" for n in TASKS if n.startswith("glue_")}, "caption": "text", "vqa": "answer",
                    "grounding": "box", "visual_entailment": "label", "image_classification": "label",
                    "itm": "label", "qa_matching": "label", "grounded_caption": "text", "summarization": "text",
                    "text_to_image": "codes", "image_infilling": "codes", "text_infilling": "text",
                    "detection": "objects"}
    assert {n for n, s in TASKS.items() if s.clean_caption} == {"caption", "grounded_caption"}
    req = inference_request(TASKS["caption"], {"image": png()}, vocab, PCFG)
    tokens = vocab.encode(" A red, square!")
    assert parse_output(TASKS["caption"], tokens, vocab, req, PCFG) == {"text": "a red square"}
    assert parse_output(TASKS["caption"].replace(clean_caption=False, output_key="words"), tokens, vocab, req,
                        PCFG) == {"words": "A red, square!"}
    custom = parse_instruction("[IMAGE:image] what does the image describe? -> [TEXT:caption]")
    assert custom.clean_caption and custom.answer_key == "text"
    assert parse_instruction("[TEXT:t] is it good? -> [LABEL:l]").answer_key == "label"
    with pytest.raises(ValueError, match="output_key"):
        TASKS["caption"].replace(output_key="score")


def test_grounding_without_four_bins_follows_the_error_shape(vocab):
    req = inference_request(TASKS["grounding"], {"image": png(), "text": "it"}, vocab, PCFG)
    out = parse_output(TASKS["grounding"], [vocab.bin_id(3), vocab.bin_id(9)], vocab, req, PCFG)
    assert out == {"box": None, "error": {"type": "NoAnswerError", "reason": "no_hypothesis",
                                          "message": "task grounding: the model produced 2 location tokens, "
                                                     "expected 4"}}


def test_kinds_are_literal_types_checked_at_run_time():
    assert TARGET_KINDS == tuple(TARGETS) == ("text", "label", "box", "codes", "objects", "infill_text")
    assert (PROMPT_TYPES, INFERENCE_KINDS) == (("none", "prev_output", "src"), ("generate", "candidates", "last_token"))
    for field, value in (("target_kind", "boxes"), ("prompt_type", "prev"), ("inference", "beam")):
        with pytest.raises(ValueError, match=f"{field} must be one of .*, got '{value}'"):
            TASKS["caption"].replace(**{field: value})


@pytest.mark.parametrize("task,row,reason", [
    ("text_to_image", {"text": "a", "codes": ["1", "2"]}, "bad_type"),
    ("text_to_image", {"text": "a", "codes": 7}, "bad_type"),
    ("text_to_image", {"text": "a", "codes": [True]}, "bad_type"),
    ("text_to_image", {"text": "a", "codes": [8192]}, "bad_type"),
    ("detection", {"object_boxes": [[0, 0, 5, 5]], "object_labels": [5]}, "bad_type"),
    ("detection", {"object_boxes": 3, "object_labels": ["a"]}, "bad_type"),
    ("detection", {"object_boxes": [["a", 0, 5, 5]], "object_labels": ["a"]}, "bad_box"),
    ("caption", {"target": "a\ud800b"}, "bad_type"),
    ("glue_sst2", {"text": "x", "target": ["positive"]}, "bad_type"),
    ("vqa", {"text": "q?", "target": "red", "targets": ["red", "blue"], "target_weights": [1.0]}, "bad_type"),
    ("vqa", {"text": "q?", "target": "red", "targets": ["red"], "target_weights": [None]}, "bad_type"),
    ("vqa", {"text": "q?", "target": "red", "targets": ["red"], "target_weights": [float("nan")]}, "bad_type"),
])
def test_hostile_training_rows_raise_typed_input_errors(vocab, task, row, reason):
    if TASKS[task].image_field is not None:
        row = {"image": png(), **row}
    with pytest.raises(InputError) as info:
        build_example(TASKS[task], row, vocab, PCFG)
    assert info.value.reason == reason
