"""The whole pipeline on easy-VQA in one command: services, data, pretraining, fine-tunes, a sweep, the registry,
Ray Serve and a report (see `jobs.apps.demo`).

    python -m jobs.demo [--quick] [--keep] [--workdir demo-work]      # `make demo ARGS="--quick --keep"`
    python -m jobs.demo --stop [--workdir demo-work]                  # stop what a --keep run left up
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs._cli import Parser, fail

PROG = "python -m jobs.demo"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the same stages at smoke size (under 3 minutes)")
    p.add_argument("--keep", action="store_true", help="leave the services up afterwards (MLflow UI, Serve API)")
    p.add_argument("--stop", action="store_true", help="stop the services a --keep run left up, and exit")
    p.add_argument("--workdir", default="demo-work", help="work directory (cleaned at the start of a run)")
    p.add_argument("--images", type=int, help="easy-VQA images per split (default: 1000, quick: 40)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.images is not None and args.images < 8:
        fail(PROG, "--images must be >= 8")
    from jobs.apps.demo import DemoOptions, run_demo, stop_demo

    if args.stop:
        stop_demo(Path(args.workdir))
        return
    sys.exit(run_demo(DemoOptions(workdir=Path(args.workdir), quick=args.quick, keep=args.keep,
                                  images=args.images)))


if __name__ == "__main__":
    main()
