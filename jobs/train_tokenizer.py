"""Train the image tokenizer (a VQGAN of OFA's kind) from scratch on Ray Train, tracked in MLflow.

    python -m jobs.train_tokenizer --config configs/tokenizer/vqgan_easyvqa_micro.yaml data.uri=s3://bucket/corpus
    ray job submit --working-dir . -- python -m jobs.train_tokenizer \
        --config configs/tokenizer/vqgan_easyvqa_micro.yaml data.uri=s3://bucket/corpus \
        run.storage_path=s3://bucket/runs tracking.tracking_uri=http://mlflow:5000

The tokenizer bundle goes to <run.storage_path>/<run.name>/tokenizer (load it with ofa_model.vqgan.load_tokenizer)
and to the MLflow run as the artifact `tokenizer`. Prints a JSON summary: the bundle's URI, the MLflow run, steps
and the held-out metrics (PSNR and codebook usage, at init and at the end).
"""

from __future__ import annotations

import dataclasses

from jobs._cli import Parser, config_parser, fail, init_ray, print_json, setup_logging

PROG = "python -m jobs.train_tokenizer"


def build_parser() -> Parser:
    return config_parser(PROG, __doc__)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    from ofa_model.config_files import load_config
    from ofa_model.errors import InputError
    from pipelines.job_env import job_env
    from pipelines.train.tokenizer import check_inputs, train_tokenizer
    from pipelines.train.tokenizer_config import TokenizerTrainConfig

    try:  # a bad config, corpus or missing setting stops the job here, before Ray starts
        cfg = load_config(TokenizerTrainConfig, args.config, args.overrides)
        env = job_env(cfg.tracking.tracking_uri, cfg.data.s3)
        check_inputs(cfg)
    except InputError as exc:
        fail(PROG, exc)
    init_ray(env)
    print_json(dataclasses.asdict(train_tokenizer(cfg)))


if __name__ == "__main__":
    main()
