"""Dataset doctor: push a corpus, OFA TSV files or WebDataset tars through the training data pipeline and
print a JSON summary.

    python -m jobs.inspect_data --input URI [--layout L] [--task T]... [--split S]... [--limit N]
                                [--config data.yaml] [--patch-image-size 480]

--input: a canonical corpus (a directory with manifest.json), an OFA TSV file or a directory of them, or
a WebDataset tar or a directory of them; path, file:// or s3://. --layout says which (`corpus`,
`webdataset` or an OFA TSV layout); without it a manifest.json means a corpus, .tar/.tar.gz/.tgz
WebDataset, and .tsv files take the layout of the one --task (`--task vqa` -> layout vqa). Raw input is
converted first (its first --limit records, one Ray task per file, into a scratch corpus, deleted
afterwards) so that it is checked by the same pipeline with the same reasons; the reader's bad lines are
added to the counts and the first --list-bad are listed in full under "conversion".

Prints rows ok, rows bad by reason with example ids, per-task counts and rows/s (see
`pipelines.data.dataset.inspect`). Uses the Ray cluster of RAY_ADDRESS if set, else starts a local one.
Exits 0 whatever the data holds; 2 on a command line that does not parse, a bad option or configuration,
or an input that cannot be read.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from jobs._cli import Parser, fail, init_ray, print_json, setup_logging

if TYPE_CHECKING:
    from pipelines.data.data_config import DataConfig

PROG = "python -m jobs.inspect_data"


def build_parser() -> Parser:
    from pipelines.data.raw_inspect import INPUT_LAYOUTS

    p = Parser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="corpus directory, OFA TSV file/directory or WebDataset tar/"
                   "directory: path, file:// or s3://")
    p.add_argument("--layout", choices=INPUT_LAYOUTS, help="what --input holds (default: guessed, see above)")
    p.add_argument("--task", action="append", help="only this task (repeatable; default: all); the task of "
                   "WebDataset samples (default caption)")
    p.add_argument("--split", action="append", help="only this split (repeatable; default: the config's, train); "
                   "raw input: the split its rows get (one)")
    p.add_argument("--limit", type=int, help="stop after about this many rows (raw input: records read)")
    p.add_argument("--config", help="YAML DataConfig (its uri is replaced by --input)")
    p.add_argument("--patch-image-size", type=int, help="override preprocess.patch_image_size")
    p.add_argument("--key-map", action="append", metavar="ROLE=CANDIDATE[,...]",
                   help="WebDataset: where a role comes from, e.g. text=json:expr (repeatable)")
    p.add_argument("--scratch", help="raw input: where the scratch corpus goes (default: a local temporary "
                   "directory; on a cluster of several machines give an s3:// prefix)")
    p.add_argument("--list-bad", type=int, default=100, help="raw input: bad lines listed in full (default 100)")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.list_bad < 0:
        fail(PROG, f"--list-bad must be >= 0, got {args.list_bad}")
    return args


def _data_config(args: argparse.Namespace) -> DataConfig:
    """The DataConfig of --config with the flags over it (its uri is --input); ConfigError if bad."""
    from ofa_model.config_files import load_config
    from pipelines.data.data_config import DataConfig

    flags: dict = {"uri": args.input}
    if args.task:
        flags["tasks"] = args.task
    if args.split:
        flags["splits"] = args.split
    if args.patch_image_size is not None:
        flags["preprocess"] = {"patch_image_size": args.patch_image_size}
    return load_config(DataConfig, args.config, data=flags)  # the one loader every job uses


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    setup_logging()
    from ofa_model.vocab import Vocabulary
    from pipelines.data.converters import OutputError
    from pipelines.data.dataset import inspect
    from pipelines.data.raw_convert import key_map_option
    from pipelines.data.raw_inspect import input_source, inspect_raw
    from pipelines.job_env import s3_env

    try:
        cfg = _data_config(args)
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError
        fail(PROG, f"bad configuration: {exc}")
    try:
        split = cfg.splits[0]
        source = input_source(args.input, layout=args.layout, tasks=cfg.tasks, split=split, s3=cfg.s3,
                              key_map=key_map_option(args.key_map))
        if source is not None and len(cfg.splits) > 1:
            raise ValueError(f"raw input gets one split, got --split {' --split '.join(cfg.splits)}")
    except (OSError, ValueError) as exc:
        fail(PROG, exc)
    init_ray(s3_env(cfg.s3))
    try:
        if source is None:
            summary = inspect(cfg, Vocabulary.gpt2(), limit=args.limit)
        else:
            summary = inspect_raw(source, args.input, cfg, Vocabulary.gpt2(), limit=args.limit,
                                  scratch=args.scratch, list_bad=args.list_bad)
    except (OSError, ValueError, OutputError) as exc:  # FileNotFoundError, S3 and permission errors included
        fail(PROG, exc)
    print_json(summary)


if __name__ == "__main__":
    main()
