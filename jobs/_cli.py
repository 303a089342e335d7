"""What every `python -m jobs.<name>` shares: logging, a YAML config with key=value overrides, Ray start-up,
and one way to fail (an `error: ...` line on stderr, exit status 2 for bad input)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any


class Parser(argparse.ArgumentParser):
    """Bad options are one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def fail(prog: str, message: str, status: int = 2) -> None:
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(status)


def config_parser(prog: str, doc: str) -> Parser:
    p = Parser(prog=prog, description=doc.split("\n")[0], epilog="Overrides reach nested keys: optim.lr=3e-5 "
               "data.batch_size=16 scaling.num_workers=2. Every key: README's configuration reference.")
    p.add_argument("--config", required=True, help="YAML file (configs/...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of config keys")
    return p


def init_ray(env: Mapping[str, str] | None = None) -> None:
    """Join the cluster of RAY_ADDRESS (as under `ray job submit`), else start a local one. `env`: the job's
    settings (`pipelines.job_env.job_env`), set in this driver and in the runtime_env that every task and actor
    of the job inherits, on every node."""
    import ray

    if ray.is_initialized():
        return
    if not env:
        ray.init()
        return
    from pipelines.job_env import runtime_env

    os.environ.update(env)  # this driver's own MLflow and S3 clients see what its workers see
    ray.init(runtime_env=runtime_env(env))


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))
