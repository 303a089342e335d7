"""Convert a public dataset layout, OFA TSV files or WebDataset tars into a canonical corpus (Parquet shards
+ manifest.json).

    python -m jobs.prepare_data <source> [source options] --output URI [--limit N] [--splits a,b] [--shard-mb 128]
    python -m jobs.prepare_data ofa-tsv --layout vqa --input URI --split train --output URI
    python -m jobs.prepare_data webdataset --input URI --split train --output URI [--task caption]
    python -m jobs.prepare_data image-codes --tokenizer BUNDLE --input CORPUS --output URI [--task both]

Sources: easy-vqa, coco, vqav2, refcoco, snli-ve, imagefolder, glue, gigaword, fashion-mnist. Their options
are the keyword options of their converters (`pipelines.data.converters.converter_options`), one flag each
(`--image-root` for image_root; `python -m jobs.prepare_data <source> --help` lists them with their types and
defaults). Options that take one path per split are given as SPLIT=PATH and repeated, e.g.
`--annotations train=a.json --annotations val=b.json`, and may be spelt in the singular (`--file` for
files). These run in this process.

ofa-tsv and webdataset read a file or every .tsv / .tar file under a directory or prefix (local, file://
or s3://) and run as a Ray job, one task per file or per --range-mb of a large TSV file
(`pipelines.data.raw_convert`), on the Ray cluster of RAY_ADDRESS if set, else on a local one. Rerunning a
failed or killed conversion resumes it (its finished parts are kept); --append adds files to a corpus. S3
credentials come from the Ray nodes' environment; --s3-endpoint / --s3-region reach every task.

image-codes runs an image tokenizer bundle (a directory, s3:// or models:/) over the images of a canonical corpus
as a Ray Data job (`pipelines.data.image_codes`): text_to_image rows (a caption and the codes of its whole
image at --code-image-size) and image_infilling rows (every distinct image and the codes of its centre), the
rows those tasks train on; --code-image-size is the code_image_size of the model that trains on them.

Prints a JSON summary on stdout (bad rows by reason included); exits 2 when the command line, an option
value, the input or the output is bad.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any

from jobs._cli import Parser, fail, init_ray, print_json, setup_logging
from pipelines.data.converters import SOURCES, ConverterOption, OutputError, converter_options, prepare
from pipelines.data.image_codes import CODE_TASKS
from pipelines.data.raw_convert import RANGE_MB
from pipelines.data.readers.ofa_tsv import LAYOUTS
from pipelines.data.readers.webdataset import WDS_TASKS
from pipelines.storage import S3Options

PROG = "python -m jobs.prepare_data"
RAW_SOURCES = ("ofa-tsv", "webdataset")


def _flags(option: ConverterOption) -> list[str]:
    """--image-root for image_root; a repeated option also in the singular (--file for files)."""
    flag = "--" + option.name.replace("_", "-")
    return [flag, flag[:-1]] if option.repeated and flag.endswith("s") else [flag]


def _typed(option: ConverterOption) -> Callable[[str], Any]:
    """The parser's `type=` for `option`: its checked value, or an error naming it (exit status 2)."""

    def parse(text: str) -> Any:
        try:
            return option.parse([text])
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = option.kind
    return parse


def _add_option(p: argparse.ArgumentParser, option: ConverterOption) -> None:
    """One flag from a converter's keyword: its type checked by the parser, absent unless given (the
    converter's default applies)."""
    default = "required" if option.required else f"default {option.default!r}"
    kw: dict = {"dest": option.name, "default": argparse.SUPPRESS, "help": f"{option.annotation}; {default}"}
    if option.kind == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    elif option.repeated:
        single = "PATH|" if option.kind == "path_or_per_split" else ""
        kw.update(action="append", metavar=f"{single}SPLIT=PATH", required=option.required)
    else:
        kw.update(required=option.required, metavar=option.name.upper())
        if option.kind == "choice":
            kw["choices"] = option.choices
        else:
            kw["type"] = _typed(option)
    p.add_argument(*_flags(option), **kw)


def build_parser() -> argparse.ArgumentParser:
    output = Parser(add_help=False)
    output.add_argument("--output", required=True, help="corpus directory: local path, file:// or s3:// URI")
    output.add_argument("--shard-mb", type=float, default=128, help="close a shard at this many MiB of rows")
    output.add_argument("--log-every-s", type=float, default=10.0, help="seconds between progress lines")
    common = Parser(add_help=False, parents=[output])
    common.add_argument("--limit", type=int, default=None, help="at most N source items per split (tests)")
    common.add_argument("--splits", default=None, help="comma-separated splits (default: all available)")
    raw = Parser(add_help=False, parents=[output])
    raw.add_argument("--input", required=True, help="a file, or a directory/prefix of files: path, file:// or s3://")
    raw.add_argument("--split", required=True, help="the split of every row, e.g. train")
    raw.add_argument("--dataset", default=None, help="the rows' dataset name (default: the reader's)")
    raw.add_argument("--limit", type=int, default=None, help="at most N input records in all, the first in file order")
    raw.add_argument("--concurrency", type=int, default=None, help="parts converted at once (default: 2x CPUs)")
    raw.add_argument("--range-mb", type=float, default=RANGE_MB,
                     help=f"a TSV file over this many MiB converts in ranges of this size, in parallel "
                          f"(default {RANGE_MB:g})")
    raw.add_argument("--append", action="store_true",
                     help="add the input's rows to the corpus at --output (its ids must stay unique)")
    raw.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per conversion task")
    raw.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS environment)")
    raw.add_argument("--s3-region", default=None, help="S3 region (default: AWS environment)")

    parser = Parser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    p = sub.add_parser("ofa-tsv", parents=[raw], help="OFA TSV files (one example per line, base64 images)")
    p.add_argument("--layout", required=True, choices=LAYOUTS, help="OFA's column layout of the files")
    p = sub.add_parser("webdataset", parents=[raw], help="WebDataset tars (.tar, .tar.gz, .tgz)")
    p.add_argument("--task", default="caption", choices=WDS_TASKS, help="the task of every sample (default caption)")
    p.add_argument("--key-map", action="append", default=None, metavar="ROLE=CANDIDATE[,...]",
                   help="where a role comes from, e.g. text=json:expr (repeatable; see pipelines.data.readers.webdataset)")
    p = sub.add_parser("image-codes", parents=[output], help="image codes of a corpus's images (text_to_image, "
                       "image_infilling rows)")
    p.add_argument("--tokenizer", required=True, help="image tokenizer bundle: directory, s3:// prefix or models:/")
    p.add_argument("--input", required=True, help="canonical corpus: path, file:// or s3://")
    p.add_argument("--task", default="both", choices=CODE_TASKS, help="the rows to write (default both)")
    p.add_argument("--code-image-size", type=int, default=None,
                   help="pixels a side encoded: the training model's code_image_size (default: the tokenizer's)")
    p.add_argument("--split", action="append", default=None, dest="splits",
                   help="a split of the input to read (repeatable; default all)")
    p.add_argument("--workers", type=int, default=1, help="encoding actors (each loads the tokenizer once)")
    p.add_argument("--batch-size", type=int, default=16, help="images per encoding call of an actor")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (> 0: encode on CUDA)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS environment)")
    p.add_argument("--s3-region", default=None, help="S3 region (default: AWS environment)")
    for source, converter in SOURCES.items():
        about = (inspect.getmodule(converter).__doc__ or source).split("\n")[0]
        p = sub.add_parser(source, parents=[common], help=about, description=about)
        for option in converter_options(source).values():
            _add_option(p, option)
    return parser


def _prepare_raw(args: argparse.Namespace) -> dict:
    from pipelines.data.raw_convert import RawSource, convert_raw, key_map_option
    from pipelines.job_env import s3_env

    s3 = S3Options(args.s3_endpoint, args.s3_region) if args.s3_endpoint or args.s3_region else None
    if args.source == "ofa-tsv":
        source = RawSource("ofa-tsv", split=args.split, layout=args.layout, dataset=args.dataset)
    else:
        source = RawSource("webdataset", split=args.split, task=args.task, dataset=args.dataset,
                           key_map=key_map_option(args.key_map))
    init_ray(s3_env(s3))
    return convert_raw(source, args.input, args.output, s3=s3, limit=args.limit, shard_mb=args.shard_mb,
                       concurrency=args.concurrency, num_cpus=args.num_cpus, log_every_s=args.log_every_s,
                       range_mb=args.range_mb, append=args.append)


def _image_codes(args: argparse.Namespace) -> dict:
    from pipelines.data.image_codes import encode_corpus
    from pipelines.job_env import s3_env

    s3 = S3Options(args.s3_endpoint, args.s3_region) if args.s3_endpoint or args.s3_region else None
    init_ray(s3_env(s3))
    return encode_corpus(args.input, args.output, args.tokenizer, task=args.task, code_image_size=args.code_image_size,
                         splits=args.splits, workers=args.workers, batch_size=args.batch_size, num_cpus=args.num_cpus,
                         num_gpus=args.gpus_per_worker, s3=s3, shard_mb=args.shard_mb, log_every_s=args.log_every_s)


def _prepare(args: argparse.Namespace) -> dict:
    """A converter's run: its options parsed from the flags that were given (the rest keep its defaults)."""
    given = vars(args)
    options = {name: option.parse(given[name]) if option.repeated else given[name]
               for name, option in converter_options(args.source).items() if name in given}
    splits = [s for s in args.splits.split(",") if s] if args.splits else None
    return prepare(args.source, options, args.output, splits=splits, limit=args.limit, shard_mb=args.shard_mb,
                   log_every_s=args.log_every_s)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.source == "image-codes":
            summary = _image_codes(args)
        else:
            summary = _prepare_raw(args) if args.source in RAW_SOURCES else _prepare(args)
    except OutputError as exc:
        fail(PROG, exc)
    except (ValueError, OSError) as exc:  # FileNotFoundError, S3 and permission errors on the input included
        fail(PROG, f"{args.source}: {exc}")
    print_json(summary)


if __name__ == "__main__":
    main()
