"""Sweep benchmark: easy-VQA, ofa-micro from scratch, 8 trials, 2 at once, on this machine's cores.

    python -m bench.tune                    # the benchmark (configs/tune/vqa_easyvqa.yaml as written)
    python -m bench.tune --quick            # a few-minute end-to-end check: 4 trials of 2 short epochs

What it does:

* converts the installed easy-VQA package once (`bench.learning_curve.ensure_corpus`, cached under the
  output directory; `--limit` images per split, default all, `--quick` 100);
* runs `tune.runner.run_sweep` on configs/tune/vqa_easyvqa.yaml (ASHA, random search) on a local Ray with 4
  logical CPUs (each trial: 0.25 driver + 0.5 worker + 0.75 data CPUs), MLflow and checkpoints in the output
  directory; the sweep's wall time is the benchmark's time;
* trains the default config (configs/finetune/vqa_easyvqa.yaml with the sweep's `train` settings: same epochs,
  updates per epoch and validation rows) once with `pipelines.train.train`, for the accuracy to beat;
* reports the wall time, the best trial's accuracy against the default's, and the trial time ASHA saved: the
  trials' summed time against the same had every trial run all epochs (a stopped trial's missing epochs
  estimated at its own mean epoch time). Prints the table; writes bench_tune.json beside the sweep's files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/tune/vqa_easyvqa.yaml"
QUICK = ("num_samples=4", "train.epochs=2", "train.max_steps_per_epoch=8", "train.validation.max_rows=48")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 trials of 2 short epochs on 100 images per split")
    p.add_argument("--output", default=str(ROOT / "tmp" / "bench_tune"),
                   help="directory for the corpus cache, MLflow, checkpoints, table, plot and best config")
    p.add_argument("--limit", type=int, default=None, help="easy-VQA images per split (default: all)")
    p.add_argument("--config", default=str(CONFIG), help="the sweep config (default: %(default)s)")
    p.add_argument("--shard-mb", type=float, default=None,
                   help="convert easy-VQA in shards of this size (configs/finetune/vqa_easyvqa_multitask.yaml "
                        "wants 0.25: each mixture epoch then reads other VQA rows); default: the converter's")
    p.add_argument("--no-default", action="store_true",
                   help="skip the default config's run (when the sweep's points_to_evaluate holds it already)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a sweep config override (train.* reaches the fine-tune config; repeatable)")
    args = p.parse_args(argv or [])

    from bench.learning_curve import ensure_corpus
    from bench.train import start_local_ray
    from pipelines.train import train
    from tune.runner import outcome_dict, run_sweep
    from tune.search import load_sweep_config, plan_sweep

    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    limit = args.limit if args.limit is not None else (100 if args.quick else None)
    corpus = ensure_corpus(out, limit, args.shard_mb)
    name = f"bench-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"name={name}", f"train.data.uri={corpus}", f"train.run.storage_path={out / 'ray-results'}",
                 f"train.tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}", "train.tracking.experiment=bench-tune",
                 *(QUICK if args.quick else ()), *args.overrides]
    plan = plan_sweep(load_sweep_config(args.config, overrides), source=str(args.config))
    started = start_local_ray(4)
    import ray

    try:
        t = time.monotonic()
        outcome = run_sweep(plan, output_dir=out / name)
        sweep_s = time.monotonic() - t
        default, default_s = None, 0.0
        if not args.no_default:
            t = time.monotonic()
            default_cfg = plan.trial_config({}, f"{name}-default", storage_path=plan.base.run.storage_path)
            default = train(default_cfg, output_dir=out / name / "default")
            default_s = time.monotonic() - t
    finally:
        if started:
            ray.shutdown()

    metric = plan.metric
    best = outcome.best
    default_value = default.metrics.get(metric, math.nan) if default is not None else math.nan
    saved = outcome.trial_time_full_s - outcome.trial_time_s
    cfg = plan.cfg
    print(f"\nsweep {name}: {len(outcome.trials)} trials, {cfg.max_concurrent_trials} at once, {plan.max_t} epochs of "
          f"{plan.base.max_steps_per_epoch} updates, {plan.base.validation.max_rows} validation questions, "
          f"{os.cpu_count()} cores\n")
    print(outcome.table)
    print(f"\nwall time of the sweep: {sweep_s / 60:.1f} min (the default config's run: {default_s / 60:.1f} min)")
    if best is not None:
        print(f"best accuracy ({metric}): {best.best:.4f} (trial {best.trial_id}, epoch {best.best_epoch}) against "
              f"{default_value:.4f} for the default config ({best.best - default_value:+.4f})")
    print(f"trial time: {outcome.trial_time_s / 60:.1f} min; every trial to the end: ~{outcome.trial_time_full_s / 60:.1f}"
          f" min; ASHA saved ~{saved / 60:.1f} min ({100 * saved / max(outcome.trial_time_full_s, 1e-9):.0f}%), "
          f"{sum(t.stopped_early for t in outcome.trials)} of {len(outcome.trials)} trials stopped early")
    print(f"best config: {outcome.best_config}\nplot: {Path(outcome.output_dir) / 'metric_vs_epoch.png'}")
    record = {**outcome_dict(outcome), "sweep_wall_s": round(sweep_s, 1), "default_wall_s": round(default_s, 1),
              "default_value": default_value, "asha_saved_s": round(saved, 1), "quick": args.quick,
              "cores": os.cpu_count(), "images_per_split": limit}
    (out / name / "bench_tune.json").write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
