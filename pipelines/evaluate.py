"""Evaluate a model on a corpus split: metrics (JSON) and one prediction per row, in one process or on Ray Data.

    result = evaluate_corpus("models:/ofa-vqa@champion", "s3://b/corpora/easy-vqa", "vqa", split="test",
                             output="s3://b/eval/vqa-1")                   # one process: predictions.jsonl
    result = evaluate_on_ray("models:/ofa-vqa@champion", "s3://b/corpora/easy-vqa", "vqa", split="test",
                             output="s3://b/eval/vqa-1", pool=Pool(workers=4, gpus_per_worker=0.5))

The model is a bundle directory, an s3:// bundle prefix or a registry URI (`pipelines.tracking.registry`).

`evaluate_corpus` reads the rows of the canonical corpus in manifest order (`iter_rows`) and runs them through
`ofa_model.evaluation.evaluate_rows` (the predictor), so the metrics equal `score_predictions` applied to the
written predictions file.

`evaluate_on_ray` is Ray's batch-inference pattern over the same inference path: the split is read by the
ingest's `ShardSource` (manifest order, rows numbered by `seq`; `limit` skips the rows after the first `limit`
before they are read), and `map_batches` runs `_PredictBatch` on an actor pool of `Pool.workers` actors, each
of which resolves the model and loads the bundle once and predicts batches of `batch_size` rows. The driver
gathers the records, puts them back in `seq` order and scores them all together with `score_predictions`: the
corpus-level metrics (CIDEr-D's idf, MCC, F1) are exact, and equal `evaluate_corpus`'s on the same rows. A row
the read stage marks bad (an unreadable shard, a column of the wrong type) is counted by reason in
`bad_rows` and left out of the metrics; a row the predictor cannot answer is an error, counted as wrong, as in
`evaluate_corpus`. It writes predictions.parquet (one row per example: id, prediction, reference, the model's
score, example_score, latency_s, error) and metrics.json, logs progress (rows done of total, rows/s, ETA) every
`progress_every_s`, and records the run in MLflow (experiment `experiment`): parameters, the metrics, the
progress, the files as artifacts, and a tag on the evaluated model version naming the run.

Both write report.html beside the predictions (`pipelines.report`: the metrics against a trivial baseline,
the task's breakdowns, the worst examples with their images); `evaluate_on_ray` logs it to the run too. It
reads the evaluated rows a second time (texts and image sizes of all, the images of at most
`pipelines.report.MAX_IMAGES`); `report=False` skips it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ofa_model.evaluation import evaluate_rows, prediction_item, prediction_record, scored
from ofa_model.predictor import OFAPredictor
from ofa_model.tasks import TaskSpec
from pipelines import storage
from pipelines.data.shards import iter_rows
from pipelines.progress import Progress
from pipelines.storage import S3Options
from pipelines.tracking.registry import resolve_model

logger = logging.getLogger(__name__)

METRICS_FILE, PREDICTIONS_FILE, PARQUET_FILE = "metrics.json", "predictions.jsonl", "predictions.parquet"
REPORT_FILE = "report.html"
PARQUET_COLUMNS = ("id", "task", "prediction", "reference", "reference_weights", "score", "example_score",
                   "latency_s", "error")
EXPERIMENT = "ofa-eval"


@dataclass(frozen=True)
class EvaluationOutput:
    metrics: dict[str, float]
    metrics_uri: str | None
    predictions_uri: str | None
    model: dict[str, Any]
    predictions: list[dict[str, Any]]  # one record per row, as the predictions file holds them
    bad_rows: dict[str, int] = field(default_factory=dict)  # rows the read stage could not give, by reason
    run_id: str | None = None  # the MLflow run (evaluate_on_ray)
    report_uri: str | None = None  # report.html beside the predictions


def evaluate_corpus(model: str, data: str, task: str, *, split: str = "test", output: str | None = None,
                    limit: int | None = None, mode: str | None = None, candidates: list[str] | None = None,
                    batch_size: int = 16, device: str = "cpu", tracking: str | None = None,
                    s3: S3Options | None = None, precision: str = "fp32",
                    memory_format: str = "auto", report: bool = True) -> EvaluationOutput:
    """Predict `limit` rows (None: all) of `task` in `split` of the corpus at `data` and score them.
    `candidates`: None scores the answer set the bundle stores where `mode` (or the task) needs candidates.
    `precision` / `memory_format`: `OFAPredictor`'s (its defaults keep fp32's answers).
    report: with `output`, also <output>/report.html (`pipelines.report`; a second pass over the rows)."""
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
    metrics_uri = predictions_uri = report_uri = None
    if output is not None:
        metrics_uri, predictions_uri = storage.join(output, METRICS_FILE), storage.join(output, PREDICTIONS_FILE)
        lines = "".join(json.dumps(p, sort_keys=True) + "\n" for p in result.predictions)
        storage.write_bytes(predictions_uri, lines.encode(), s3)
        storage.write_bytes(metrics_uri, json.dumps(summary, indent=2, sort_keys=True).encode(), s3)
        if report:
            report_uri = storage.join(output, REPORT_FILE)
            page = _report_bytes(predictor.tasks[task], summary, result.predictions, s3)
            storage.write_bytes(report_uri, page, s3)
    logger.info("%s on %s/%s: %s", model, data, split, result.metrics)
    return EvaluationOutput(result.metrics, metrics_uri, predictions_uri, info, result.predictions,
                            report_uri=report_uri)


def _report_bytes(spec: TaskSpec, summary: dict[str, Any], records: list[dict[str, Any]],
                  s3: S3Options | None) -> bytes:
    """report.html for these records: the rows it needs read again from the corpus (`pipelines.report`)."""
    from pipelines.report import read_report_rows, render_evaluation

    rows = read_report_rows(summary["data"], spec, records, split=summary["split"], s3=s3)
    model = summary["model"]
    facts = {"model": model["uri"] + (f" ({model['name']} v{model['version']})" if model.get("version") else ""),
             "data": storage.redact(summary["data"]), "split": summary["split"]}
    if summary.get("mlflow_run_id"):
        facts["MLflow run"] = summary["mlflow_run_id"]
    title = f"evaluation: {spec.name} on {summary['split']}"
    return render_evaluation(spec, records, summary["metrics"], rows, title=title, facts=facts,
                             bad_rows=summary.get("bad_rows")).encode()


# =============================================================================================================
# On Ray Data: an actor pool of predictors


@dataclass(frozen=True)
class Pool:
    """The actor pool of `evaluate_on_ray`: `workers` actors, each with these CPUs and GPUs (fractions allowed;
    with GPUs the predictor runs on CUDA)."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {self.workers!r}")
        if not self.cpus_per_worker > 0 or not self.gpus_per_worker >= 0:
            raise ValueError(f"cpus per worker must be > 0 and gpus per worker >= 0, got {self.cpus_per_worker!r} "
                             f"and {self.gpus_per_worker!r}")


class _PredictBatch:
    """`map_batches` callable: the bundle loaded once per actor; a batch of source rows (pyarrow, the
    ingest's SOURCE_SCHEMA) -> seq, the record as JSON, latency_s, and the read stage's reason for a bad row."""

    def __init__(self, model: str, task: str, *, tracking: str | None, s3: S3Options | None, mode: str | None,
                 candidates: list[str] | None, batch_size: int, device: str, precision: str,
                 memory_format: str) -> None:
        import torch

        torch.set_flush_denormal(True)  # the actor owns its process (see jobs.evaluate)
        path = resolve_model(model, tracking=tracking, s3=s3).path
        self.predictor = OFAPredictor.from_bundle(path, device=device, max_batch_size=batch_size,
                                                  precision=precision, memory_format=memory_format)
        self.spec = self.predictor.tasks[task]
        self.mode, self.candidates = mode, candidates

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()
        out = {"seq": [], "record": [], "latency_s": [], "bad": []}
        good = []
        for row in rows:
            if row["error"] is not None:  # a read-stage marker: no inputs, no reference
                rec = {"id": row["id"], "task": self.spec.name, "prediction": None, "reference": None,
                       "error": {"reason": row["error"], "message": row["detail"], "rows": row["span"]}}
                self._add(out, row["seq"], rec, 0.0, row["error"])
            else:
                good.append(row)
        chunk = self.predictor.limits.max_items
        for lo in range(0, len(good), chunk):
            part = good[lo:lo + chunk]
            items = [prediction_item(self.spec, r, mode=self.mode, candidates=self.candidates) for r in part]
            start = time.perf_counter()
            answers = self.predictor.predict(self.spec, items)
            latency = (time.perf_counter() - start) / len(part)
            for row, answer in zip(part, answers, strict=True):
                self._add(out, row["seq"], prediction_record(self.spec, row, answer), latency, None)
        return pa.table({"seq": pa.array(out["seq"], pa.int64()), "record": pa.array(out["record"], pa.string()),
                         "latency_s": pa.array(out["latency_s"], pa.float64()),
                         "bad": pa.array(out["bad"], pa.string())})

    @staticmethod
    def _add(out: dict[str, list], seq: int, record: dict, latency: float, bad: str | None) -> None:
        out["seq"].append(seq)
        out["record"].append(json.dumps(record))
        out["latency_s"].append(latency)
        out["bad"].append(bad)


def evaluate_on_ray(model: str, data: str, task: str, *, split: str = "test", output: str | None = None,
                    limit: int | None = None, mode: str | None = None, candidates: list[str] | None = None,
                    batch_size: int = 16, pool: Pool | None = None, device: str = "cpu",
                    tracking: str | None = None, s3: S3Options | None = None, precision: str = "fp32",
                    memory_format: str = "auto", experiment: str = EXPERIMENT,
                    progress_every_s: float = 10.0, system_metrics_every_s: float = 10.0,
                    report: bool = True) -> EvaluationOutput:
    """`evaluate_corpus` on the Ray cluster this process is connected to (`ray.init` first), as the module
    docstring says. The model is resolved here (a bad one fails before any actor starts) and in every actor.
    system_metrics_every_s: the driver's CPU and memory sampled into the run this often (0: off).
    report: report.html too (`pipelines.report`, rows read again on the driver), beside the predictions and in
    the run's artifacts."""
    import ray

    from ofa_model.bundle import read_bundle_config
    from ofa_model.instructions import parse_instruction
    from ofa_model.tasks import TASKS
    from pipelines.data.shards import read_manifest
    from pipelines.data.source import SeqSet, ShardSource, plan_shards
    from pipelines.tracking.runs import MetricLogger, client_for, experiment_id, system_metrics

    pool = pool or Pool()
    if gpu := pool.gpus_per_worker > 0:
        device = "cuda"
    resolved = resolve_model(model, tracking=tracking, s3=s3)
    custom = read_bundle_config(resolved.path).get("custom_tasks") or {}
    if task not in TASKS and task not in custom:
        raise ValueError(f"unknown task {task!r}; the model knows {sorted([*TASKS, *custom])}")
    spec: TaskSpec = TASKS[task] if task in TASKS else parse_instruction(custom[task], task)
    plan = plan_shards(read_manifest(data, s3=s3), data, [split], [task], seed=0, epoch=0, shuffle=False)
    total = plan.total_rows if limit is None else min(limit, plan.total_rows)
    skip = SeqSet([(total, plan.total_rows)])
    info = {"uri": model, "name": resolved.name, "version": resolved.version, "path": str(resolved.path)}

    client, uri = client_for(tracking)
    run = client.create_run(experiment_id(client, uri, experiment), run_name=f"eval-{task}-{split}",
                            tags={"ofa.model": model, "ofa.model_name": resolved.name or "",
                                  "ofa.model_version": resolved.version or "", "ofa.task": task, "ofa.split": split})
    run_id = run.info.run_id
    params = {"model": model, "data": storage.redact(data), "task": task, "split": split, "rows": total,
              "limit": limit, "mode": mode, "batch_size": batch_size, "workers": pool.workers,
              "cpus_per_worker": pool.cpus_per_worker, "gpus_per_worker": pool.gpus_per_worker, "device": device,
              "precision": precision, "memory_format": memory_format}
    for k, v in params.items():
        client.log_param(run_id, k, "null" if v is None else str(v))
    mlflow_log = MetricLogger(uri, run_id)
    progress = Progress(f"evaluate {task}/{split}", total=total, every_s=progress_every_s, logger=logger,
                        on_report=lambda f: mlflow_log.log({"progress/rows_done": f["done"],
                                                            "progress/rows_per_s": f["rate"]}, step=int(f["done"])))
    ok = False
    try:
        with system_metrics(uri, run_id, system_metrics_every_s):  # this driver's CPU and memory
            source = ShardSource(plan, s3=s3, skip=skip)
            ds = ray.data.read_datasource(source, override_num_blocks=max(1, math.ceil(total / batch_size)))
            ds = ds.map_batches(
                _PredictBatch, batch_size=batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=pool.workers), num_cpus=pool.cpus_per_worker,
                num_gpus=pool.gpus_per_worker if gpu else None,
                fn_constructor_kwargs={"model": model, "task": task, "tracking": uri, "s3": s3, "mode": mode,
                                       "candidates": candidates, "batch_size": batch_size, "device": device,
                                       "precision": precision, "memory_format": memory_format})
            gathered: list[tuple[int, dict, float, str | None]] = []
            errors = 0
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for seq, text, latency, bad in zip(*(batch.column(c).to_pylist() for c in ("seq", "record",
                                                                                           "latency_s", "bad")),
                                                   strict=True):
                    rec = json.loads(text)
                    errors += rec["prediction"] is None
                    gathered.append((seq, rec, latency, bad))
                progress.update(len(gathered), extra={"errors": errors})
            progress.update(len(gathered), extra={"errors": errors}, force=True)
            gathered.sort(key=lambda g: g[0])  # manifest order, as evaluate_corpus reads the rows
            bad_rows = Counter()
            for _, rec, _, bad in gathered:
                if bad is not None:
                    bad_rows[bad] += rec["error"]["rows"]
            records = [rec for _, rec, _, bad in gathered if bad is None]
            metrics, per_row = scored(spec, records)
            for rec, value in zip(records, per_row, strict=True):
                rec["example_score"] = value
            for _, rec, latency, _ in gathered:
                rec["latency_s"] = latency
            if bad_rows:
                logger.warning("%d row(s) could not be read, left out of the metrics: %s", sum(bad_rows.values()),
                               dict(bad_rows))
            summary = {"task": task, "split": split, "data": data, "model": info, "metrics": metrics,
                       "bad_rows": dict(bad_rows), "mlflow_run_id": run_id}
            files = {PARQUET_FILE: _parquet_bytes([rec for _, rec, _, _ in gathered]),
                     METRICS_FILE: json.dumps(summary, indent=2, sort_keys=True).encode()}
            if report:
                files[REPORT_FILE] = _report_bytes(spec, summary, [rec for _, rec, _, _ in gathered], s3)
            metrics_uri = predictions_uri = report_uri = None
            if output is not None:
                metrics_uri, predictions_uri = storage.join(output, METRICS_FILE), storage.join(output, PARQUET_FILE)
                storage.write_bytes(predictions_uri, files[PARQUET_FILE], s3)
                storage.write_bytes(metrics_uri, files[METRICS_FILE], s3)
                if report:
                    report_uri = storage.join(output, REPORT_FILE)
                    storage.write_bytes(report_uri, files[REPORT_FILE], s3)
            mlflow_log.log(metrics, step=0)
            with tempfile.TemporaryDirectory() as tmp:
                for name, data_bytes in files.items():
                    Path(tmp, name).write_bytes(data_bytes)
                mlflow_log.log_artifacts(tmp, "evaluation")
            if resolved.name and resolved.version:  # seen from the model version in the registry
                client.set_model_version_tag(resolved.name, resolved.version, f"eval.{task}.{split}", run_id)
        ok = True
    finally:
        client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
    logger.info("%s on %s/%s: %s (MLflow run %s)", model, storage.redact(data), split, metrics, run_id)
    return EvaluationOutput(metrics, metrics_uri, predictions_uri, info, [g[1] for g in gathered],
                            dict(bad_rows), run_id, report_uri)


def _parquet_bytes(records: list[dict[str, Any]]) -> bytes:
    """predictions.parquet: one row per record, PARQUET_COLUMNS (the error as its JSON text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{k: (json.dumps(r[k]) if k == "error" and r.get(k) is not None else r.get(k)) for k in PARQUET_COLUMNS}
            for r in records]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()
