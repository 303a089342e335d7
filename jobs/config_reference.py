"""Regenerate README.md's configuration reference from the config classes (`jobs.apps.config_reference`).

    python -m jobs.config_reference            # rewrite the block between the markers in README.md
    python -m jobs.config_reference --check    # exit 1 when README.md is not current (tests/ run this)
"""

from __future__ import annotations

import sys

from jobs._cli import Parser
from jobs.apps.config_reference import current, write

PROG = "python -m jobs.config_reference"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when README.md's reference is not current")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.check:
        block, fresh = current()
        if block != fresh:
            print("README.md's configuration reference is stale: run python -m jobs.config_reference",
                  file=sys.stderr)
            sys.exit(1)
        return
    print("README.md updated" if write() else "README.md already current")


if __name__ == "__main__":
    main()
