"""Convert a public dataset layout into a canonical corpus (Parquet shards + manifest.json).

    python -m jobs.prepare_data <source> [source options] --output URI [--limit N] [--splits a,b] [--shard-mb 128]

Sources: easy-vqa, coco, vqav2, refcoco, snli-ve, imagefolder, glue, gigaword, fashion-mnist
(`python -m jobs.prepare_data <source> --help` lists each one's options). Options that take one path
per split are given as SPLIT=PATH and repeated, e.g. `--annotations train=a.json --annotations val=b.json`.
Prints a JSON summary on stdout; exits 2 when the output cannot be written, 1 on bad options or inputs.
"""

import argparse
import json
import logging
import re
import sys

from pipelines.converters import OutputError, prepare

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


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", required=True, help="corpus directory: local path, file:// or s3:// URI")
    common.add_argument("--limit", type=int, default=None, help="at most N source items per split (tests)")
    common.add_argument("--splits", default=None, help="comma-separated splits (default: all available)")
    common.add_argument("--shard-mb", type=float, default=128, help="close a shard at this many MiB of rows")
    common.add_argument("--log-every-s", type=float, default=10.0, help="seconds between progress lines")

    parser = argparse.ArgumentParser(prog="python -m jobs.prepare_data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help)

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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
