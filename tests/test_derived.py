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


@pytest.mark.timeout(300)
def test_a_run_reads_the_negative_pool_once_and_every_epochs_datasets_draw_from_it(ray_cluster, tmp_path,
                                                                                   monkeypatch):
    """`negative_pools` reads the corpus once; Datasets built with its pools (every epoch) read nothing more and
    draw their negatives from exactly the pool handed to them."""
    from pipelines.data import ingest
    from pipelines.data.dataset import epoch_batches, negative_pools
    from pipelines.data.shards import write_corpus
    from tests.test_dataset import config

    captions = ["a red square", "a blue circle", "two grey triangles", "a red square", "a teal box", "a blue circle"]
    write_corpus([{"id": f"c/{i}", "task": "caption", "split": "train", "image": png((40 * i, 90, 20)),
                   "target": text} for i, text in enumerate(captions)], str(tmp_path / "corpus"))
    reads = []
    real = ingest.iter_rows
    monkeypatch.setattr(ingest, "iter_rows", lambda uri, **kw: reads.append(uri) or real(uri, **kw))
    cfg, mixture = config(str(tmp_path / "corpus"), derive=("itm",), preprocess_on="tasks"), {"caption": 1, "itm": 1}

    pools = negative_pools(cfg, mixture)
    assert pools == {"itm": ("a red square", "a blue circle", "two grey triangles", "a teal box")}  # first seen
    assert reads == [str(tmp_path / "corpus")]

    handed = {"itm": ("a purple hexagon", "an orange star")}  # not the corpus's: only the handed pool can give them
    vocab = Vocabulary.gpt2()
    shown: dict[int, set[str]] = {0: set(), 1: set()}
    for epoch in shown:
        for batch in epoch_batches(cfg, vocab, train=True, epoch=epoch, mixture=mixture, pools=handed, with_meta=True):
            for task, tokens, target in zip(batch["tasks"], batch["src_tokens"], batch["target"], strict=True):
                if task == "itm" and vocab.decode(target.tolist()).strip() == "no":  # ' does the image describe " x "?'
                    shown[epoch].add(vocab.decode(tokens.tolist()).split('"')[1].strip())
    assert reads == [str(tmp_path / "corpus")]  # the two epochs' Datasets read no pool of their own
    assert shown[0] | shown[1] and shown[0] | shown[1] <= set(handed["itm"])


@pytest.mark.timeout(300)
def test_the_training_driver_hands_its_one_pool_to_the_workers(tmp_path, monkeypatch):
    """Several workers, two epochs: the one fit's workers build every Dataset themselves, with the pools the driver
    read once (`train`); the trainer carries those pools and no Dataset, and reads no pool of its own."""
    from ofa_model.config_files import build
    from pipelines.data import ingest
    from pipelines.data.dataset import negative_pools
    from pipelines.data.shards import write_corpus
    from pipelines.train.driver import _trainer
    from pipelines.train.train_config import TrainConfig

    captions = ["a red square", "a blue circle", "two grey triangles"]
    write_corpus([{"id": f"c/{i}", "task": "caption", "split": "train", "image": png((60 * i, 90, 20)),
                   "target": text} for i, text in enumerate(captions)], str(tmp_path / "corpus"))
    cfg = build(TrainConfig, {"task": "caption", "mixture": {"caption": 1, "itm": 1}, "epochs": 2,
                              "data": {"uri": str(tmp_path / "corpus"), "derive": ["itm"], "preprocess_on": "tasks"},
                              "model": {"arch": "ofa-micro"}, "scaling": {"num_workers": 2, "cpus_per_worker": 0.25},
                              "run": {"name": "pools", "storage_path": str(tmp_path / "runs")}})
    reads = []
    real = ingest.iter_rows
    monkeypatch.setattr(ingest, "iter_rows", lambda uri, **kw: reads.append(uri) or real(uri, **kw))
    pools = negative_pools(cfg.data, cfg.mixture)
    assert pools == {"itm": tuple(captions)} and len(reads) == 1
    run_info = {"mlflow_run_id": "r", "data_fingerprint": "f", "negative_pools": pools}
    trainer = _trainer(cfg, "cider", "max", (), run_info)
    assert trainer.train_loop_config["negative_pools"] is pools and trainer.datasets == {}
    assert build(TrainConfig, trainer.train_loop_config["cfg"]).epochs == 2  # every epoch in this one fit
    assert len(reads) == 1  # the trainer read no pool of its own
