"""Hyperparameter sweep of one task's fine-tune on Ray Tune (ASHA; random or Optuna TPE search), in MLflow.

    python -m jobs.sweep --task vqa --config configs/tune/vqa.yaml [--num-samples 16] [key=value ...]
    ray job submit --working-dir . -- python -m jobs.sweep --task vqa --config configs/tune/vqa.yaml \
        storage_path=s3://bucket/tune train.data.uri=s3://bucket/corpora/vqa train.model.init=models:/ofa-base@official

Overrides reach the sweep config (`num_samples=4`, `asha.grace_period=2`, `name=vqa-sweep-2`,
`space={optim.lr: {loguniform: [1.0e-5, 1.0e-4]}}`: space keys are whole dotted names) and, under `train.`, the
fine-tune config it starts from (`train.data.uri=s3://...`, `train.epochs=3`). Rerunning with the same name
resumes the sweep. Prints the trials best first, then a JSON summary (best trial, the best config
written as a fine-tune YAML, the registered version and whether it became the champion).
"""

from __future__ import annotations

from jobs._cli import Parser, fail, init_ray, print_json, setup_logging

PROG = "python -m jobs.sweep"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n")[0], epilog="Overrides: num_samples=4 "
               "asha.grace_period=2 train.optim.ema_decay=0 train.data.uri=s3://... (train.* reaches the fine-tune "
               "config). Every key: tune/search.py.")
    p.add_argument("--config", required=True, help="sweep YAML (configs/tune/...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of sweep config keys")
    p.add_argument("--task", required=True, help="the task tuned; must be the base fine-tune config's task")
    p.add_argument("--num-samples", type=int, default=None, help="trials to run (default: the config's)")
    p.add_argument("--output", default=None, help="directory for the table, plot and best config "
                   "(default: a new temporary directory; all of it is logged to the sweep's MLflow run too)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    from ofa_model.errors import ConfigError
    from pipelines.job_env import job_env
    from tune.runner import SweepError, outcome_dict, run_sweep
    from tune.search import load_sweep_config, plan_sweep

    overrides = list(args.overrides)
    if args.num_samples is not None:
        overrides.append(f"num_samples={args.num_samples}")
    try:
        plan = plan_sweep(load_sweep_config(args.config, overrides), source=args.config)
        env = job_env(plan.base.tracking.tracking_uri, plan.base.data.s3, tracking_key="train.tracking.tracking_uri")
    except ConfigError as exc:
        fail(PROG, exc)
    if plan.base.task != args.task:
        fail(PROG, f"--task {args.task}: {args.config} tunes task {plan.base.task!r} (its base {plan.cfg.base})")
    init_ray(env)
    try:
        outcome = run_sweep(plan, output_dir=args.output)
    except SweepError as exc:
        fail(PROG, exc, status=1)
    print(f"\nsweep {outcome.name}: {plan.metric} ({plan.mode}), best first\n{outcome.table}\n", flush=True)
    print_json(outcome_dict(outcome))


if __name__ == "__main__":
    main()
