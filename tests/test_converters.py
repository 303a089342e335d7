"""Tests for pipelines.data.converters and jobs.prepare_data: every converter on a tiny fixture in its public
format (written here), easy-VQA on a slice of the real package data, bad inputs, and end-to-end shards."""

import collections
import gzip
import io
import json
import logging
import pickle
from pathlib import Path

import easy_vqa
import numpy as np
import pytest
from PIL import Image

from jobs import prepare_data
from ofa_model.preprocess import PreprocessConfig
from ofa_model.tasks import TASKS, build_example
from ofa_model.vocab import Vocabulary
from pipelines.data.converters import SOURCES, OutputError, convert, converter_options, prepare
from pipelines.data.converters.coco import convert_coco
from pipelines.data.converters.easyvqa import COLORS, SHAPES, convert_easy_vqa, parse_yes_no
from pipelines.data.converters.fashion_mnist import convert_fashion_mnist
from pipelines.data.converters.gigaword import convert_gigaword
from pipelines.data.converters.glue import GLUE_TASKS, convert_glue
from pipelines.data.converters.imagefolder import convert_imagefolder
from pipelines.data.converters.refcoco import convert_refcoco, load_refs
from pipelines.data.converters.snli_ve import LABEL_WORDS as SNLI_VE_LABEL_WORDS
from pipelines.data.converters.snli_ve import convert_snli_ve
from pipelines.data.converters.vqav2 import convert_vqav2, soft_targets
from pipelines.data.readers.ofa_tsv import glue_label_words
from pipelines.data.readers.rows import BadRow
from pipelines.data.schema import BAD_REASONS, FIELDS
from pipelines.data.shards import iter_rows, read_manifest

EASY_VQA_DATA = Path(easy_vqa.__file__).parent / "data"
# The exact RGB the easy-VQA generator paints each colour with (seen in the package images).
PALETTE = {"blue": (0, 0, 255), "red": (255, 0, 0), "brown": (165, 42, 42), "yellow": (255, 255, 0),
           "black": (0, 0, 0), "gray": (128, 128, 128), "teal": (0, 128, 128), "green": (0, 255, 0)}


def image_bytes(fmt: str = "JPEG", color: tuple[int, int, int] = (200, 10, 10), size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def assert_model_row(row: dict) -> None:
    """The row's task is a model task, and a label target is one of that task's label words."""
    assert row["task"] in TASKS, row["task"]
    spec = TASKS[row["task"]]
    if spec.target_kind == "label" and spec.labels and row["target"] is not None:
        assert row["target"] in spec.labels, (row["task"], row["target"])


def split_items(items):
    """(rows, bad rows); every row is checked against its model task, every reason against BAD_REASONS."""
    rows = [i for i in items if not isinstance(i, BadRow)]
    bad = [i for i in items if isinstance(i, BadRow)]
    for row in rows:
        assert_model_row(row)
    assert {b.reason for b in bad} <= set(BAD_REASONS)
    return rows, bad


def by_id(rows):
    return {r["id"]: r for r in rows}


def only(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


# ---------------------------------------------------------------------------------------------- easy-VQA

@pytest.fixture(scope="module")
def easy_rows():
    items = list(convert_easy_vqa(limit=3, seed=0))
    return split_items(items)


def test_easy_vqa_vqa_rows_match_questions_json(easy_rows):
    rows, _ = easy_rows
    for split in ("train", "test"):
        qs = json.loads((EASY_VQA_DATA / split / "questions.json").read_text())
        expected = [(n, q, a, i) for n, (q, a, i) in enumerate(qs) if i in (0, 1, 2)]
        expected.sort(key=lambda e: (e[3], e[0]))  # image by image, file order within an image
        got = only(rows, split=split, task="vqa")
        assert [r["id"] for r in got] == [f"easy-vqa/{split}/vqa/{n}" for n, *_ in expected]
        assert [(r["text"], r["target"], r["targets"], r["target_weights"]) for r in got] == [
            (q, a, [a], [1.0]) for _, q, a, _ in expected
        ]
        for r, (_, _, _, image_id) in zip(got, expected, strict=True):
            assert r["image"] == (EASY_VQA_DATA / split / "images" / f"{image_id}.png").read_bytes()
        yes_no = [e for e in expected if e[2] in ("yes", "no")]
        ve = only(rows, split=split, task="visual_entailment")
        assert sorted(r["id"] for r in ve) == sorted(f"easy-vqa/{split}/visual_entailment/{n}" for n, *_ in yes_no)
        assert all(set(r) == set(FIELDS) for r in rows)


def test_easy_vqa_image_rows_of_train_image_0(easy_rows):
    # questions.json says train image 0 is a blue rectangle ("what is the blue shape?" -> rectangle).
    rows, _ = easy_rows
    r = by_id(rows)
    assert r["easy-vqa/train/caption/0"]["target"] == "a blue rectangle"
    assert r["easy-vqa/train/caption/0"]["targets"] == ["a blue rectangle"]
    assert r["easy-vqa/train/image_classification/0"]["target"] == "rectangle"
    assert r["easy-vqa/train/grounding/0"]["text"] == "blue rectangle"
    # Read off the pixels by hand: pure blue in columns 27..56 and rows 38..61; column 26 and row 37 are
    # half blue (124, 117, 243 on a 248, 234, 230 tint) and count; column 57 and row 62 are 1/8 blue.
    assert r["easy-vqa/train/grounding/0"]["box"] == [26.0, 37.0, 57.0, 62.0]
    assert (r["easy-vqa/train/itm/0/pos"]["text"], r["easy-vqa/train/itm/0/pos"]["target"]) == ("a blue rectangle", "yes")
    neg = r["easy-vqa/train/itm/0/neg"]
    assert neg["target"] == "no" and neg["text"] != "a blue rectangle"
    _, color, shape = neg["text"].split(" ")
    assert color in COLORS and shape in SHAPES and (color == "blue") != (shape == "rectangle")


def test_easy_vqa_entailment_statements_hand_worked(easy_rows):
    rows, _ = easy_rows
    qs = json.loads((EASY_VQA_DATA / "train" / "questions.json").read_text())
    expected = {  # question -> (statement, answer), by hand, for questions of train image 0
        "does the image contain a rectangle?": ("the image contains a rectangle", "yes"),
        "is there a triangle in the image?": ("there is a triangle in the image", "no"),
        "does the image not contain a gray shape?": ("the image does not contain a gray shape", "yes"),
        "is there not a blue shape?": ("there is not a blue shape", "no"),
        "is a teal shape present?": ("a teal shape is present", "no"),
    }
    r = by_id(rows)
    for n, (q, a, i) in enumerate(qs[:20]):
        if i == 0 and q in expected:
            row = r[f"easy-vqa/train/visual_entailment/{n}"]
            assert (row["text"], row["target"]) == expected[q]
            assert a == expected[q][1]
    assert parse_yes_no("is no circle present?").text == "no circle is present"
    assert parse_yes_no("what color is the shape?") is None


def _independent_box(png: bytes, color: str) -> tuple[tuple, tuple, tuple]:
    """(box of pixels closer to the shape's palette colour than to the background, inner box of exact
    palette pixels, outer box of all non-background pixels); the background is pixel (0, 0)."""
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)
    bg, col = a[0, 0], np.array(PALETTE[color], float)

    def box(mask):
        ys, xs = np.nonzero(mask)
        return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)

    closer = ((a - col) ** 2).sum(-1) < ((a - bg) ** 2).sum(-1)
    return box(closer), box((a == col).all(-1)), box((a != bg).any(-1))


@pytest.mark.parametrize("split,image_id", [("train", 0), ("train", 2), ("test", 1)])
def test_easy_vqa_grounding_box_matches_shape_pixels(easy_rows, split, image_id):
    rows, _ = easy_rows
    row = by_id(rows)[f"easy-vqa/{split}/grounding/{image_id}"]
    color = row["text"].split(" ")[0]
    closer, inner, outer = _independent_box(row["image"], color)
    assert tuple(row["box"]) == closer
    x0, y0, x1, y1 = row["box"]
    assert outer[0] <= x0 <= inner[0] and outer[1] <= y0 <= inner[1]
    assert inner[2] <= x1 <= outer[2] and inner[3] <= y1 <= outer[3]


def test_easy_vqa_undetermined_image_and_seeded_negatives():
    # Test image 10 is the first test image whose questions leave its shape or colour open.
    rows, bad = split_items(list(convert_easy_vqa(splits=["test"], limit=11, seed=0)))
    assert [(b.id, b.reason) for b in bad] == [("easy-vqa/test/image/10", "attributes_undetermined")]
    assert not only(rows, id="easy-vqa/test/caption/10")
    assert len(only(rows, task="caption")) == 10 and len(only(rows, task="itm")) == 20

    def itm_texts(seed):
        rows, _ = split_items(list(convert_easy_vqa(splits=["test"], limit=11, seed=seed)))
        return [r["text"] for r in only(rows, task="itm")]

    assert itm_texts(0) == [r["text"] for r in only(rows, task="itm")]
    assert itm_texts(0) != itm_texts(1)


def test_easy_vqa_pretraining_stand_ins_for_detection_and_text(easy_rows):
    rows, bad = easy_rows
    more, more_bad = split_items(list(convert_easy_vqa(limit=3, seed=0, pretraining=True)))
    added = [r for r in more if r["task"] in ("detection", "text_infilling")]
    assert [r for r in more if r not in added] == rows and more_bad == bad  # the default rows, unchanged
    r = by_id(more)
    # train image 0, a blue rectangle: its grounding box, read off the pixels by hand above, and its shape
    det = r["easy-vqa/train/detection/0"]
    assert (det["object_boxes"], det["object_labels"]) == ([[26.0, 37.0, 57.0, 62.0]], ["rectangle"])
    assert r["easy-vqa/train/text_infilling/caption/0"]["text"] == "a blue rectangle"
    for split in ("train", "test"):
        grounding = only(rows, split=split, task="grounding")
        assert len(grounding) == len(only(more, split=split, task="detection")) == 3
        for g in grounding:
            image_id = g["id"].rsplit("/", 1)[1]
            det = r[f"easy-vqa/{split}/detection/{image_id}"]
            shape = r[f"easy-vqa/{split}/image_classification/{image_id}"]["target"]
            assert (det["object_boxes"], det["object_labels"], det["image"]) == ([g["box"]], [shape], g["image"])
            caption = r[f"easy-vqa/{split}/caption/{image_id}"]["target"]
            assert r[f"easy-vqa/{split}/text_infilling/caption/{image_id}"]["text"] == caption
        qs = json.loads((EASY_VQA_DATA / split / "questions.json").read_text())
        questions = sorted((f"easy-vqa/{split}/text_infilling/question/{n}", q)
                           for n, (q, _, i) in enumerate(qs) if i in (0, 1, 2))
        texts = [x for x in only(more, split=split, task="text_infilling") if "/question/" in x["id"]]
        assert sorted((x["id"], x["text"]) for x in texts) == questions
        assert all(x["image"] is None for x in texts)
    vocab, pcfg = Vocabulary.gpt2(), PreprocessConfig(patch_image_size=64)
    for row in added:  # each passes its task's preprocessing
        sample = build_example(TASKS[row["task"]], row, vocab, pcfg, train=True, rng=np.random.default_rng(0))
        assert sample["target"][-1] == vocab.eos_id and len(sample["target"]) > 1


# ---------------------------------------------------------------------------------------------- COCO

def test_coco_train_and_val(tmp_path):
    (tmp_path / "img").mkdir()
    a, b = image_bytes(color=(1, 2, 3)), image_bytes(color=(200, 100, 0))
    (tmp_path / "img" / "COCO_x_1.jpg").write_bytes(a)
    (tmp_path / "img" / "COCO_x_2.jpg").write_bytes(b)
    data = {
        "images": [{"id": 1, "file_name": "COCO_x_1.jpg"}, {"id": 2, "file_name": "COCO_x_2.jpg"},
                   {"id": 3, "file_name": "missing.jpg"}, {"id": 4, "file_name": "COCO_x_1.jpg"}],
        "annotations": [
            {"id": 11, "image_id": 1, "caption": "A man  riding a horse.\n"},
            {"id": 12, "image_id": 2, "caption": "Two dogs."},
            {"id": 13, "image_id": 1, "caption": "Someone on a horse"},
            {"id": 14, "image_id": 9, "caption": "orphan"},
            {"id": 15, "image_id": 2},
            {"id": 16, "image_id": 3, "caption": "lost image"},
            {"id": 17, "image_id": 1, "caption": " \n "},
        ],
    }
    for split in ("train", "val"):
        (tmp_path / f"captions_{split}.json").write_text(json.dumps(data))
    items = list(convert_coco(annotations={s: str(tmp_path / f"captions_{s}.json") for s in ("train", "val")},
                              image_root=str(tmp_path / "img")))
    rows, bad = split_items(items)
    assert [(r["id"], r["task"], r["target"], r["targets"], r["image"]) for r in rows] == [
        ("coco/train/11", "caption", "A man riding a horse.", None, a),
        ("coco/train/13", "caption", "Someone on a horse", None, a),
        ("coco/train/12", "caption", "Two dogs.", None, b),
        ("coco/val/1", "caption", "A man riding a horse.", ["A man riding a horse.", "Someone on a horse"], a),
        ("coco/val/2", "caption", "Two dogs.", ["Two dogs."], b),
    ]
    assert sorted((x.id, x.reason) for x in bad) == [
        ("coco/train/14", "unknown_image"), ("coco/train/15", "missing_field"), ("coco/train/16", "missing_image"),
        ("coco/train/17", "empty_text"), ("coco/val/14", "unknown_image"), ("coco/val/15", "missing_field"),
        ("coco/val/17", "empty_text"), ("coco/val/3", "missing_image"), ("coco/val/4", "empty_text"),
    ]
    limited = split_items(list(convert_coco(annotations={"val": str(tmp_path / "captions_val.json")},
                                            image_root={"val": str(tmp_path / "img")}, limit=1)))[0]
    assert [r["id"] for r in limited] == ["coco/val/1"]


# ---------------------------------------------------------------------------------------------- VQA v2

def test_vqav2_soft_scores():
    answers = ["2"] * 4 + ["3"] * 3 + ["two"] * 2 + ["4"]
    assert soft_targets(answers, "3") == ("3", ["2", "3", "two", "4"], [1.0, 1.0, 2 / 3, 1 / 3])
    assert soft_targets(answers, "4")[0] == "2"  # the preferred answer is not among the best: first occurrence
    assert soft_targets(["no", "yes", "yes"], None) == ("yes", ["yes", "no"], [2 / 3, 1 / 3])


def test_vqav2_rows(tmp_path):
    (tmp_path / "img").mkdir()
    img = image_bytes()
    (tmp_path / "img" / "COCO_val2014_000000000042.jpg").write_bytes(img)
    (tmp_path / "img" / "COCO_test2015_000000000042.jpg").write_bytes(img)
    questions = {"questions": [
        {"question_id": 420, "image_id": 42, "question": "How many cats?"},
        {"question_id": 421, "image_id": 42, "question": "Is it sunny?"},
        {"question_id": 422, "image_id": 42, "question": "Orphan question?"},
        {"question_id": 423, "image_id": 7, "question": "Where is the image?"},
    ]}
    answers = [{"answer": a, "answer_confidence": "yes"} for a in ["2"] * 4 + ["3"] * 3 + ["two"] * 2 + ["4"]]
    annotations = {"annotations": [
        {"question_id": 420, "multiple_choice_answer": "3", "answers": answers},
        {"question_id": 421, "multiple_choice_answer": "yes",
         "answers": [{"answer": "yes", "answer_confidence": "yes"}] * 9 + [{"answer": "no", "answer_confidence": "maybe"}]},
        {"question_id": 423, "multiple_choice_answer": "x", "answers": [{"answer": "x"}] * 3},
    ]}
    for name, data in (("q_val.json", questions), ("a_val.json", annotations),
                       ("q_test.json", {"questions": questions["questions"][:1]})):
        (tmp_path / name).write_text(json.dumps(data))
    items = list(convert_vqav2(
        questions={"val": str(tmp_path / "q_val.json"), "test": str(tmp_path / "q_test.json")},
        annotations={"val": str(tmp_path / "a_val.json")},
        image_root=str(tmp_path / "img"),
    ))
    rows, bad = split_items(items)
    r = by_id(rows)
    assert (r["vqav2/val/420"]["target"], r["vqav2/val/420"]["targets"]) == ("3", ["2", "3", "two", "4"])
    assert r["vqav2/val/420"]["target_weights"] == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3])
    assert (r["vqav2/val/421"]["target"], r["vqav2/val/421"]["targets"]) == ("yes", ["yes", "no"])
    assert r["vqav2/val/421"]["target_weights"] == pytest.approx([1.0, 1 / 3])
    assert r["vqav2/val/420"]["text"] == "How many cats?" and r["vqav2/val/420"]["image"] == img
    # test2014 file names do not exist: the default pattern misses them
    assert [(b.id, b.reason) for b in bad] == [
        ("vqav2/val/422", "missing_annotation"), ("vqav2/val/423", "missing_image"), ("vqav2/test/420", "missing_image"),
    ]
    rows, bad = split_items(list(convert_vqav2(
        questions={"test": str(tmp_path / "q_test.json")}, image_root=str(tmp_path / "img"),
        image_pattern="COCO_test2015_{image_id:012d}.jpg")))
    assert not bad and [(x["id"], x["target"], x["targets"], x["target_weights"]) for x in rows] == [
        ("vqav2/test/420", None, None, None)]


# ---------------------------------------------------------------------------------------------- RefCOCO

def _refcoco_fixture(tmp_path):
    (tmp_path / "img").mkdir()
    img = image_bytes(size=(64, 80))
    (tmp_path / "img" / "COCO_train2014_000000000005.jpg").write_bytes(img)
    refs = [
        {"ref_id": 100, "ann_id": 7, "image_id": 5, "split": "train",
         "sentences": [{"sent": "man in red"}, {"sent": "left guy"}]},
        {"ref_id": 101, "ann_id": 8, "image_id": 5, "split": "testA", "sentences": [{"sent": "dog"}]},
        {"ref_id": 102, "ann_id": 99, "image_id": 5, "split": "train", "sentences": [{"sent": "ghost"}]},
        {"ref_id": 103, "ann_id": 9, "image_id": 5, "split": "train", "sentences": [{"sent": "flat"}]},
        {"ref_id": 104, "ann_id": 10, "image_id": 5, "split": "train", "sentences": [{"sent": "nan"}, {"x": 1}]},
        {"ref_id": 105, "ann_id": 7, "image_id": 5, "split": "train", "sentences": [{"sent": " "}, {"x": 1}]},
    ]
    instances = {"images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg"}],
                 "annotations": [{"id": 7, "bbox": [10, 20.5, 30, 40]}, {"id": 8, "bbox": [0, 0, 64, 80]},
                                 {"id": 9, "bbox": [1, 2, 0, 5]}, {"id": 10, "bbox": [1, 2, float("nan"), 5]}]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    return refs, img


def test_refcoco_rows_from_json_and_pickle(tmp_path):
    refs, img = _refcoco_fixture(tmp_path)
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    outputs = []
    for name in ("refs.json", "refs(unc).p"):
        items = list(convert_refcoco(refs=str(tmp_path / name), instances=str(tmp_path / "instances.json"),
                                     image_root=str(tmp_path / "img"), dataset="refcoco+"))
        outputs.append(items)
    rows, bad = split_items(outputs[0])
    pickled_rows, pickled_bad = split_items(outputs[1])
    assert pickled_rows == rows and [(b.id, b.reason) for b in pickled_bad] == [(b.id, b.reason) for b in bad]
    assert [(r["id"], r["split"], r["task"], r["text"], r["box"], r["image"]) for r in rows] == [
        ("refcoco+/train/100/0", "train", "grounding", "man in red", [10.0, 20.5, 40.0, 60.5], img),
        ("refcoco+/train/100/1", "train", "grounding", "left guy", [10.0, 20.5, 40.0, 60.5], img),
        ("refcoco+/testA/101/0", "testA", "grounding", "dog", [0.0, 0.0, 64.0, 80.0], img),
    ]
    assert [(b.id, b.reason) for b in bad] == [("refcoco+/train/102", "missing_annotation"),
                                              ("refcoco+/train/103", "bad_box"), ("refcoco+/train/104", "bad_box"),
                                              ("refcoco+/train/105/0", "empty_text"),
                                              ("refcoco+/train/105/1", "missing_field")]


def test_refcoco_pickle_with_classes_is_refused(tmp_path):
    hostile = tmp_path / "refs.p"
    hostile.write_bytes(pickle.dumps([collections.OrderedDict(a=1)], protocol=2))
    with pytest.raises(ValueError, match="collections.OrderedDict"):
        load_refs(hostile)


# ---------------------------------------------------------------------------------------------- SNLI-VE

def test_snli_ve_rows_and_bad_lines(tmp_path):
    (tmp_path / "img").mkdir()
    a, b = image_bytes(color=(5, 5, 5)), image_bytes(color=(9, 9, 9))
    (tmp_path / "img" / "111.jpg").write_bytes(a)
    (tmp_path / "img" / "222.jpg").write_bytes(b)
    lines = [
        {"Flickr30K_ID": "111", "pairID": "111.jpg#0r1e", "sentence1": "Two men play.", "sentence2": "Men play.",
         "gold_label": "entailment"},
        {"Flikr30kID": "222.jpg", "pairID": "222.jpg#1r1c", "sentence1": "A dog.", "sentence2": "A cat.",
         "gold_label": "contradiction"},
        {"Flickr30K_ID": "222", "sentence1": "A dog.", "sentence2": "It is hungry.", "gold_label": "neutral"},
        {"Flickr30K_ID": "222", "pairID": "p4", "sentence1": "x", "sentence2": "y", "gold_label": "-"},
        {"Flickr30K_ID": "333", "pairID": "p5", "sentence1": "x", "sentence2": "y", "gold_label": "neutral"},
        {"Flickr30K_ID": "111", "pairID": "p6", "sentence2": "y", "gold_label": "neutral"},
    ]
    text = "\n".join(json.dumps(x) for x in lines[:3]) + "\n{not json\n" + "\n".join(json.dumps(x) for x in lines[3:])
    (tmp_path / "snli_ve_dev.jsonl").write_text(text + "\n")
    items = list(convert_snli_ve(files={"val": str(tmp_path / "snli_ve_dev.jsonl")}, image_root=str(tmp_path / "img")))
    rows, bad = split_items(items)
    assert [(r["id"], r["task"], r["text"], r["text2"], r["target"], r["image"]) for r in rows] == [
        ("snli-ve/val/111.jpg#0r1e", "visual_entailment", "Men play.", "Two men play.", "yes", a),
        ("snli-ve/val/222.jpg#1r1c", "visual_entailment", "A cat.", "A dog.", "no", b),
        ("snli-ve/val/line-2", "visual_entailment", "It is hungry.", "A dog.", "maybe", b),
    ]
    assert [(x.id, x.reason) for x in bad] == [
        ("snli-ve/val/line-3", "bad_json"), ("snli-ve/val/p4", "unknown_label"), ("snli-ve/val/p5", "missing_image"),
        ("snli-ve/val/p6", "missing_field"),
    ]
    assert bad[0].source.endswith("snli_ve_dev.jsonl:4")


# ---------------------------------------------------------------------------------------------- image folders

def test_imagefolder_rows(tmp_path):
    root = tmp_path / "train"
    (root / "golden_retriever").mkdir(parents=True)
    (root / "tabby").mkdir()
    a, b, c = image_bytes("JPEG", (1, 1, 1)), image_bytes("PNG", (2, 2, 2)), image_bytes("JPEG", (3, 3, 3))
    (root / "golden_retriever" / "b.png").write_bytes(b)
    (root / "golden_retriever" / "a.JPEG").write_bytes(a)
    (root / "tabby" / "c.jpg").write_bytes(c)
    (root / "tabby" / "notes.txt").write_text("not an image")
    (root / "tabby" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (root / "README").write_text("ignored: not in a class folder")
    rows, bad = split_items(list(convert_imagefolder(roots={"train": str(root)})))
    assert [(r["id"], r["task"], r["target"], r["image"]) for r in rows] == [
        ("imagefolder/train/golden_retriever/a.JPEG", "image_classification", "golden retriever", a),
        ("imagefolder/train/golden_retriever/b.png", "image_classification", "golden retriever", b),
        ("imagefolder/train/tabby/c.jpg", "image_classification", "tabby", c),
    ]
    assert [(x.id, x.reason) for x in bad] == [("imagefolder/train/tabby/broken.jpg", "bad_image"),
                                              ("imagefolder/train/tabby/notes.txt", "unsupported_file")]
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"tabby": "tabby cat"}))
    rows, bad = split_items(list(convert_imagefolder(roots={"train": str(root)}, class_names=str(names),
                                                     dataset="pets", limit=4)))
    assert [(r["id"], r["target"]) for r in rows] == [("pets/train/tabby/c.jpg", "tabby cat")]
    assert [(x.id, x.reason) for x in bad] == [("pets/train/golden_retriever/a.JPEG", "unknown_label"),
                                              ("pets/train/golden_retriever/b.png", "unknown_label"),
                                              ("pets/train/tabby/broken.jpg", "bad_image")]


# ---------------------------------------------------------------------------------------------- GLUE

GLUE_FIXTURES = {
    # task: (file text, expected [(text, text2, target)], expected bad [(n, reason)])
    "sst2": ("sentence\tlabel\nit 's a charming journey . \t1\nunfunny\t0\nmeh\t7\nstray\ttab\t1\n",
             [("it 's a charming journey .", None, "positive"), ("unfunny", None, "negative")],
             [(2, "unknown_label"), (3, "extra_column")]),
    "cola": ("gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\nbad line\n",
             [("Our friends won't buy this analysis.", None, "yes"), ("They drank the pub.", None, "no")],
             [(2, "missing_column")]),
    "mnli": ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
             "0\t31193\t31193n\tgovernment\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tConceptually cream skimming.\t"
             "Product and geography.\tneutral\tneutral\n"
             "1\t101457\t101457e\ttelephone\t( c )\t( d )\t(ROOT c)\t(ROOT d)\tyou know \"during\" the season\t"
             "You lose the things.\tentailment\tentailment\n"
             "2\t1\t1c\tfiction\t( e )\t( f )\t(ROOT e)\t(ROOT f)\tOne.\tTwo.\tcontradiction\tcontradiction\n",
             [("Conceptually cream skimming.", "Product and geography.", "maybe"),
              ('you know "during" the season', "You lose the things.", "yes"), ("One.", "Two.", "no")], []),
    "rte": ("index\tsentence1\tsentence2\tlabel\n0\tNo weapons.\tWeapons found.\tnot_entailment\n"
            "1\tA b.\tA.\tentailment\n", [("No weapons.", "Weapons found.", "no"), ("A b.", "A.", "yes")], []),
    "qnli": ("index\tquestion\tsentence\tlabel\n0\tWhen?\tIn 1900.\tentailment\n1\tWho?\t\tnot_entailment\n",
             [("When?", "In 1900.", "yes")], [(1, "empty_text")]),
    "mrpc": ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t702876\t702977\tAmrozi accused.\tHe accused.\n"
             "0\t2108705\t2108831\tYucaipa owned.\tYucaipa bought.\n",
             [("Amrozi accused.", "He accused.", "yes"), ("Yucaipa owned.", "Yucaipa bought.", "no")], []),
    "qqp": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n133273\t213221\t213222\tHow is X?\tWhat is X?\t0\n"
            "5\t11\t12\tWhy?\tWhy so?\t1\n", [("How is X?", "What is X?", "no"), ("Why?", "Why so?", "yes")], []),
}


@pytest.mark.parametrize("task", sorted(GLUE_FIXTURES))
def test_glue_tasks(tmp_path, task):
    text, expected, expected_bad = GLUE_FIXTURES[task]
    (tmp_path / "train.tsv").write_text(text, encoding="utf-8")
    rows, bad = split_items(list(convert_glue(task=task, data_dir=str(tmp_path))))
    assert [(r["text"], r["text2"], r["target"]) for r in rows] == expected
    assert {r["task"] for r in rows} == {f"glue_{task}"} and {r["dataset"] for r in rows} == {f"glue-{task}"}
    assert [(b.id, b.reason) for b in bad] == [(f"glue-{task}/train/{n}", reason) for n, reason in expected_bad]
    good_ns = [n for n in range(len(expected) + len(expected_bad)) if n not in {m for m, _ in expected_bad}]
    assert [r["id"] for r in rows] == [f"glue-{task}/train/{n}" for n in good_ns]


def test_glue_test_files_without_labels(tmp_path):
    (tmp_path / "test.tsv").write_text("index\tsentence\n0\tBill whistled.\n", encoding="utf-8")
    rows, bad = split_items(list(convert_glue(task="cola", files={"test": str(tmp_path / "test.tsv")})))
    assert not bad and [(r["id"], r["text"], r["target"]) for r in rows] == [("glue-cola/test/0", "Bill whistled.", None)]
    with pytest.raises(ValueError, match="unknown GLUE task"):
        next(convert_glue(task="wnli", data_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------------- Gigaword

def test_gigaword_rows(tmp_path):
    (tmp_path / "train.src").write_text("australia 's current account deficit shrunk .\n\nthird article\n")
    (tmp_path / "train.tgt").write_text("australian current account deficit narrows\nempty source\n")
    rows, bad = split_items(list(convert_gigaword(data_dir=str(tmp_path))))
    assert [(r["id"], r["task"], r["text"], r["target"]) for r in rows] == [
        ("gigaword/train/0", "summarization", "australia 's current account deficit shrunk .",
         "australian current account deficit narrows"),
    ]
    assert [(b.id, b.reason) for b in bad] == [("gigaword/train/1", "empty_text"), ("gigaword/train/2", "unpaired_line")]


# ---------------------------------------------------------------------------------------------- Fashion-MNIST

def _write_idx(path: Path, array: np.ndarray, magic: int, gz: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_fashion_mnist_rows(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(1, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train, 0x803, gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 9, 12]), 0x801, gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", test, 0x803, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([5]), 0x801, gz=False)
    rows, bad = split_items(list(convert_fashion_mnist(data_dir=str(tmp_path), captions=True)))
    assert [(r["id"], r["task"], r["target"]) for r in rows] == [
        ("fashion-mnist/train/image_classification/0", "image_classification", "t-shirt"),
        ("fashion-mnist/train/caption/0", "caption", "a photo of a t-shirt"),
        ("fashion-mnist/train/image_classification/1", "image_classification", "ankle boot"),
        ("fashion-mnist/train/caption/1", "caption", "a photo of an ankle boot"),
        ("fashion-mnist/test/image_classification/0", "image_classification", "sandal"),
        ("fashion-mnist/test/caption/0", "caption", "a photo of a sandal"),
    ]
    decoded = np.asarray(Image.open(io.BytesIO(rows[2]["image"])))
    assert Image.open(io.BytesIO(rows[2]["image"])).format == "PNG" and np.array_equal(decoded, train[1])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(rows[4]["image"]))), test[0])
    assert [(b.id, b.reason) for b in bad] == [("fashion-mnist/train/image_classification/2", "unknown_label")]
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03junk")
    with pytest.raises(ValueError, match="magic"):
        list(convert_fashion_mnist(data_dir=str(tmp_path), splits=["test"]))


# ---------------------------------------------------------------------------------------------- tasks and labels

def _tiny_inputs(tmp_path: Path) -> dict[str, list[tuple[dict, set[str]]]]:
    """source -> [(converter options, the tasks its rows must carry)] on one-record inputs."""
    img = image_bytes()
    (tmp_path / "img" / "cls").mkdir(parents=True)
    for name in ("1.jpg", "COCO_val2014_000000000001.jpg", "cls/a.jpg"):
        (tmp_path / "img" / name).write_bytes(img)
    files = {
        "coco.json": json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}],
                                 "annotations": [{"id": 5, "image_id": 1, "caption": "a dog"}]}),
        "q.json": json.dumps({"questions": [{"question_id": 9, "image_id": 1, "question": "what?"}]}),
        "a.json": json.dumps({"annotations": [{"question_id": 9, "answers": [{"answer": "dog"}] * 3}]}),
        "refs.json": json.dumps([{"ref_id": 1, "ann_id": 2, "image_id": 1, "split": "val",
                                  "sentences": [{"sent": "the dog"}]}]),
        "inst.json": json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}],
                                 "annotations": [{"id": 2, "bbox": [1, 1, 3, 2]}]}),
        "ve.jsonl": "\n".join(json.dumps({"Flickr30K_ID": "1", "sentence1": "p", "sentence2": "h", "gold_label": g})
                              for g in SNLI_VE_LABEL_WORDS),
        "val.src": "an article\n",
        "val.tgt": "a summary\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((1, 28, 28)), 0x803, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([3]), 0x801, gz=False)
    glue = []
    for task, (text, _, _) in GLUE_FIXTURES.items():
        (tmp_path / f"glue-{task}.tsv").write_text(text, encoding="utf-8")
        glue.append(({"task": task, "files": {"train": str(tmp_path / f"glue-{task}.tsv")}}, {f"glue_{task}"}))
    root = str(tmp_path / "img")
    return {
        "easy-vqa": [({},
                      {"vqa", "visual_entailment", "caption", "grounding", "image_classification", "itm"}),
                     ({"pretraining": True}, {"vqa", "visual_entailment", "caption", "grounding",
                                              "image_classification", "itm", "detection", "text_infilling"})],
        "coco": [({"annotations": {"val": str(tmp_path / "coco.json")}, "image_root": root}, {"caption"})],
        "vqav2": [({"questions": {"val": str(tmp_path / "q.json")}, "annotations": {"val": str(tmp_path / "a.json")},
                    "image_root": root}, {"vqa"})],
        "refcoco": [({"refs": str(tmp_path / "refs.json"), "instances": str(tmp_path / "inst.json"),
                      "image_root": root}, {"grounding"})],
        "snli-ve": [({"files": {"val": str(tmp_path / "ve.jsonl")}, "image_root": root}, {"visual_entailment"})],
        "imagefolder": [({"roots": {"val": root}}, {"image_classification"})],
        "glue": glue,
        "gigaword": [({"data_dir": str(tmp_path)}, {"summarization"})],
        "fashion-mnist": [({"data_dir": str(tmp_path), "captions": True}, {"image_classification", "caption"})],
    }


def test_every_emitted_task_is_a_model_task(tmp_path):
    inputs = _tiny_inputs(tmp_path)
    assert set(inputs) == set(SOURCES)  # a new converter needs an input here
    for source, runs in inputs.items():
        for options, tasks in runs:
            splits = ["test"] if source in ("easy-vqa", "fashion-mnist") else None  # easy-vqa: 2 package images
            rows, _ = split_items(list(convert(source, options, splits=splits, limit=2)))  # checks every row
            assert rows and {r["task"] for r in rows} == tasks, (source, options)
            assert all(r["task"] in TASKS for r in rows)
    ve = split_items(list(convert("snli-ve", inputs["snli-ve"][0][0])))[0]
    assert sorted(r["target"] for r in ve) == sorted(TASKS["visual_entailment"].labels)


def test_label_words_are_the_task_labels_and_agree_with_the_readers():
    assert set(SNLI_VE_LABEL_WORDS.values()) == set(TASKS["visual_entailment"].labels)
    assert set(GLUE_TASKS) == {name.removeprefix("glue_") for name in TASKS if name.startswith("glue_")}
    for task, spec in GLUE_TASKS.items():
        assert set(spec.label_words.values()) == set(TASKS[f"glue_{task}"].labels), task
        # a label written the same way reads as the same word from a public GLUE TSV and an OFA TSV
        assert spec.label_words.items() <= glue_label_words(task).items(), task


# ---------------------------------------------------------------------------------------------- prepare / job

def read_back(uri: str) -> dict[str, dict]:
    """Every row of a corpus by id. pyarrow < 26 cannot read a Parquet column of null fixed-size lists
    (apache/arrow#35692), so `box` is read only from grounding shards, where it is never null."""
    rows = {r["id"]: r for r in iter_rows(uri, tasks=["grounding"])}
    others = ["caption", "vqa", "visual_entailment", "image_classification", "itm", "summarization", "glue_sst2"]
    columns = [f for f in FIELDS if f != "box"]
    for r in iter_rows(uri, tasks=others, columns=columns):
        rows[r["id"]] = {**r, "box": None}
    return rows


def test_prepare_easy_vqa_end_to_end(tmp_path):
    out = tmp_path / "corpus"
    summary = prepare("easy-vqa", {"seed": 0}, str(out), splits=["test"], limit=11, shard_mb=0.01)
    expected_rows, expected_bad = split_items(list(convert_easy_vqa(splits=["test"], limit=11, seed=0)))
    counts = collections.Counter((r["split"], r["task"]) for r in expected_rows)
    assert summary["rows_ok"] == len(expected_rows)
    assert summary["rows_bad"] == {"attributes_undetermined": 1}
    assert summary["bad_examples"] == {"attributes_undetermined": ["easy-vqa/test/image/10"]}
    assert summary["counts"] == {"test": {task: n for (_, task), n in sorted(counts.items())}}
    assert summary["num_shards"] > len(counts)  # 0.01 MiB shards: several per task
    back = read_back(str(out))
    assert back.keys() == {r["id"] for r in expected_rows}
    for row in expected_rows:
        got = back[row["id"]]
        assert got["image"] == row["image"] and got["target"] == row["target"] and got["text"] == row["text"]
        assert got["box"] == row["box"] and got["targets"] == row["targets"]
    assert read_manifest(str(out)).counts == summary["counts"]


def test_prepare_rejects_bad_options_and_unwritable_output(tmp_path):
    with pytest.raises(ValueError, match="unknown option"):
        convert("easy-vqa", {"sed": 1})
    with pytest.raises(ValueError, match="missing required option"):
        convert("coco", {"annotations": {}})
    with pytest.raises(ValueError, match="unknown source"):
        convert("mnist", {})
    prepare("gigaword", {"data_dir": str(_gigaword_dir(tmp_path))}, str(tmp_path / "c"))
    with pytest.raises(OutputError, match="already holds a corpus"):
        prepare("gigaword", {"data_dir": str(_gigaword_dir(tmp_path))}, str(tmp_path / "c"))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="cannot write output"):
        prepare("gigaword", {"data_dir": str(_gigaword_dir(tmp_path))}, str(tmp_path / "a_file" / "corpus"))


def _gigaword_dir(tmp_path: Path) -> Path:
    d = tmp_path / "giga"
    d.mkdir(exist_ok=True)
    (d / "train.src").write_text("article one\narticle two\n")
    (d / "train.tgt").write_text("one\n")
    (d / "val.src").write_text("article three\n")
    (d / "val.tgt").write_text("three\n")
    return d


def run_prepare(*argv: str) -> int:
    """jobs.prepare_data's exit status for `argv`."""
    try:
        prepare_data.main(list(argv))
    except SystemExit as exc:
        return exc.code
    return 0


def test_prepare_data_cli(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="pipelines.data.converters")
    data = _gigaword_dir(tmp_path)
    rc = run_prepare("gigaword", "--data-dir", str(data), "--output", str(tmp_path / "out"), "--splits", "train,val")
    assert rc == 0
    progress = [m for m in caplog.messages if m.endswith(" rows/s")]  # the progress helper's lines
    assert progress and progress[-1].startswith("gigaword: 2 rows, 1 bad, ")
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_ok"] == 2 and summary["rows_bad"] == {"unpaired_line": 1}
    assert summary["counts"] == {"train": {"summarization": 1}, "val": {"summarization": 1}}
    assert sorted(read_back(str(tmp_path / "out"))) == ["gigaword/train/0", "gigaword/val/0"]
    rc = run_prepare("gigaword", "--data-dir", str(data), "--output", str(tmp_path / "out"))
    assert rc == 2 and "cannot write output" in capsys.readouterr().err
    rc = run_prepare("gigaword", "--data-dir", str(data), "--output", str(tmp_path / "o2"), "--splits", "dev")
    assert rc == 2 and "not available" in capsys.readouterr().err


def test_prepare_data_cli_split_options(tmp_path, capsys):
    (tmp_path / "sst").mkdir()
    (tmp_path / "sst" / "train.tsv").write_text("sentence\tlabel\ngood\t1\n")
    (tmp_path / "sst" / "dev.tsv").write_text("sentence\tlabel\nbad\t0\n")
    rc = run_prepare("glue", "--task", "sst2", "--file", f"train={tmp_path / 'sst' / 'train.tsv'}",
                     "--files", f"val={tmp_path / 'sst' / 'dev.tsv'}", "--output", str(tmp_path / "out"))
    assert rc == 0
    rows = sorted((r["id"], r["target"]) for r in read_back(str(tmp_path / "out")).values())
    assert rows == [("glue-sst2/train/0", "positive"), ("glue-sst2/val/0", "negative")]


def test_converter_options_come_from_the_signatures():
    glue = converter_options("glue")
    assert list(glue) == ["task", "files", "data_dir"]
    assert glue["task"].kind == "choice" and glue["task"].required
    assert glue["task"].choices == ("cola", "sst2", "mnli", "rte", "qnli", "mrpc", "qqp")
    assert glue["files"].kind == "per_split" and glue["files"].default is None
    assert glue["files"].parse(["train=a.tsv", "val=b.tsv"]) == {"train": "a.tsv", "val": "b.tsv"}
    coco = converter_options("coco")
    assert coco["image_root"].parse(["/img"]) == "/img"
    assert coco["image_root"].parse(["train=/t", "val=/v"]) == {"train": "/t", "val": "/v"}
    assert converter_options("easy-vqa")["seed"].parse(["7"]) == 7
    assert converter_options("fashion-mnist")["captions"].parse(["true"]) is True
    with pytest.raises(ValueError, match="option seed takes int, got 'x'"):
        converter_options("easy-vqa")["seed"].parse(["x"])
    with pytest.raises(ValueError, match="option files takes SPLIT=PATH entries, got 'a.tsv'"):
        glue["files"].parse(["a.tsv"])


def test_prepare_data_cli_checks_option_names_and_types(tmp_path, capsys):
    out = str(tmp_path / "out")
    for argv, text in [
        (["easy-vqa", "--seed", "x", "--output", out], "argument --seed: option seed takes int, got 'x'"),
        (["gigaword", "--data-dir", "d", "--bogus", "1", "--output", out], "unrecognized arguments: --bogus 1"),
        (["glue", "--task", "nope", "--output", out], "argument --task: invalid choice: 'nope'"),
        (["gigaword", "--output", out], "the following arguments are required: --data-dir"),
        (["glue", "--task", "sst2", "--file", "x.tsv", "--output", out], "option files takes SPLIT=PATH entries"),
    ]:
        assert run_prepare(*argv) == 2
        err = capsys.readouterr().err
        assert text in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        prepare_data.main(["gigaword", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--source-suffix SOURCE_SUFFIX str; default '.src'" in help_text and "--data-dir DATA_DIR str; required" in help_text


def test_easy_vqa_captions_are_judged_by_the_image_labels():
    from pipelines.data.converters.easyvqa import caption_fully_right

    assert caption_fully_right("a red circle", "a red circle")
    assert caption_fully_right("A RED circle.", "a red circle")  # case and punctuation do not matter
    assert caption_fully_right("the circle is red", "a red circle")  # other wording naming both is right
    assert not caption_fully_right("a red triangle", "a red circle")  # wrong shape
    assert not caption_fully_right("a blue circle", "a red circle")  # wrong colour
    assert not caption_fully_right("a red circle and a blue circle", "a red circle")  # a second colour
    assert not caption_fully_right("a red shape", "a red circle")  # no shape
    assert not caption_fully_right("a redder circle", "a red circle")  # whole words only
    assert not caption_fully_right(None, "a red circle")  # no prediction
    with pytest.raises(ValueError, match="one colour and one shape"):
        caption_fully_right("a red circle", "a shape")


def test_the_share_of_captions_fully_right_counts_each_pair():
    from pipelines.data.converters.easyvqa import share_fully_right

    refs = ["a red circle", "a blue rectangle", "a green triangle", "a red circle"]
    assert share_fully_right(["a red circle", "a blue circle", None, "red circle"], refs) == 0.5
    assert share_fully_right([], []) == 0.0
    with pytest.raises(ValueError, match="3 predictions for 4 references"):
        share_fully_right(["a red circle"] * 3, refs)


def test_easy_vqa_answer_set_is_the_packages_13_answers():
    import easy_vqa

    from pipelines.data.converters.easyvqa import COLORS, SHAPES, answer_set

    got = answer_set()
    assert len(got) == 13 and list(got) == [a for a in easy_vqa.get_answers() if a]
    assert set(got) == {"yes", "no", *COLORS, *SHAPES}
