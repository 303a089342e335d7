"""Dataset doctor: push a corpus through the training data pipeline and print a JSON summary.

    python -m jobs.inspect_data --input URI [--task T]... [--split S]... [--limit N] [--config data.yaml]
                                [--patch-image-size 480]

Prints rows ok, rows bad by reason with example ids, per-task counts and rows/s (see
`pipelines.dataset.inspect`). Uses the Ray cluster of RAY_ADDRESS if set, else starts a local one.
Exits 0 whatever the data holds; 1 on bad options or an unreadable corpus.
"""

import argparse
import json
import logging
import sys

import yaml


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.inspect_data", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="corpus directory (holds manifest.json): path, file:// or s3://")
    p.add_argument("--task", action="append", help="only this task (repeatable; default: all)")
    p.add_argument("--split", action="append", help="only this split (repeatable; default: the config's, train)")
    p.add_argument("--limit", type=int, help="stop after about this many rows")
    p.add_argument("--config", help="YAML DataConfig (its uri is replaced by --input)")
    p.add_argument("--patch-image-size", type=int, help="override preprocess.patch_image_size")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    import ray

    from ofa_model.vocab import Vocabulary
    from pipelines.dataset import DataConfig, inspect

    try:
        raw = {}
        if args.config:
            with open(args.config) as f:
                raw = yaml.safe_load(f) or {}
        raw["uri"] = args.input
        if args.task:
            raw["tasks"] = args.task
        if args.split:
            raw["splits"] = args.split
        if args.patch_image_size is not None:
            raw["preprocess"] = {**(raw.get("preprocess") or {}), "patch_image_size": args.patch_image_size}
        cfg = DataConfig.from_dict(raw)
    except (OSError, ValueError, TypeError, yaml.YAMLError) as exc:
        raise SystemExit(f"inspect_data: bad configuration: {exc}") from exc
    if not ray.is_initialized():
        ray.init()
    try:
        summary = inspect(cfg, Vocabulary.gpt2(), limit=args.limit)
    except (OSError, ValueError) as exc:  # FileNotFoundError, S3 and permission errors included
        raise SystemExit(f"inspect_data: {exc}") from exc
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
