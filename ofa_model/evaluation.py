"""Evaluation through the one inference path: canonical rows -> `OFAPredictor` -> the task's metric.

    result = evaluate_rows(predictor, "vqa", rows)      # rows: canonical corpus rows (pipelines.data.schema)
    result.metrics      # {"vqa_score": 0.97, "rows": 500, "errors": 0}
    result.predictions  # one JSON-ready dict per row: id, the prediction, its reference

Training validation and `jobs.evaluate` both call this, so the number a run is selected by and the number a
user reproduces from a predictions file are computed the same way (`score_predictions` recomputes the metrics
from such records alone).

Metrics by `TaskSpec.metric` (`METRICS`): "vqa" -> `vqa_score` (confidence-weighted when the row has
target_weights, else the official 10-annotator accuracy); "caption" -> `cider` (CIDEr-D, PTB-tokenised, corpus
level), `bleu4` and `exact` (the share of captions equal to one of their references, ignoring case, spaces and
full stops); "grounding" -> `acc50` (IoU >= 0.5, RefCOCO's accuracy) and `miou`; "classification" ->
`accuracy`, `mcc` (Matthews correlation, K-class for K labels) and, for a task with two labels, `f1` (of its
first label: "yes" for GLUE's MRPC and QQP); "summarization" -> `rouge_l` (and ROUGE-1/2). A row whose
prediction is an error counts as wrong (0) and is counted in `errors`. The metric models are compared by is
`TaskSpec.primary`, else the kind's first: MCC for CoLA, F1 for MRPC and QQP, as OFA and GLUE report them.

Each record also carries `example_score`, the row's own share of the metric: its VQA accuracy, CIDEr-D, IoU,
1 / 0 for a right / wrong label, or ROUGE-L F (0 for an error), and `latency_s`, the row's share of the wall time
of the predictor call that answered it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ofa_model import metrics as M
from ofa_model.tasks import TaskSpec

# What each metric kind reports; its first is the primary metric of a task that names none (`TaskSpec.primary`).
# Every one of them is better higher.
METRICS = {"vqa": ("vqa_score",), "caption": ("cider", "bleu4", "exact"), "grounding": ("acc50", "miou"),
           "classification": ("accuracy", "mcc", "f1"), "summarization": ("rouge_l", "rouge_1", "rouge_2")}
INPUT_FIELDS = ("image", "text", "text2", "box")  # row fields a predictor item takes (box: a region, if any)


def primary_metric(spec: TaskSpec) -> tuple[str, str]:
    """(metric name, "max" or "min") by which models of this task are compared."""
    if spec.metric not in METRICS:
        raise ValueError(f"task {spec.name} has no evaluation metric (metric={spec.metric!r})")
    name = spec.primary or METRICS[spec.metric][0]
    if name not in METRICS[spec.metric] or (name == "f1" and len(spec.labels) != 2):
        raise ValueError(f"task {spec.name}: primary metric {name!r} is not one its {spec.metric!r} scoring reports "
                         f"({', '.join(METRICS[spec.metric])}; f1 needs exactly two labels)")
    return name, "max"


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
    return evaluate_records(spec, predict_records(predictor, spec, rows, mode=mode, candidates=candidates))


def predict_records(predictor, spec: TaskSpec, rows: Iterable[Mapping[str, Any]], *, mode: str | None = None,
                    candidates: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One unscored prediction record per row, in the rows' order (as many rows per predictor call as its limits
    allow), with `latency_s`: its call's wall time over the rows in it. Records predicted in parts (one per rank,
    or one per Ray Data batch) and joined in row order score as `evaluate_rows` would."""
    chunk = predictor.limits.max_items
    records: list[dict[str, Any]] = []
    batch: list[Mapping[str, Any]] = []

    def flush() -> None:
        items = [prediction_item(spec, r, mode=mode, candidates=candidates) for r in batch]
        start = time.perf_counter()
        outs = predictor.predict(spec, items)
        latency = (time.perf_counter() - start) / len(batch)
        for row, out in zip(batch, outs, strict=True):
            records.append({**prediction_record(spec, row, out), "latency_s": latency})
        batch.clear()

    for row in rows:
        batch.append(row)
        if len(batch) >= chunk:
            flush()
    if batch:
        flush()
    return records


def evaluate_records(spec: TaskSpec, records: list[dict[str, Any]]) -> EvalResult:
    """The task's metrics over all `records` together (corpus-level), each record given its `example_score`."""
    metrics, per_row = scored(spec, records)
    for rec, value in zip(records, per_row, strict=True):
        rec["example_score"] = value
    return EvalResult(metrics, records)


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
    return scored(spec, records)[0]


def scored(spec: TaskSpec, records: Sequence[Mapping[str, Any]]) -> tuple[dict[str, float], list[float]]:
    """The task's metrics from prediction records, and each record's `example_score` (module docstring)."""
    n = len(records)
    errors = sum(1 for r in records if r.get("prediction") is None)
    out: dict[str, float] = {"rows": float(n), "errors": float(errors)}
    if n == 0:
        return out, []
    kind = spec.metric
    if kind == "vqa":
        per_row = [_vqa_score(r) for r in records]
        out["vqa_score"] = sum(per_row) / n
    elif kind == "caption":
        ids = [str(i) for i in range(n)]
        preds = {i: (r["prediction"] or "") for i, r in zip(ids, records, strict=True)}
        refs = {i: list(r["reference"]) for i, r in zip(ids, records, strict=True)}
        by_image: dict[str, float] = {}
        scores = M.caption_scores(preds, refs, metrics=("CIDEr", "BLEU_4"), cider_by_image=by_image)
        out["cider"], out["bleu4"] = scores["CIDEr"], scores["BLEU_4"]
        out["exact"] = sum(1 for r in records if r["prediction"] is not None
                           and _caption_key(r["prediction"]) in {_caption_key(x) for x in r["reference"]}) / n
        per_row = [by_image[i] if r["prediction"] is not None else 0.0 for i, r in zip(ids, records, strict=True)]
    elif kind == "grounding":
        per_row = [M.box_iou(r["prediction"], r["reference"]) if r["prediction"] is not None else 0.0
                   for r in records]
        answered = [r for r in records if r["prediction"] is not None]
        hits = round(M.grounding_accuracy([r["prediction"] for r in answered], [r["reference"] for r in answered])
                     * len(answered)) if answered else 0
        out["acc50"] = hits / n
        out["miou"] = sum(per_row) / n
    elif kind == "classification":
        preds, gold = [r["prediction"] for r in records], [r["reference"] for r in records]
        per_row = [float(p is not None and p == g) for p, g in zip(preds, gold, strict=True)]
        out["accuracy"] = M.accuracy(preds, gold)
        out["mcc"] = M.matthews_corrcoef(preds, gold)  # an error is a label of its own, never right
        if len(spec.labels) == 2:
            out["f1"] = M.f1_binary(preds, gold, positive=spec.labels[0])
    elif kind == "summarization":
        scores = M.summarization_scores([r["prediction"] or "" for r in records],
                                        [r["reference"] for r in records])
        out.update({"rouge_1": scores["ROUGE_1"], "rouge_2": scores["ROUGE_2"], "rouge_l": scores["ROUGE_L"]})
        per_row = [100.0 * M.rouge_l(r["prediction"], r["reference"])["f"] if r["prediction"] is not None else 0.0
                   for r in records]
    else:
        raise ValueError(f"task {spec.name} has no evaluation metric (metric={spec.metric!r})")
    return out, per_row


def _vqa_score(record: Mapping[str, Any]) -> float:
    if record["prediction"] is None or not record["reference"]:
        return 0.0
    if record.get("reference_weights") is not None:
        return M.vqa_score_weighted(record["prediction"], record["reference"], record["reference_weights"])
    return M.vqa_accuracy(record["prediction"], record["reference"])


def _caption_key(text: Any) -> str:
    """A caption compared for `exact`: lower case, full stops dropped, white space folded."""
    return " ".join(str(text).lower().replace(".", " ").split())
