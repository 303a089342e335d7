"""Run the benchmarks: `python -m bench` (all) or `python -m bench model data`.

Each runs with its default arguments; run one as `python -m bench.<name> --help` for its options. The learning
curve (30 minutes), the fidelity report and the realistic-data run are not among the defaults:
`python -m bench.learning_curve`, `python -m bench.inference fidelity`, `python -m bench.data --realistic`.
"""

import importlib
import sys

BENCHES = {"model": [], "data": [], "convert": [], "train": [], "inference": ["speed"], "gpu": []}


def main(argv: list[str]) -> None:
    for name in argv or BENCHES:
        if name not in BENCHES:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {sorted(BENCHES)}")
        print(f"== bench.{name}", flush=True)
        sys.argv = [f"bench.{name}", *BENCHES[name]]  # each bench parses its own (default) arguments
        importlib.import_module(f"bench.{name}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
