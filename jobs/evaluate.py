"""Evaluate a model on a corpus split: metrics (JSON) and one prediction per row, in one process or on Ray Data.

    python -m jobs.evaluate --model models:/ofa-vqa@champion --data s3://b/corpora/easy-vqa --task vqa \\
        --split test --output s3://b/eval/vqa-1 --workers 4 --gpus-per-worker 0.5
    python -m jobs.evaluate --model bundles/ofa-tiny --data /data/coco --task caption --split val --limit 500

--model: a bundle directory (e.g. a converted official checkpoint), a bundle directory on S3 (s3://bucket/prefix,
downloaded into the model cache) or models:/name@alias, models:/name/N.
With --workers N: Ray Data batch inference on an actor pool of N predictors (`pipelines.evaluate.evaluate_on_ray`)
on the cluster of RAY_ADDRESS (else a local one); --batch-size rows per actor call; progress (rows done of
total, rows/s, ETA) on the console every --progress-every seconds; writes <output>/metrics.json and
<output>/predictions.parquet and logs the run (metrics, progress, the files) to MLflow experiment
--experiment. Without --workers: this process alone (`evaluate_corpus`), writing <output>/metrics.json and
<output>/predictions.jsonl, nothing to MLflow. Both write <output>/report.html (unless --no-report): one
self-contained page with the metrics against a trivial baseline, the task's breakdowns and its worst examples.
Both read and score the rows alike: rows of a shard that cannot be read are counted by reason (bad_rows) and left
out of the metrics. Both print the metrics (the single process its predictions too); the metrics of both are
equal on the same rows. Exit status 2 on a bad model, corpus or option.
"""

from __future__ import annotations

import dataclasses

from jobs._cli import Parser, fail, print_json, setup_logging

PROG = "python -m jobs.evaluate"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="bundle directory, s3://bucket/prefix or models:/name@alias")
    p.add_argument("--data", required=True, help="canonical corpus directory (holds manifest.json)")
    p.add_argument("--task", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--output", help="directory (path, file:// or s3://) for metrics.json and predictions.jsonl")
    p.add_argument("--limit", type=int, help="at most this many rows")
    p.add_argument("--mode", choices=("open", "trie", "allcand"), help="VQA inference mode")
    p.add_argument("--candidates", help="comma-separated answers (VQA allcand / trie; default: the answer set "
                                        "the model's bundle stores)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="fp32",
                   help="fp32 (default) keeps the reference answers; bf16 is faster on AMX/AVX-512 BF16 CPUs and "
                        "Ampere+ GPUs but may change some (bench/inference.py fidelity); fp16 needs CUDA")
    p.add_argument("--memory-format", choices=("auto", "contiguous", "channels_last"), default="auto",
                   help="the ResNet's layout (auto: channels_last)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--workers", type=int, help="evaluate on Ray Data with this many predictor actors (default: "
                                               "in this process)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per actor, fractions allowed (> 0: the actors predict on CUDA)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor, fractions allowed")
    p.add_argument("--experiment", default="ofa-eval", help="MLflow experiment of a --workers run")
    p.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines (--workers)")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip report.html (the HTML report beside the predictions, which reads the evaluated "
                        "rows a second time)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        fail(PROG, "--limit must be >= 1")
    setup_logging()
    import torch

    torch.set_flush_denormal(True)  # process-wide, so the entry point's call: denormals slow CPU decoding 3x
    from ofa_model.errors import InputError
    from pipelines.evaluate import evaluate_corpus
    from pipelines.tracking.registry import ModelSourceError

    cands = [c.strip() for c in args.candidates.split(",") if c.strip()] if args.candidates else None
    if args.workers is not None:
        _on_ray(args, cands)
        return
    try:
        out = evaluate_corpus(args.model, args.data, args.task, split=args.split, output=args.output,
                              limit=args.limit, mode=args.mode, candidates=cands, batch_size=args.batch_size,
                              device=args.device, tracking=args.tracking_uri, precision=args.precision,
                              memory_format=args.memory_format, report=args.report)
    except (ModelSourceError, InputError, FileNotFoundError) as exc:
        fail(PROG, exc)
    except ValueError as exc:  # bad manifest, unknown task
        fail(PROG, exc)
    print_json(dataclasses.asdict(out))


def _on_ray(args, cands: list[str] | None) -> None:
    from ofa_model.errors import ConfigError, InputError
    from pipelines.evaluate import Pool, evaluate_on_ray
    from pipelines.job_env import job_env
    from pipelines.tracking.registry import ModelSourceError

    try:
        pool = Pool(workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                    gpus_per_worker=args.gpus_per_worker)
        env = job_env(args.tracking_uri, tracking_key="--tracking-uri")
    except (ValueError, ConfigError) as exc:
        fail(PROG, exc)
    from jobs._cli import init_ray

    init_ray(env)
    try:
        out = evaluate_on_ray(args.model, args.data, args.task, split=args.split, output=args.output,
                              limit=args.limit, mode=args.mode, candidates=cands, batch_size=args.batch_size,
                              pool=pool, device=args.device, tracking=env["MLFLOW_TRACKING_URI"],
                              precision=args.precision, memory_format=args.memory_format,
                              experiment=args.experiment, progress_every_s=args.progress_every,
                              report=args.report)
    except (ModelSourceError, InputError, FileNotFoundError, ValueError) as exc:
        fail(PROG, exc)
    print_json({k: v for k, v in dataclasses.asdict(out).items() if k != "predictions"})


if __name__ == "__main__":
    main()
