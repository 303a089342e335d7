"""Evaluate a model on a corpus split: metrics (JSON) and one prediction per row (JSONL, with ids).

    result = evaluate_corpus("models:/ofa-vqa@champion", "s3://b/corpora/easy-vqa", "vqa", split="test",
                             output="s3://b/eval/vqa-1")

The model is a bundle directory, an s3:// bundle prefix or a registry URI (`pipelines.tracking.registry`); rows are read from the canonical
corpus in manifest order and go through `ofa_model.evaluation.evaluate_rows` (the predictor), so the metrics
equal `score_predictions` applied to the written predictions file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from ofa_model.evaluation import evaluate_rows
from ofa_model.predictor import OFAPredictor
from pipelines import storage
from pipelines.data.shards import iter_rows
from pipelines.storage import S3Options
from pipelines.tracking.registry import resolve_model

logger = logging.getLogger(__name__)

METRICS_FILE, PREDICTIONS_FILE = "metrics.json", "predictions.jsonl"


@dataclass(frozen=True)
class EvaluationOutput:
    metrics: dict[str, float]
    metrics_uri: str | None
    predictions_uri: str | None
    model: dict[str, Any]
    predictions: list[dict[str, Any]]  # one record per row, as the predictions file holds them


def evaluate_corpus(model: str, data: str, task: str, *, split: str = "test", output: str | None = None,
                    limit: int | None = None, mode: str | None = None, candidates: list[str] | None = None,
                    batch_size: int = 16, device: str = "cpu", tracking: str | None = None,
                    s3: S3Options | None = None, precision: str = "fp32",
                    memory_format: str = "auto") -> EvaluationOutput:
    """Predict `limit` rows (None: all) of `task` in `split` of the corpus at `data` and score them.
    `candidates`: None scores the answer set the bundle stores where `mode` (or the task) needs candidates.
    `precision` / `memory_format`: `OFAPredictor`'s (its defaults keep fp32's answers)."""
    resolved = resolve_model(model, tracking=tracking, s3=s3)
    predictor = OFAPredictor.from_bundle(resolved.path, device=device, max_batch_size=batch_size,
                                         precision=precision, memory_format=memory_format)
    if task not in predictor.tasks:
        raise ValueError(f"unknown task {task!r}; the model knows {sorted(predictor.tasks)}")

    def rows():
        for n, row in enumerate(iter_rows(data, s3=s3, splits=[split], tasks=[task])):
            if limit is not None and n >= limit:
                return
            yield row

    result = evaluate_rows(predictor, task, rows(), mode=mode, candidates=candidates)
    info = {"uri": model, "name": resolved.name, "version": resolved.version, "path": str(resolved.path)}
    summary = {"task": task, "split": split, "data": data, "model": info, "metrics": result.metrics}
    metrics_uri = predictions_uri = None
    if output is not None:
        metrics_uri, predictions_uri = storage.join(output, METRICS_FILE), storage.join(output, PREDICTIONS_FILE)
        lines = "".join(json.dumps(p, sort_keys=True) + "\n" for p in result.predictions)
        storage.write_bytes(predictions_uri, lines.encode(), s3)
        storage.write_bytes(metrics_uri, json.dumps(summary, indent=2, sort_keys=True).encode(), s3)
    logger.info("%s on %s/%s: %s", model, data, split, result.metrics)
    return EvaluationOutput(result.metrics, metrics_uri, predictions_uri, info, result.predictions)
