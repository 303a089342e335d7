"""Evaluation through the one inference path: canonical rows -> `OFAPredictor` -> the task's metric.

    result = evaluate_rows(predictor, "vqa", rows)      # rows: canonical corpus rows (pipelines.data.schema)
    result.metrics      # {"vqa_score": 0.97, "rows": 500, "errors": 0}
    result.predictions  # one JSON-ready dict per row: id, the prediction, its reference

Training validation and `jobs.evaluate` both call this, so the number a run is selected by and the number a
user reproduces from a predictions file are computed the same way (`score_predictions` recomputes the metrics
from such records alone).

Metrics by `TaskSpec.metric`: "vqa" -> `vqa_score` (confidence-weighted when the row has target_weights, else
the official 10-annotator accuracy); "caption" -> `cider` (CIDEr-D, PTB-tokenised, corpus level), `bleu4` and
`exact` (the share of captions equal to one of their references, ignoring case, spaces and full stops);
"grounding" -> `acc50` (IoU >= 0.5) and `miou`; "classification" -> `accuracy`; "summarization" -> `rouge_l`
(and ROUGE-1/2). A row whose prediction is an error counts as wrong (0) and is counted in `errors`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ofa_model import metrics as M
from ofa_model.tasks import TaskSpec

# metric name and direction ("max": higher is better) that selects checkpoints and moves the champion
PRIMARY = {"vqa": ("vqa_score", "max"), "caption": ("cider", "max"), "grounding": ("acc50", "max"),
           "classification": ("accuracy", "max"), "summarization": ("rouge_l", "max")}
INPUT_FIELDS = ("image", "text", "text2", "box")  # row fields a predictor item takes (box: a region, if any)


def primary_metric(spec: TaskSpec) -> tuple[str, str]:
    """(metric name, "max" or "min") by which models of this task are compared."""
    if spec.metric not in PRIMARY:
        raise ValueError(f"task {spec.name} has no evaluation metric (metric={spec.metric!r})")
    return PRIMARY[spec.metric]


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]
    predictions: list[dict[str, Any]]


def prediction_item(spec: TaskSpec, row: Mapping[str, Any], *, mode: str | None = None,
                    candidates: Sequence[str] | None = None) -> dict[str, Any]:
    """The predictor input for a canonical row: its input fields (not its targets), plus VQA mode/candidates."""
    item = {k: row[k] for k in INPUT_FIELDS if row.get(k) is not None and k != spec.target_field}
    if mode is not None:
        item["mode"] = mode
    if candidates is not None:
        item["candidates"] = list(candidates)
    return item


def evaluate_rows(predictor, task: str | TaskSpec, rows: Iterable[Mapping[str, Any]], *, mode: str | None = None,
                  candidates: Sequence[str] | None = None) -> EvalResult:
    """Predict every row (as many per call as the predictor's limits allow) and score the predictions."""
    spec = task if isinstance(task, TaskSpec) else predictor.tasks[task]
    chunk = predictor.limits.max_items
    records: list[dict[str, Any]] = []
    batch: list[Mapping[str, Any]] = []

    def flush() -> None:
        items = [prediction_item(spec, r, mode=mode, candidates=candidates) for r in batch]
        for row, out in zip(batch, predictor.predict(spec, items), strict=True):
            records.append(prediction_record(spec, row, out))
        batch.clear()

    for row in rows:
        batch.append(row)
        if len(batch) >= chunk:
            flush()
    if batch:
        flush()
    return EvalResult(score_predictions(spec, records), records)


def prediction_record(spec: TaskSpec, row: Mapping[str, Any], out: Mapping[str, Any]) -> dict[str, Any]:
    """One scored record: the row's id and reference beside the predictor's answer `out` ({} for none)."""
    rec: dict[str, Any] = {"id": row.get("id"), "task": spec.name}
    if "error" in out and not isinstance(out.get(spec.answer_key), str | list):
        rec["error"] = out["error"]
        rec["prediction"] = None
    else:
        rec["prediction"] = out.get(spec.answer_key)
        if "score" in out:
            rec["score"] = out["score"]
    rec["reference"] = _reference(spec, row)
    if row.get("target_weights") is not None:
        rec["reference_weights"] = list(row["target_weights"])
    return rec


def _reference(spec: TaskSpec, row: Mapping[str, Any]) -> Any:
    if spec.metric == "grounding":
        return list(row[spec.target_field]) if row.get(spec.target_field) is not None else None
    if spec.metric in ("vqa", "caption") and row.get("targets"):
        return list(row["targets"])
    target = row.get(spec.target_field)
    return [target] if spec.metric in ("vqa", "caption") and target is not None else target


def score_predictions(spec: TaskSpec, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The task's metrics from prediction records (as `evaluate_rows` writes them)."""
    n = len(records)
    errors = sum(1 for r in records if r.get("prediction") is None)
    out: dict[str, float] = {"rows": float(n), "errors": float(errors)}
    if n == 0:
        return out
    kind = spec.metric
    if kind == "vqa":
        total = 0.0
        for r in records:
            if r["prediction"] is None or not r["reference"]:
                continue
            if r.get("reference_weights") is not None:
                total += M.vqa_score_weighted(r["prediction"], r["reference"], r["reference_weights"])
            else:
                total += M.vqa_accuracy(r["prediction"], r["reference"])
        out["vqa_score"] = total / n
    elif kind == "caption":
        ids = [str(i) for i in range(n)]
        preds = {i: (r["prediction"] or "") for i, r in zip(ids, records, strict=True)}
        refs = {i: list(r["reference"]) for i, r in zip(ids, records, strict=True)}
        scores = M.caption_scores(preds, refs, metrics=("CIDEr", "BLEU_4"))
        out["cider"], out["bleu4"] = scores["CIDEr"], scores["BLEU_4"]
        out["exact"] = sum(1 for r in records if r["prediction"] is not None
                           and _caption_key(r["prediction"]) in {_caption_key(x) for x in r["reference"]}) / n
    elif kind == "grounding":
        ious = [M.box_iou(r["prediction"], r["reference"]) if r["prediction"] is not None else 0.0
                for r in records]
        out["acc50"] = sum(1 for v in ious if v >= 0.5) / n
        out["miou"] = sum(ious) / n
    elif kind == "classification":
        out["accuracy"] = sum(1 for r in records if r["prediction"] is not None
                              and r["prediction"] == r["reference"]) / n
    elif kind == "summarization":
        scores = M.summarization_scores([r["prediction"] or "" for r in records],
                                        [r["reference"] for r in records])
        out.update({"rouge_1": scores["ROUGE_1"], "rouge_2": scores["ROUGE_2"], "rouge_l": scores["ROUGE_L"]})
    else:
        raise ValueError(f"task {spec.name} has no evaluation metric (metric={spec.metric!r})")
    return out


def _caption_key(text: Any) -> str:
    """A caption compared for `exact`: lower case, full stops dropped, white space folded."""
    return " ".join(str(text).lower().replace(".", " ").split())
