"""ofa_model.evaluation: predictor items from canonical rows, and each task metric from prediction records."""

from __future__ import annotations

import pytest

from ofa_model.evaluation import prediction_item, primary_metric, score_predictions
from ofa_model.tasks import TASKS


def test_items_carry_inputs_not_targets():
    row = {"id": "x", "image": b"img", "text": "what colour?", "target": "red", "targets": ["red"],
           "box": None, "split": "test"}
    assert prediction_item(TASKS["vqa"], row, mode="allcand", candidates=["red", "blue"]) == {
        "image": b"img", "text": "what colour?", "mode": "allcand", "candidates": ["red", "blue"]}
    grounding = {"image": b"img", "text": "the cat", "box": [1.0, 2.0, 3.0, 4.0]}
    assert "box" not in prediction_item(TASKS["grounding"], grounding)  # the box is its target


def test_metrics_by_task_hand_worked():
    vqa = [{"prediction": "red", "reference": ["red", "blue"], "reference_weights": [0.6, 1.0]},
           {"prediction": "blue", "reference": ["blue"], "reference_weights": [1.0]},
           {"prediction": None, "reference": ["red"], "reference_weights": [1.0], "error": {}}]
    got = score_predictions(TASKS["vqa"], vqa)
    assert got["vqa_score"] == pytest.approx((0.6 + 1.0 + 0.0) / 3) and got["errors"] == 1 and got["rows"] == 3
    boxes = [{"prediction": [0, 0, 2, 2], "reference": [0, 0, 2, 2]},  # IoU 1
             {"prediction": [0, 0, 2, 2], "reference": [1, 1, 3, 3]},  # IoU 1/7
             {"prediction": None, "reference": [0, 0, 1, 1]}]
    got = score_predictions(TASKS["grounding"], boxes)
    assert got["acc50"] == pytest.approx(1 / 3) and got["miou"] == pytest.approx((1 + 1 / 7) / 3)
    labels = [{"prediction": "yes", "reference": "yes"}, {"prediction": "no", "reference": "yes"}]
    assert score_predictions(TASKS["visual_entailment"], labels)["accuracy"] == pytest.approx(0.5)
    summaries = [{"prediction": "a b c", "reference": "a b c"}]
    assert score_predictions(TASKS["summarization"], summaries)["rouge_l"] == pytest.approx(100.0)
    assert primary_metric(TASKS["caption"]) == ("cider", "max")
    captions = [{"prediction": "A red  circle.", "reference": ["a red circle"]},  # case, spaces, full stop
                {"prediction": "a red circle", "reference": ["a blue circle", "a red circle"]},  # any reference
                {"prediction": "a red circle shape", "reference": ["a red circle"]},  # more words: not exact
                {"prediction": None, "reference": ["a red circle"], "error": {}}]
    got = score_predictions(TASKS["caption"], captions)
    assert got["exact"] == pytest.approx(2 / 4) and got["errors"] == 1
    with pytest.raises(ValueError, match="no evaluation metric"):
        primary_metric(TASKS["text_to_image"])


def test_official_primary_metrics():
    """The metric each task's benchmark reports: MCC for CoLA, F1 for MRPC and QQP, IoU@0.5 for RefCOCO."""
    assert primary_metric(TASKS["glue_cola"]) == ("mcc", "max")
    assert primary_metric(TASKS["glue_mrpc"]) == ("f1", "max")
    assert primary_metric(TASKS["glue_qqp"]) == ("f1", "max")
    assert primary_metric(TASKS["glue_sst2"]) == ("accuracy", "max")
    assert primary_metric(TASKS["grounding"]) == ("acc50", "max")
    assert primary_metric(TASKS["vqa"]) == ("vqa_score", "max")
    with pytest.raises(ValueError, match="f1 needs exactly two labels"):
        primary_metric(TASKS["visual_entailment"].replace(primary="f1"))
    with pytest.raises(ValueError, match="'bleu4' is not one"):
        primary_metric(TASKS["vqa"].replace(primary="bleu4"))


def test_glue_mcc_and_f1_equal_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = __import__("random").Random(0)
    gold = [rng.choice(("yes", "no")) for _ in range(200)]
    pred = [g if rng.random() < 0.7 else rng.choice(("yes", "no")) for g in gold]
    pred[3] = None  # an error: wrong, whatever the gold label
    records = [{"prediction": p, "reference": g} for p, g in zip(pred, gold, strict=True)]
    as_label = ["<error>" if p is None else p for p in pred]  # a class of its own (MCC, accuracy)
    as_negative = ["no" if p is None else p for p in pred]  # not the positive class (F1)
    for task in ("glue_cola", "glue_mrpc", "glue_qqp"):
        got = score_predictions(TASKS[task], records)
        assert got["mcc"] == pytest.approx(sklearn_metrics.matthews_corrcoef(gold, as_label), abs=1e-12)
        assert got["f1"] == pytest.approx(sklearn_metrics.f1_score(gold, as_negative, pos_label="yes"),
                                          abs=1e-12)
        assert got["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(gold, as_label), abs=1e-12)
        assert got["errors"] == 1
    three = [{"prediction": p, "reference": g} for p, g in (("yes", "yes"), ("no", "maybe"), ("maybe", "maybe"),
                                                            ("no", "no"), ("yes", "no"))]
    got = score_predictions(TASKS["visual_entailment"], three)
    assert "f1" not in got
    assert got["mcc"] == pytest.approx(sklearn_metrics.matthews_corrcoef([r["reference"] for r in three],
                                                                         [r["prediction"] for r in three]))


def test_example_scores_add_up_to_the_metric():
    from ofa_model.evaluation import scored

    boxes = [{"prediction": [0, 0, 2, 2], "reference": [0, 0, 2, 2]},
             {"prediction": [0, 0, 2, 2], "reference": [1, 1, 3, 3]},
             {"prediction": None, "reference": [0, 0, 1, 1]}]
    metrics, per_row = scored(TASKS["grounding"], boxes)
    assert per_row == pytest.approx([1.0, 1 / 7, 0.0]) and metrics["acc50"] == pytest.approx(1 / 3)
    captions = [{"prediction": "a red circle", "reference": ["a red circle", "a red round circle"]},
                {"prediction": "a blue square", "reference": ["a blue square", "a square in blue"]},
                {"prediction": "a green thing", "reference": ["a yellow triangle"]}]
    metrics, per_row = scored(TASKS["caption"], captions)
    assert sum(per_row) / 3 == pytest.approx(metrics["cider"]) and per_row[2] == 0.0 and per_row[0] > 0
    labels = [{"prediction": "yes", "reference": "yes"}, {"prediction": None, "reference": "no"}]
    assert scored(TASKS["glue_rte"], labels)[1] == [1.0, 0.0]
