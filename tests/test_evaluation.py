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
