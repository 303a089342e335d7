"""Evaluate a model on a corpus split: metrics (JSON) and one prediction per row, in one process or on Ray Data.

    result = evaluate_corpus("models:/ofa-vqa@champion", "s3://b/corpora/easy-vqa", "vqa", split="test",
                             output="s3://b/eval/vqa-1")                   # one process: predictions.jsonl
    result = evaluate_on_ray("models:/ofa-vqa@champion", "s3://b/corpora/easy-vqa", "vqa", split="test",
                             output="s3://b/eval/vqa-1", pool=Pool(workers=4, gpus_per_worker=0.5))

The model is a bundle directory, an s3:// bundle prefix or a registry URI (`pipelines.tracking.registry`).

The two differ only in where prediction runs. Both select the rows alike (`_selection`: the split's shards in
manifest order, rows numbered by `seq`; `limit` skips the rows after the first `limit` before they are read) and
read them as the ingest's source does (`pipelines.data.source`). `_predict_block` turns a block of those rows
into records through `ofa_model.evaluation.predict_records` (the predictor, as training validation calls it);
`evaluate_corpus` calls it here on each block, `evaluate_on_ray` in `map_batches` on an actor pool of
`Pool.workers` actors (`_PredictBatch`), each of which resolves the model and loads the bundle once and predicts
batches of `batch_size` rows. `_gather` puts the records back in `seq` order and scores them all together
(`ofa_model.evaluation.evaluate_records`): the corpus-level metrics (CIDEr-D's idf, MCC, F1) are exact, the same
either way, and equal `score_predictions` applied to the written predictions. A row the read stage marks bad
(an unreadable shard, a column of the wrong type) is counted by reason in `bad_rows` and left out of the
metrics; a row the predictor cannot answer is an error, counted as wrong. Progress (rows done of total, rows/s,
ETA) is logged every `PROGRESS_EVERY_S` (`progress_every_s` on Ray).

Outputs (`_files`, one writer for both): metrics.json, the predictions (one per row: id, prediction, reference,
the model's score, example_score, latency_s, error) as predictions.jsonl (`evaluate_corpus`) or
predictions.parquet (`evaluate_on_ray`), and report.html (`pipelines.report`: the metrics against a trivial
baseline, the task's breakdowns, the worst examples with their images; it reads the evaluated rows a second
time, texts and image sizes of all, the images of at most `pipelines.report.MAX_IMAGES`; `report=False` skips
it). `evaluate_on_ray` also records the run in MLflow (experiment `experiment`): parameters, the metrics, the
progress, the files as artifacts, and a tag on the evaluated model version naming the run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from ofa_model.bundle import read_bundle_config
from ofa_model.evaluation import evaluate_records, predict_records
from ofa_model.instructions import parse_instruction
from ofa_model.predictor import OFAPredictor
from ofa_model.tasks import TASKS, TaskSpec
from pipelines import storage
from pipelines.data.shards import read_manifest
from pipelines.data.source import EpochPlan, SeqSet, ShardSource, plan_shards, read_blocks
from pipelines.progress import Progress
from pipelines.storage import S3Options
from pipelines.tracking.registry import ResolvedModel, resolve_model

logger = logging.getLogger(__name__)

METRICS_FILE, PREDICTIONS_FILE, PARQUET_FILE = "metrics.json", "predictions.jsonl", "predictions.parquet"
REPORT_FILE = "report.html"
PARQUET_COLUMNS = ("id", "task", "prediction", "reference", "reference_weights", "score", "example_score",
                   "latency_s", "error")
EXPERIMENT = "ofa-eval"
PROGRESS_EVERY_S = 10.0


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
    """Predict `limit` rows (None: all) of `task` in `split` of the corpus at `data` in this process and score
    them; with `output`, write metrics.json, predictions.jsonl and (`report`) report.html there.
    `candidates`: None scores the answer set the bundle stores where `mode` (or the task) needs candidates.
    `precision` / `memory_format`: `OFAPredictor`'s (its defaults keep fp32's answers)."""
    resolved, spec = _model_and_task(model, task, tracking, s3)
    predictor = OFAPredictor.from_bundle(resolved.path, device=device, max_batch_size=batch_size,
                                         precision=precision, memory_format=memory_format)
    plan, total, skip = _selection(data, split, task, limit, s3)
    progress = Progress(f"evaluate {task}/{split}", total=total, every_s=PROGRESS_EVERY_S, logger=logger)
    blocks = (_predict_block(predictor, task, block, mode, candidates) for block in read_blocks(plan, s3, skip))
    records, bad_rows, metrics = _gather(spec, blocks, progress)
    summary = _summary(model, resolved, data, task, split, metrics, bad_rows)
    uris = _write(output, _files(spec, summary, records, PREDICTIONS_FILE, report, s3), s3) if output is not None else {}
    logger.info("%s on %s/%s: %s", model, storage.redact(data), split, metrics)
    return EvaluationOutput(metrics, uris.get(METRICS_FILE), uris.get(PREDICTIONS_FILE), summary["model"], records,
                            bad_rows, report_uri=uris.get(REPORT_FILE))


# =============================================================================================================
# The pieces both entry points share


def _model_and_task(model: str, task: str, tracking: str | None,
                    s3: S3Options | None) -> tuple[ResolvedModel, TaskSpec]:
    """The model resolved to a local bundle and the task's spec (a built-in or one of the bundle's custom tasks),
    without loading the weights; ValueError for a task the model does not know."""
    resolved = resolve_model(model, tracking=tracking, s3=s3)
    custom = read_bundle_config(resolved.path).get("custom_tasks") or {}
    if task not in TASKS and task not in custom:
        raise ValueError(f"unknown task {task!r}; the model knows {sorted([*TASKS, *custom])}")
    return resolved, TASKS[task] if task in TASKS else parse_instruction(custom[task], task)


def _selection(data: str, split: str, task: str, limit: int | None,
               s3: S3Options | None) -> tuple[EpochPlan, int, SeqSet]:
    """The rows evaluated: `task`'s shards of `split` in manifest order (the plan), how many of its rows are
    evaluated (the first `limit`, None: all) and the rows after them, skipped before they are read."""
    plan = plan_shards(read_manifest(data, s3=s3), data, [split], [task], seed=0, epoch=0, shuffle=False)
    total = plan.total_rows if limit is None else min(limit, plan.total_rows)
    return plan, total, SeqSet([(total, plan.total_rows)])


def _predict_block(predictor: OFAPredictor, task: str, block: pa.Table, mode: str | None,
                   candidates: list[str] | None) -> pa.Table:
    """A block of source rows (pyarrow, `pipelines.data.source.SOURCE_SCHEMA`) -> columns seq, record (the
    prediction record as JSON, `ofa_model.evaluation.predict_records`) and bad (the read stage's reason for a
    marker row, whose record holds the reason, detail and rows it stands for as its error)."""
    spec = predictor.tasks[task]
    seqs, records, bad = [], [], []
    good = []
    for row in block.to_pylist():
        if row["error"] is None:
            good.append(row)
            continue
        seqs.append(row["seq"])
        records.append({"id": row["id"], "task": spec.name, "prediction": None, "reference": None, "latency_s": 0.0,
                        "error": {"reason": row["error"], "message": row["detail"], "rows": row["span"]}})
        bad.append(row["error"])
    for row, rec in zip(good, predict_records(predictor, spec, good, mode=mode, candidates=candidates), strict=True):
        seqs.append(row["seq"])
        records.append(rec)
        bad.append(None)
    return pa.table({"seq": pa.array(seqs, pa.int64()), "record": pa.array([json.dumps(r) for r in records], pa.string()),
                     "bad": pa.array(bad, pa.string())})


def _gather(spec: TaskSpec, blocks: Iterable[pa.Table],
            progress: Progress) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, float]]:
    """`_predict_block`'s output -> (every record in row order, the unreadable rows by reason, the metrics of
    the readable rows, scored together; each readable record given its `example_score`)."""
    gathered: list[tuple[int, dict, str | None]] = []
    errors = 0
    for block in blocks:
        for seq, text, bad in zip(*(block.column(c).to_pylist() for c in ("seq", "record", "bad")), strict=True):
            rec = json.loads(text)
            errors += rec["prediction"] is None
            gathered.append((seq, rec, bad))
        progress.update(len(gathered), extra={"errors": errors})
    progress.update(len(gathered), extra={"errors": errors}, force=True)
    gathered.sort(key=lambda g: g[0])  # manifest order
    bad_rows = Counter()
    for _, rec, bad in gathered:
        if bad is not None:
            bad_rows[bad] += rec["error"]["rows"]
    if bad_rows:
        logger.warning("%d row(s) could not be read, left out of the metrics: %s", sum(bad_rows.values()),
                       dict(bad_rows))
    metrics = evaluate_records(spec, [rec for _, rec, bad in gathered if bad is None]).metrics
    return [rec for _, rec, _ in gathered], dict(bad_rows), metrics


def _summary(model: str, resolved: ResolvedModel, data: str, task: str, split: str, metrics: dict[str, float],
             bad_rows: dict[str, int], **extra: Any) -> dict[str, Any]:
    """What metrics.json holds: the task, split, data, model, metrics, bad rows and `extra` (the MLflow run)."""
    info = {"uri": model, "name": resolved.name, "version": resolved.version, "path": str(resolved.path)}
    return {"task": task, "split": split, "data": data, "model": info, "metrics": metrics, "bad_rows": bad_rows,
            **extra}


def _files(spec: TaskSpec, summary: dict[str, Any], records: list[dict[str, Any]], predictions_file: str,
           report: bool, s3: S3Options | None) -> dict[str, bytes]:
    """The evaluation's files by name: metrics.json, the predictions (`predictions_file`: PREDICTIONS_FILE as
    JSON lines or PARQUET_FILE as Parquet) and, with `report`, report.html."""
    files = {predictions_file: _WRITERS[predictions_file](records),
             METRICS_FILE: json.dumps(summary, indent=2, sort_keys=True).encode()}
    if report:
        files[REPORT_FILE] = _report_bytes(spec, summary, records, s3)
    return files


def _write(output: str, files: dict[str, bytes], s3: S3Options | None) -> dict[str, str]:
    """`files` written under `output`: their URIs by name."""
    uris = {name: storage.join(output, name) for name in files}
    for name, data in files.items():
        storage.write_bytes(uris[name], data, s3)
    return uris


def _jsonl_bytes(records: list[dict[str, Any]]) -> bytes:
    """predictions.jsonl: one record per line, keys sorted."""
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()


def _parquet_bytes(records: list[dict[str, Any]]) -> bytes:
    """predictions.parquet: one row per record, PARQUET_COLUMNS (the error as its JSON text)."""
    import pyarrow.parquet as pq

    rows = [{k: (json.dumps(r[k]) if k == "error" and r.get(k) is not None else r.get(k)) for k in PARQUET_COLUMNS}
            for r in records]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


_WRITERS = {PREDICTIONS_FILE: _jsonl_bytes, PARQUET_FILE: _parquet_bytes}


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
    """`map_batches` callable: the bundle loaded once per actor; a batch of source rows -> `_predict_block`."""

    def __init__(self, model: str, task: str, *, tracking: str | None, s3: S3Options | None, mode: str | None,
                 candidates: list[str] | None, batch_size: int, device: str, precision: str,
                 memory_format: str) -> None:
        import torch

        torch.set_flush_denormal(True)  # the actor owns its process (see jobs.evaluate)
        path = resolve_model(model, tracking=tracking, s3=s3).path
        self.predictor = OFAPredictor.from_bundle(path, device=device, max_batch_size=batch_size,
                                                  precision=precision, memory_format=memory_format)
        self.task, self.mode, self.candidates = task, mode, candidates

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _predict_block(self.predictor, self.task, batch, self.mode, self.candidates)


def evaluate_on_ray(model: str, data: str, task: str, *, split: str = "test", output: str | None = None,
                    limit: int | None = None, mode: str | None = None, candidates: list[str] | None = None,
                    batch_size: int = 16, pool: Pool | None = None, device: str = "cpu",
                    tracking: str | None = None, s3: S3Options | None = None, precision: str = "fp32",
                    memory_format: str = "auto", experiment: str = EXPERIMENT,
                    progress_every_s: float = PROGRESS_EVERY_S, system_metrics_every_s: float = 10.0,
                    report: bool = True) -> EvaluationOutput:
    """`evaluate_corpus` on the Ray cluster this process is connected to (`ray.init` first), prediction on an
    actor pool, the predictions as predictions.parquet, the run in MLflow (module docstring). The model is
    resolved here (a bad one fails before any actor starts) and in every actor.
    system_metrics_every_s: the driver's CPU and memory sampled into the run this often (0: off).
    report: report.html too, beside the predictions and in the run's artifacts."""
    import ray

    from pipelines.tracking.runs import MetricLogger, client_for, experiment_id, system_metrics

    pool = pool or Pool()
    if gpu := pool.gpus_per_worker > 0:
        device = "cuda"
    resolved, spec = _model_and_task(model, task, tracking, s3)
    plan, total, skip = _selection(data, split, task, limit, s3)

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
            ds = ray.data.read_datasource(ShardSource(plan, s3=s3, skip=skip),
                                          override_num_blocks=max(1, math.ceil(total / batch_size)))
            ds = ds.map_batches(
                _PredictBatch, batch_size=batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=pool.workers), num_cpus=pool.cpus_per_worker,
                num_gpus=pool.gpus_per_worker if gpu else None,
                fn_constructor_kwargs={"model": model, "task": task, "tracking": uri, "s3": s3, "mode": mode,
                                       "candidates": candidates, "batch_size": batch_size, "device": device,
                                       "precision": precision, "memory_format": memory_format})
            records, bad_rows, metrics = _gather(spec, ds.iter_batches(batch_size=None, batch_format="pyarrow"),
                                                 progress)
            summary = _summary(model, resolved, data, task, split, metrics, bad_rows, mlflow_run_id=run_id)
            files = _files(spec, summary, records, PARQUET_FILE, report, s3)
            uris = _write(output, files, s3) if output is not None else {}
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
    return EvaluationOutput(metrics, uris.get(METRICS_FILE), uris.get(PARQUET_FILE), summary["model"], records,
                            bad_rows, run_id, uris.get(REPORT_FILE))
