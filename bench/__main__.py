"""Run the benchmarks: `python -m bench` (all) or `python -m bench model data`.

The learning curve (30 minutes) is not among them: `python -m bench.learning_curve [--minutes 30]`.
"""

import importlib
import sys

BENCHES = ("model", "data", "train", "gpu")


def main(argv: list[str]) -> None:
    for name in argv or BENCHES:
        if name not in BENCHES:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {BENCHES}")
        print(f"== bench.{name}", flush=True)
        importlib.import_module(f"bench.{name}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
