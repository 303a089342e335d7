"""Pretrain on OFA's multi-task mixture on Ray Train, tracked in MLflow.

    python -m jobs.pretrain --config configs/pretrain/ofa-base.yaml [key=value ...]

The same trainer as jobs.finetune; the config's `mixture` (task -> weight) says which tasks are interleaved
and how often, `task` which one is validated. Rerunning with the same run.name continues the run.
"""

from __future__ import annotations

from jobs import finetune
from jobs._cli import Parser, config_parser

PROG = "python -m jobs.pretrain"


def build_parser() -> Parser:
    return config_parser(PROG, __doc__)


def main(argv: list[str] | None = None) -> None:
    finetune.main(argv, prog=PROG, doc=__doc__, mixture=True)


if __name__ == "__main__":
    main()
