"""Answer and label sets as data: the file parser (txt, JSON, OFA's ans2label pickle, read without running any of
it), recipes that name a file, the checks at config load, the sets stored in bundles and used by the predictor
when an input sends no candidates."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from ofa_model import OFAModel, Vocabulary, get_config, save_bundle
from ofa_model import answer_sets as A
from ofa_model.answer_sets import AnswerSetError, parse_answer_set, read_answer_file
from ofa_model.bundle import CONFIG_FILE, BundleError, load_bundle
from ofa_model.config_files import load_config, to_dict
from ofa_model.errors import ConfigError
from ofa_model.predictor import OFAPredictor
from ofa_model.preprocess import PreprocessConfig
from pipelines import storage
from pipelines.train.setup import read_answer_set, with_answer_sets
from pipelines.train.train_config import TrainConfig
from tests.recipes import answer_file, supplied

REPO = Path(__file__).resolve().parents[1]
VQA = REPO / "configs/finetune/vqa.yaml"


# ---------------------------------------------------------------------------------------------- the parser

def test_text_json_and_pickle_give_the_answers_in_order():
    assert parse_answer_set(b"yes\n  no \n\n\nred square\r\n", "a.txt") == ("yes", "no", "red square")
    assert parse_answer_set(b"\xef\xbb\xbfyes\nno\n", "a.txt") == ("yes", "no")  # a BOM is not part of an answer
    assert parse_answer_set(json.dumps(["b", "a", "c"]).encode(), "a.json") == ("b", "a", "c")
    # an ans2label object or pickle: answers ordered by index, whatever the order of the keys
    ans2label = {"no": 1, "yes": 0, "2": 3, "red": 2}
    assert parse_answer_set(json.dumps(ans2label).encode(), "ans2label.json") == ("yes", "no", "red", "2")
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        data = pickle.dumps(ans2label, protocol=protocol)
        assert parse_answer_set(data, "s3://b/trainval_ans2label.pkl") == ("yes", "no", "red", "2")


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"echo pwned > {marker}",)

    for payload in (Exploit(), {"yes": 0, "no": Exploit()}):
        with pytest.raises(AnswerSetError, match=r"evil.pkl: refused to unpickle: the pickle names GLOBAL "
                                                 r"(posix|os|nt)\.system") as exc:
            parse_answer_set(pickle.dumps(payload), "evil.pkl")
        assert exc.value.reason == "bad_answer_set"
    assert not marker.exists()


@pytest.mark.parametrize("name, data, message", [
    ("a.pkl", pickle.dumps({"yes": "0"}), "answer 'yes' maps to a str .'0'., not an integer index"),
    ("a.pkl", pickle.dumps({"yes": True}), "maps to a bool"),
    ("a.pkl", pickle.dumps(["yes", "no"]), "an answer pickle must hold a dict answer -> index .* got list"),
    ("a.pkl", pickle.dumps({"yes": [0]}), "maps to a list"),
    ("a.pkl", pickle.dumps({("yes",): 0}), "key .* is a tuple, not a string"),
    ("a.pkl", pickle.dumps({"yes": 0, "no": 0}), "answers 'yes' and 'no' share index 0"),
    ("a.pkl", pickle.dumps({}), "the answer set is empty"),
    ("a.pkl", b"\x80\x04not a pickle", "not a readable pickle"),
    ("a.json", b'{"yes": "0"}', "maps to a str"),
    ("a.json", b'["yes", ["no"]]', "answer 1 is a list"),
    ("a.json", b'["yes", 3]', "answer 1 is a int"),
    ("a.json", b'"yes"', "expected a list of answers or an object answer -> index, got str"),
    ("a.json", b'["yes", NaN]', "NaN is not a valid JSON number"),
    ("a.json", b"[yes", "not valid JSON"),
    ("a.json", b'["yes", "no", "yes"]', "answer 'yes' is listed more than once"),
    ("a.json", b'["yes", " "]', "answer 1 is blank"),
    ("a.json", b"[]", "the answer set is empty"),
    ("a.txt", b"yes\nno\nyes\n", "answer 'yes' is listed more than once"),
    ("a.txt", b"\n \n", "the answer set is empty"),
    ("a.txt", b"\xff\xfe", "not UTF-8 text"),
    ("answers.csv", b"yes\n", r"an answer file ends in one of \['.json', '.pickle', '.pkl', '.txt'\]"),
])
def test_malformed_sets_are_typed_errors_naming_the_file(name, data, message):
    with pytest.raises(AnswerSetError, match=f"^{name}: .*{message}"):
        parse_answer_set(data, name)


def test_size_and_count_caps(tmp_path, monkeypatch):
    with pytest.raises(AnswerSetError, match=f"a.txt: {A.MAX_FILE_BYTES + 1:,} bytes, over the limit"):
        parse_answer_set(b"a" * (A.MAX_FILE_BYTES + 1), "a.txt")
    monkeypatch.setattr(A, "MAX_FILE_BYTES", 10)
    big = tmp_path / "big.txt"
    big.write_text("yes\nno\nmaybe\n")  # 13 bytes
    with pytest.raises(AnswerSetError, match="big.txt: 11 bytes, over the limit of 10"):  # read no further
        read_answer_file(big)
    monkeypatch.setattr(A, "MAX_FILE_BYTES", 2**20)
    monkeypatch.setattr(A, "MAX_ANSWERS", 2)
    with pytest.raises(AnswerSetError, match="3 answers, over the limit of 2"):
        parse_answer_set(b'["a","b","c"]', "a.json")
    with pytest.raises(AnswerSetError, match="a.txt: answer 0 has 1,025 characters"):
        parse_answer_set(b"x" * 1025, "a.txt")


def test_read_answer_file_refuses_what_is_not_a_regular_file(tmp_path):
    with pytest.raises(AnswerSetError, match="missing.txt: cannot open the answer file"):
        read_answer_file(tmp_path / "missing.txt")
    (tmp_path / "d.txt").mkdir()
    with pytest.raises(AnswerSetError, match="d.txt: an answer file must be a regular file"):
        read_answer_file(tmp_path / "d.txt")


# ---------------------------------------------------------------------------------------------- recipes

def _vqa(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, VQA, supplied(VQA, list(overrides)))


def test_a_recipe_names_a_file_and_the_driver_reads_it_once(tmp_path):
    path = tmp_path / "trainval_ans2label.pkl"
    path.write_bytes(pickle.dumps({"yes": 0, "no": 1, "2": 2}))
    cfg = _vqa(f"answers={path}")
    assert cfg.answers == str(path) and cfg.answer_files() == {"answers": str(path)}
    resolved = with_answer_sets(cfg)
    assert resolved.answers == ("yes", "no", "2") and resolved.answer_files() == {}
    assert to_dict(resolved)["answers"] == ["yes", "no", "2"]  # what the workers get: the list, not the file
    assert resolved.answer_sets() == {"vqa": ("yes", "no", "2")}
    assert with_answer_sets(resolved) is resolved
    with pytest.raises(ValueError, match="still name files"):
        cfg.answer_sets()


def test_inline_lists_and_mixture_label_files(tmp_path):
    labels = tmp_path / "shapes.json"
    labels.write_text('["circle", "rectangle", "triangle"]')
    cfg = load_config(TrainConfig, REPO / "configs/finetune/vqa_easyvqa_multitask.yaml",
                      [f"labels={{image_classification: {labels}}}"])
    assert cfg.answer_files() == {"labels.image_classification": str(labels)}
    resolved = with_answer_sets(cfg)
    assert resolved.answers == cfg.answers and len(cfg.answers) == 13  # an inline list stays as it is
    assert resolved.answer_sets() == {"vqa": cfg.answers, "image_classification": ("circle", "rectangle", "triangle")}


def test_a_set_of_the_wrong_form_names_the_key_and_the_form():
    multitask = REPO / "configs/finetune/vqa_easyvqa_multitask.yaml"
    for override, message in [
        ("answers=3", "answers: expected an answer file (a path or s3:// URI) or a list of answers"),
        ("answers=[yes, 3]", "answers.list.1: Input should be a valid string"),
        ("answers=' '", "answers.file: String should match pattern"),
        ("labels={image_classification: []}", "labels.image_classification.list: Tuple should have at least 1 item"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(f"{multitask}: {message}")):
            load_config(TrainConfig, multitask, [override])


def test_an_unreadable_answer_file_names_the_key(tmp_path):
    with pytest.raises(AnswerSetError, match=r"^answers: .*nope.txt: no such file"):
        with_answer_sets(_vqa(f"answers={tmp_path / 'nope.txt'}"))
    bad = tmp_path / "bad.json"
    bad.write_text('["a", "a"]')
    with pytest.raises(AnswerSetError, match="^answers: .*bad.json: answer 'a' is listed more than once"):
        with_answer_sets(_vqa(f"answers={bad}"))


def test_answer_files_are_read_from_s3(s3_server):
    uri = storage.join(s3_server.uri("answers"), "trainval_ans2label.pkl")
    storage.write_bytes(uri, pickle.dumps({"no": 1, "yes": 0}))
    assert read_answer_set(uri) == ("yes", "no")
    with pytest.raises(AnswerSetError, match="missing.txt: no such file"):
        read_answer_set(storage.join(s3_server.uri("answers"), "missing.txt"))


def test_closed_set_validation_without_answers_fails_at_config_load():
    with pytest.raises(ConfigError, match=f"{VQA}: answers: validation.mode allcand needs the closed answer set"):
        _vqa("answers=[]")
    with pytest.raises(ConfigError, match="answers: validation.mode trie needs"):
        _vqa("answers=[]", "validation.mode=trie")
    assert _vqa("answers=[]", "validation.mode=open").answers == ()  # open-ended VQA needs no set
    ic = REPO / "configs/finetune/image_classification.yaml"
    with pytest.raises(ConfigError, match="answers: task image_classification .it ranks candidates. needs"):
        load_config(TrainConfig, ic, supplied(ic, ["answers=[]"]))
    assert load_config(TrainConfig, ic, supplied(ic)).answers == str(answer_file())


def test_caption_training_without_java_fails_at_config_load(tmp_path, monkeypatch):
    caption = REPO / "configs/finetune/caption.yaml"
    assert load_config(TrainConfig, caption, supplied(caption)).task == "caption"
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java
    with pytest.raises(ConfigError, match="task caption: validation scores captions with pycocoevalcap's PTB "
                                          "tokenizer, which runs Java, and `java` is not on PATH"):
        load_config(TrainConfig, caption, supplied(caption))
    assert _vqa().task == "vqa"  # other tasks do not need it


# ---------------------------------------------------------------------------------------------- bundles

@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return OFAModel(get_config("ofa-micro")), Vocabulary.gpt2(), PreprocessConfig(patch_image_size=32)


def test_a_bundle_stores_its_answer_sets(micro, tmp_path):
    model, vocab, pcfg = micro
    sets = {"vqa": ("yes", "no", "red"), "image_classification": ("circle", "square")}
    save_bundle(tmp_path / "b", model, vocab, preprocess=pcfg, answer_sets=sets)
    assert load_bundle(tmp_path / "b").answer_sets == sets
    save_bundle(tmp_path / "old", model, vocab, preprocess=pcfg)  # a bundle without sets still loads
    assert "answer_sets" not in json.loads((tmp_path / "old" / CONFIG_FILE).read_text())
    assert load_bundle(tmp_path / "old").answer_sets == {}
    with pytest.raises(BundleError, match="answer_sets names tasks the bundle does not know: .'nope'."):
        save_bundle(tmp_path / "c", model, vocab, preprocess=pcfg, answer_sets={"nope": ["a"]})


@pytest.mark.parametrize("value, message", [
    ({"vqa": "yes"}, "answer_sets.vqa: an answer set must be a list of strings, got str"),
    ({"vqa": ["yes", 1]}, "answer_sets.vqa: answer 1 is a int"),
    ({"vqa": ["yes", "yes"]}, "answer_sets.vqa: answer 'yes' is listed more than once"),
    ({"vqa": []}, "answer_sets.vqa: the answer set is empty"),
    ({"nope": ["a"]}, "answer_sets names tasks the bundle does not know"),
    (["yes"], "answer_sets: answer sets must map task names to lists of answers, got list"),
])
def test_a_malformed_answer_set_in_a_bundle_is_a_bundle_error(micro, tmp_path, value, message):
    model, vocab, pcfg = micro
    save_bundle(tmp_path / "b", model, vocab, preprocess=pcfg, answer_sets={"vqa": ["yes"]})
    config = tmp_path / "b" / CONFIG_FILE
    config.write_text(json.dumps({**json.loads(config.read_text()), "answer_sets": value}))
    with pytest.raises(BundleError, match=f"{config}: .*{message}"):
        load_bundle(tmp_path / "b")


# ---------------------------------------------------------------------------------------------- the predictor

def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_the_predictor_scores_the_bundle_set_when_an_input_sends_none(micro, tmp_path):
    """1,500 answers (over the default max_candidates of 1,000, which bounds what a client sends)."""
    model, vocab, pcfg = micro
    answers = tuple(f"answer {i}" for i in range(1500))
    save_bundle(tmp_path / "b", model, vocab, preprocess=pcfg,
                answer_sets={"vqa": answers, "image_classification": ("red", "blue")})
    predictor = OFAPredictor.from_bundle(tmp_path / "b")
    assert predictor.limits.max_candidates == 1000 and predictor.answer_sets["vqa"] == answers
    item = {"image": _png(), "text": "what is it?"}
    own, sent, too_many = predictor.predict("vqa", [
        {**item, "mode": "allcand"},
        {**item, "mode": "allcand", "candidates": ["red", "blue"]},
        {**item, "mode": "allcand", "candidates": [f"c{i}" for i in range(1001)]}])
    assert own["answer"] in answers and list(own["scores"]) == list(answers)
    assert sum(own["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    assert own["scores"][own["answer"]] == max(own["scores"].values())
    assert list(sent["scores"]) == ["red", "blue"]  # a client's candidates win over the bundle's
    assert too_many["error"]["reason"] == "limit_exceeded" and "1001 candidates" in too_many["error"]["message"]
    [trie] = predictor.predict("vqa", [{**item, "mode": "trie", "decoding": {"max_len_b": 4}}])
    assert trie["answer"] in answers
    [label] = predictor.predict("image_classification", [{"image": _png()}])
    assert set(label["scores"]) == {"red", "blue"}
    [opened] = predictor.predict("vqa", [{**item, "decoding": {"max_len_b": 3}}])  # open-ended: no set
    assert "error" not in opened and "scores" not in opened
