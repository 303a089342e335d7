"""Convert a public dataset layout, OFA TSV files or WebDataset tars into a canonical corpus (Parquet shards
+ manifest.json).

    python -m jobs.prepare_data <source> [source options] --output URI [--limit N] [--splits a,b] [--shard-mb 128]
    python -m jobs.prepare_data ofa-tsv --layout vqa --input URI --split train --output URI
    python -m jobs.prepare_data webdataset --input URI --split train --output URI [--task caption]

Sources: easy-vqa, coco, vqav2, refcoco, snli-ve, imagefolder, glue, gigaword, fashion-mnist
(`python -m jobs.prepare_data <source> --help` lists each one's options). Options that take one path
per split are given as SPLIT=PATH and repeated, e.g. `--annotations train=a.json --annotations val=b.json`.
These run in this process.

ofa-tsv and webdataset read a file or every .tsv / .tar file under a directory or prefix (local, file://
or s3://) and run as a Ray job, one task per file (`pipelines.data.raw_convert`), on the Ray cluster of
RAY_ADDRESS if set, else on a local one. S3 credentials come from the AWS environment of the Ray
workers; --s3-endpoint / --s3-region override the rest.

Prints a JSON summary on stdout (bad rows by reason included); exits 2 when the output cannot be written
or the command line does not parse, 1 on bad option values or inputs.
"""

import argparse
import json
import logging
import re
import sys

from pipelines.data.converters import OutputError, prepare
from pipelines.data.readers import LAYOUTS, WDS_TASKS
from pipelines.storage import S3Options

RAW_SOURCES = ("ofa-tsv", "webdataset")

_SPLIT_VALUE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)=(?P<value>.+)$")


def _split_map(values: list[str] | None, flag: str) -> dict[str, str] | None:
    if values is None:
        return None
    out = {}
    for v in values:
        m = _SPLIT_VALUE.match(v)
        if not m:
            raise SystemExit(f"prepare_data: {flag} takes SPLIT=PATH, got {v!r}")
        out[m["split"]] = m["value"]
    return out


def _root(values: list[str] | None, flag: str) -> str | dict[str, str] | None:
    """One path for every split, or SPLIT=PATH entries."""
    if values is None:
        return None
    if len(values) == 1 and not _SPLIT_VALUE.match(values[0]):
        return values[0]
    return _split_map(values, flag)


class _Parser(argparse.ArgumentParser):
    """Bad options are one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    output = _Parser(add_help=False)
    output.add_argument("--output", required=True, help="corpus directory: local path, file:// or s3:// URI")
    output.add_argument("--shard-mb", type=float, default=128, help="close a shard at this many MiB of rows")
    output.add_argument("--log-every-s", type=float, default=10.0, help="seconds between progress lines")
    common = _Parser(add_help=False, parents=[output])
    common.add_argument("--limit", type=int, default=None, help="at most N source items per split (tests)")
    common.add_argument("--splits", default=None, help="comma-separated splits (default: all available)")
    raw = _Parser(add_help=False, parents=[output])
    raw.add_argument("--input", required=True, help="a file, or a directory/prefix of files: path, file:// or s3://")
    raw.add_argument("--split", required=True, help="the split of every row, e.g. train")
    raw.add_argument("--dataset", default=None, help="the rows' dataset name (default: the reader's)")
    raw.add_argument("--limit", type=int, default=None, help="at most N input records in all, the first in file order")
    raw.add_argument("--concurrency", type=int, default=None, help="files converted at once (default: 2x CPUs)")
    raw.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per conversion task")
    raw.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS environment)")
    raw.add_argument("--s3-region", default=None, help="S3 region (default: AWS environment)")

    parser = _Parser(prog="python -m jobs.prepare_data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help)

    p = sub.add_parser("ofa-tsv", parents=[raw], help="OFA TSV files (one example per line, base64 images)")
    p.add_argument("--layout", required=True, choices=LAYOUTS, help="OFA's column layout of the files")

    p = sub.add_parser("webdataset", parents=[raw], help="WebDataset tars (.tar, .tar.gz, .tgz)")
    p.add_argument("--task", default="caption", choices=WDS_TASKS, help="the task of every sample (default caption)")
    p.add_argument("--key-map", action="append", default=None, metavar="ROLE=CANDIDATE[,...]",
                   help="where a role comes from, e.g. text=json:expr (repeatable; see pipelines.data.readers)")

    p = add("easy-vqa", "the installed easy-vqa package")
    p.add_argument("--seed", type=int, default=0, help="seed of the ITM negatives")

    p = add("coco", "COCO captions JSON + images")
    p.add_argument("--annotations", action="append", required=True, metavar="SPLIT=PATH")
    p.add_argument("--image-root", action="append", required=True, metavar="DIR|SPLIT=DIR")
    p.add_argument("--dataset", default="coco")

    p = add("vqav2", "VQA v2 questions/annotations JSON + COCO images")
    p.add_argument("--questions", action="append", required=True, metavar="SPLIT=PATH")
    p.add_argument("--annotations", action="append", default=None, metavar="SPLIT=PATH")
    p.add_argument("--image-root", action="append", required=True, metavar="DIR|SPLIT=DIR")
    p.add_argument("--image-pattern", default=None, help="e.g. COCO_{split}2014_{image_id:012d}.jpg")

    p = add("refcoco", "RefCOCO/+/g refs (JSON or the original pickle) + instances.json + COCO images")
    p.add_argument("--refs", required=True)
    p.add_argument("--instances", required=True)
    p.add_argument("--image-root", required=True)
    p.add_argument("--dataset", default="refcoco", help="refcoco, refcoco+ or refcocog")

    p = add("snli-ve", "SNLI-VE jsonl + Flickr30k images")
    p.add_argument("--file", action="append", required=True, metavar="SPLIT=PATH")
    p.add_argument("--image-root", action="append", required=True, metavar="DIR|SPLIT=DIR")

    p = add("imagefolder", "<root>/<class>/<image> folders")
    p.add_argument("--root", action="append", required=True, metavar="SPLIT=DIR")
    p.add_argument("--class-names", default=None, help="JSON map folder name -> class name")
    p.add_argument("--dataset", default="imagefolder")

    p = add("glue", "GLUE TSV files")
    p.add_argument("--task", required=True, choices=["cola", "sst2", "mnli", "rte", "qnli", "mrpc", "qqp"])
    p.add_argument("--file", action="append", default=None, metavar="SPLIT=PATH")
    p.add_argument("--data-dir", default=None, help="the task's GLUE directory (train.tsv, dev.tsv, ...)")

    p = add("gigaword", "<split>.src / <split>.tgt line-parallel files")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--dataset", default="gigaword")

    p = add("fashion-mnist", "Fashion-MNIST idx files")
    p.add_argument("--data-dir", default=None, help="default /usr/share/datasets/fashion-mnist")
    p.add_argument("--captions", action="store_true", help="also write 'a photo of a <class>' caption rows")
    return parser


def _options(args: argparse.Namespace) -> dict:
    """The converter options of the parsed arguments (None values left out: converter defaults)."""
    s = args.source
    if s == "easy-vqa":
        opts = {"seed": args.seed}
    elif s == "coco":
        opts = {"annotations": _split_map(args.annotations, "--annotations"),
                "image_root": _root(args.image_root, "--image-root"), "dataset": args.dataset}
    elif s == "vqav2":
        opts = {"questions": _split_map(args.questions, "--questions"),
                "annotations": _split_map(args.annotations, "--annotations"),
                "image_root": _root(args.image_root, "--image-root"), "image_pattern": args.image_pattern}
    elif s == "refcoco":
        opts = {"refs": args.refs, "instances": args.instances, "image_root": args.image_root, "dataset": args.dataset}
    elif s == "snli-ve":
        opts = {"files": _split_map(args.file, "--file"), "image_root": _root(args.image_root, "--image-root")}
    elif s == "imagefolder":
        opts = {"roots": _split_map(args.root, "--root"), "class_names": args.class_names, "dataset": args.dataset}
    elif s == "glue":
        opts = {"task": args.task, "files": _split_map(args.file, "--file"), "data_dir": args.data_dir}
    elif s == "gigaword":
        opts = {"data_dir": args.data_dir, "dataset": args.dataset}
    else:  # fashion-mnist
        opts = {"data_dir": args.data_dir, "captions": args.captions}
    return {k: v for k, v in opts.items() if v is not None}


def _prepare_raw(args: argparse.Namespace) -> dict:
    import ray

    from pipelines.data.raw_convert import RawSource, convert_raw, key_map_option

    s3 = S3Options(args.s3_endpoint, args.s3_region) if args.s3_endpoint or args.s3_region else None
    if args.source == "ofa-tsv":
        source = RawSource("ofa-tsv", split=args.split, layout=args.layout, dataset=args.dataset)
    else:
        source = RawSource("webdataset", split=args.split, task=args.task, dataset=args.dataset,
                           key_map=key_map_option(args.key_map))
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS if set, else a local cluster
    return convert_raw(source, args.input, args.output, s3=s3, limit=args.limit, shard_mb=args.shard_mb,
                       concurrency=args.concurrency, num_cpus=args.num_cpus, log_every_s=args.log_every_s)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.source in RAW_SOURCES:
        try:
            summary = _prepare_raw(args)
        except OutputError as e:
            print(f"prepare_data: {e}", file=sys.stderr)
            return 2
        except (ValueError, OSError) as e:  # FileNotFoundError, S3 and permission errors on the input included
            print(f"prepare_data: {args.source}: {e}", file=sys.stderr)
            return 1
        print(json.dumps(summary, indent=2))
        return 0
    splits = [s for s in args.splits.split(",") if s] if args.splits else None
    try:
        summary = prepare(args.source, _options(args), args.output, splits=splits, limit=args.limit,
                          shard_mb=args.shard_mb, log_every_s=args.log_every_s)
    except OutputError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"prepare_data: {args.source}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
