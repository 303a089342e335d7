"""Fine-tune (or train from scratch) one task on Ray Train, tracked in MLflow.

    python -m jobs.finetune --config configs/finetune/vqa.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.finetune --config configs/finetune/vqa.yaml run.name=vqa-1 \
        data.uri=s3://bucket/corpora/vqa model.init=models:/ofa-base@official run.storage_path=s3://bucket/runs

A recipe's `<required>` values (corpus, checkpoint, storage) must be given as overrides; without them the job
stops at once, naming each.

Rerunning with the same run.name continues the run from its latest checkpoint. Prints a JSON summary (run,
metrics, best checkpoint, local bundle, registered version and whether it became the champion).
"""

from __future__ import annotations

import dataclasses

from jobs._cli import Parser, config_parser, fail, init_ray, print_json, setup_logging

PROG = "python -m jobs.finetune"


def build_parser() -> Parser:
    return config_parser(PROG, __doc__)


def main(argv: list[str] | None = None, *, prog: str = PROG, doc: str = __doc__, mixture: bool = False) -> None:
    args = config_parser(prog, doc).parse_args(argv)
    setup_logging()
    from ofa_model.config_files import load_config
    from ofa_model.errors import ConfigError, InputError
    from pipelines.job_env import job_env
    from pipelines.train import CheckpointStorageError, train
    from pipelines.train.setup import with_answer_sets
    from pipelines.train.train_config import TrainConfig

    try:  # a bad config, answer file or missing setting stops the job here, before Ray starts
        cfg = with_answer_sets(load_config(TrainConfig, args.config, args.overrides))
        env = job_env(cfg.tracking.tracking_uri, cfg.data.s3)
    except InputError as exc:
        fail(prog, exc)
    if mixture and not cfg.mixture:
        fail(prog, f"{args.config}: pretraining needs a mixture (task -> weight); use jobs.finetune for one task")
    init_ray(env)
    try:  # what the driver refuses before any worker starts (e.g. a code corpus of another image tokenizer)
        outcome = train(cfg)
    except ConfigError as exc:
        fail(prog, exc)
    except CheckpointStorageError as exc:  # the store failed: the message names the run, what and where
        fail(prog, exc, status=1)
    print_json(dataclasses.asdict(outcome))


if __name__ == "__main__":
    main()
