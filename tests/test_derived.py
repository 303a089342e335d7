"""Pretraining's auxiliary examples made from the main ones (`ofa_model.derived`), and how a mixture reads them
(`pipelines.data.dataset.corpora`)."""

from __future__ import annotations

import numpy as np
import pytest

from ofa_model.derived import DERIVED, derive_row, pool_value
from ofa_model.preprocess import PreprocessConfig
from ofa_model.tasks import TASKS, TaskInputError, build_example
from ofa_model.vocab import Vocabulary
from pipelines.data.data_config import DataConfig, SourceSection
from pipelines.data.dataset import corpora
from tests.test_dataset import png

CAPTION = {"id": "c/1", "task": "caption", "split": "train", "image": png((200, 0, 0)), "target": "a red square",
           "targets": ["a red square", "red square"]}
VQA = {"id": "q/1", "task": "vqa", "split": "train", "image": png((0, 0, 200)), "text": "what color is it?",
       "target": "blue", "targets": ["blue", "navy"], "target_weights": [0.9, 0.1]}
REGION = {"id": "g/1", "task": "grounding", "split": "train", "image": png((0, 200, 0)), "text": "the green circle",
          "box": [1.0, 2.0, 9.0, 12.0]}
POOL = ("a red square", "a blue circle", "two grey triangles", "a teal rectangle")


def test_itm_pairs_the_caption_half_the_time_and_a_pool_caption_otherwise():
    rows = [derive_row("itm", CAPTION, np.random.default_rng([0, 1, seq]), POOL) for seq in range(2000)]
    yes = [r for r in rows if r["target"] == "yes"]
    no = [r for r in rows if r["target"] == "no"]
    assert 0.46 < len(yes) / len(rows) < 0.54
    assert {r["text"] for r in yes} == {"a red square"}
    assert {r["text"] for r in no} == set(POOL) - {"a red square"}  # never the row's own caption
    assert all(r["task"] == "itm" and r["id"] == "c/1" and r["image"] == CAPTION["image"] for r in rows)
    assert all(r["targets"] is None and r["target_weights"] is None for r in rows)
    # the row's generator decides: the same seed, epoch and row number give the same example, another epoch not
    again = [derive_row("itm", CAPTION, np.random.default_rng([0, 1, seq]), POOL) for seq in range(2000)]
    assert again == rows
    other_epoch = [derive_row("itm", CAPTION, np.random.default_rng([0, 2, seq]), POOL) for seq in range(2000)]
    assert [r["target"] for r in other_epoch] != [r["target"] for r in rows]


def test_qa_matching_and_grounded_caption():
    answers = ("blue", "red", "3", "yes")
    rows = [derive_row("qa_matching", VQA, np.random.default_rng(seq), answers) for seq in range(400)]
    assert {(r["text"], r["text2"], r["target"]) for r in rows if r["target"] == "yes"} == {
        ("what color is it?", "blue", "yes")}
    assert {r["text2"] for r in rows if r["target"] == "no"} == {"red", "3", "yes"}
    region = derive_row("grounded_caption", REGION, np.random.default_rng(0), ())
    assert (region["task"], region["box"], region["target"], region["text"]) == (
        "grounded_caption", [1.0, 2.0, 9.0, 12.0], "the green circle", None)


def test_derived_rows_become_examples_of_their_task():
    vocab, pcfg = Vocabulary.gpt2(), PreprocessConfig(patch_image_size=32, max_src_length=24, max_tgt_length=8)
    rng = np.random.default_rng(3)
    row = derive_row("itm", CAPTION, rng, POOL)
    sample = build_example(TASKS["itm"], row, vocab, pcfg)
    label = [t for t in list(sample["target"]) if t != vocab.pad_id][0]
    assert vocab.decode([label]).strip() == row["target"]
    assert vocab.decode(list(sample["source"])).strip().startswith(f'does the image describe " {row["text"]}')
    region = build_example(TASKS["grounded_caption"], derive_row("grounded_caption", REGION, rng, ()), vocab, pcfg)
    assert vocab.decode([t for t in list(region["target"]) if t not in (vocab.pad_id, vocab.eos_id)]).strip() \
        == "the green circle"


def test_what_cannot_be_derived_is_a_row_error_naming_it():
    with pytest.raises(TaskInputError, match="task itm: derived from caption rows, got a 'vqa' row"):
        derive_row("itm", VQA, np.random.default_rng(0), POOL)
    with pytest.raises(TaskInputError, match="task itm: no negative to pair with 'a red square': the corpus's pool "
                                             "of 1 has no other caption"):
        for seq in range(50):  # a "no" draw needs another caption
            derive_row("itm", CAPTION, np.random.default_rng(seq), ("a red square",))
    with pytest.raises(TaskInputError, match="task grounded_caption: the grounding row has no region text"):
        derive_row("grounded_caption", {**REGION, "text": " "}, np.random.default_rng(0), ())
    assert pool_value({"target": None, "targets": ["x"]}) == "x" and pool_value({"target": " "}) is None


def test_a_mixture_reads_a_derived_task_from_its_source_tasks_rows():
    cfg = DataConfig(uri="s3://b/main", derive=("itm", "grounded_caption"),
                     sources={"caption": SourceSection("s3://b/captions")})
    got = corpora(cfg, {"caption": 1, "itm": 1, "grounded_caption": 1, "grounding": 1})
    assert {n: (c.uri, c.tasks, c.derived) for n, c in got.items()} == {
        "caption": ("s3://b/captions", ("caption",), None), "itm": ("s3://b/captions", ("caption",), "itm"),
        "grounded_caption": ("s3://b/main", ("grounding",), "grounded_caption"),
        "grounding": ("s3://b/main", ("grounding",), None)}
    assert set(DERIVED) == {"itm", "qa_matching", "grounded_caption"}
    with pytest.raises(ValueError, match=r"data\.derive: qa_matching is not a task of the mixture"):
        corpora(DataConfig(uri="u", derive=("qa_matching",)), {"vqa": 1})
    with pytest.raises(ValueError, match=r"data\.derive \(itm\) is for a mixture's tasks"):
        corpora(DataConfig(uri="u", derive=("itm",)))
