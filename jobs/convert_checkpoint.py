"""Convert an official OFA checkpoint into an ofa-ray bundle, with the preprocessing it was trained with.

    python -m jobs.convert_checkpoint --input ofa_tiny.pt --arch ofa-tiny --dict dict.txt \\
        --patch-image-size 480 --max-src-length 80 --max-tgt-length 20 --output DIR [--ema] [--overwrite] \\
        [--answers vqa=trainval_ans2label.pkl] [--register NAME [--alias official] [--tracking-uri URI]]

--register logs the bundle as the artifacts of an MLflow run (experiment ofa-checkpoints) and registers it as a
version of NAME with the alias `official` (`pipelines.tracking.checkpoints`); jobs then name
models:/NAME@official. The same checkpoint converted the same way again only moves the alias to the version
already registered.

Every failure (a bad option, a file that is missing, corrupt, unsafe or does not fit the architecture, an output
that cannot be written, a full disk) is one `error: ...` line on stderr and exit status 2; a failed write leaves the
bundle already at the output as it was.
"""

from __future__ import annotations

import argparse
import sys

from jobs._cli import Parser, fail, print_json, setup_logging
from ofa_model.answer_sets import read_answer_file
from ofa_model.architecture import ARCHITECTURES
from ofa_model.checkpoint import convert_checkpoint
from ofa_model.errors import InputError
from ofa_model.preprocess import PreprocessConfig
from ofa_model.weights import CheckpointMismatchError

PROG = "python -m jobs.convert_checkpoint"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

EPILOG = """\
OFA's published preprocessing (its run scripts), to pass with the checkpoint it belongs to:

  checkpoint / task                       --patch-image-size  --max-src-length  --max-tgt-length
  pretrained ofa-* (pretraining)          384                 80                30
  caption (COCO fine-tune)                480                 80                20
  VQA (VQAv2 fine-tune)                   480                 80                30
  SNLI-VE                                 480                 80                20
  RefCOCO / RefCOCO+ / RefCOCOg           512                 80                20
  ImageNet classification                 480                 128               30   + --imagenet-mean-std
  Gigaword summarisation (text only)      any, e.g. 480       512               64
  GLUE (text only)                        any, e.g. 480       512               30
  text-to-image (code grid read from the checkpoint)
                                          any, e.g. 480       64                1024
  zero-shot evaluation of a pretrained model: VQA and RefCOCO at 480, SNLI-VE at 384.

--max-image-size is 512 in every released setting (box coordinates are normalised by it). The patch grid is
ceil(size / 16) on a side and must fit the model's image_bucket_size (42, i.e. at most 672 px); the source
(max-src-length + <s> and </s>) must fit max_source_positions (1024).
"""


def one_line(e: Exception) -> str:
    if isinstance(e, CheckpointMismatchError):
        parts = [f"{title}: {', '.join(keys)}" for title, keys in e.problems()]
        return f"checkpoint {e.source} does not match the architecture: " + "; ".join(parts)
    return " ".join(str(e).split())


def _answers(items: list[str]) -> dict[str, tuple[str, ...]]:
    """--answers TASK=FILE options as task -> answers (the files read and checked)."""
    out = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            fail(PROG, f"--answers {item!r}: expected TASK=FILE, e.g. vqa=trainval_ans2label.pkl")
        out[task] = read_answer_file(path)
    return out


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n")[0], epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="fairseq .pt, HF-port pytorch_model.bin/.safetensors or its directory")
    p.add_argument("--arch", required=True, choices=ARCHITECTURES)
    p.add_argument("--dict", dest="dict_path", help="OFA's utils/BPE/dict.txt: gives the official token ids")
    p.add_argument("--gpt2-vocab", action="store_true",
                   help="the weights use ofa-ray's GPT-2 token order (not an official checkpoint): no --dict needed")
    p.add_argument("--ema", action="store_true", help="take the EMA weights (extra_state['ema']) of a fairseq .pt")
    p.add_argument("--format", default="auto", choices=("auto", "fairseq", "hf"))
    p.add_argument("--patch-image-size", type=int, required=True, metavar="PX",
                   help="side of the square image the model sees, in pixels (table below)")
    p.add_argument("--max-src-length", type=int, required=True, metavar="N",
                   help="source text length in BPE tokens (OFA --max-src-length; table below)")
    p.add_argument("--max-tgt-length", type=int, required=True, metavar="N",
                   help="target text length (OFA --max-tgt-length; table below)")
    p.add_argument("--max-image-size", type=int, default=512, metavar="PX",
                   help="box coordinates are normalised by this (OFA --max-image-size; default 512, as every "
                        "released setting)")
    p.add_argument("--max-object-length", type=int, default=30, metavar="N",
                   help="objects per detection target (OFA --max-object-length; default 30)")
    p.add_argument("--imagenet-mean-std", action="store_true",
                   help="normalise images with ImageNet's mean and std (OFA's ImageNet fine-tune) instead of 0.5")
    p.add_argument("--answers", action="append", default=[], metavar="TASK=FILE",
                   help="store a closed answer set with the bundle, the predictor's candidates for TASK by default "
                        "(e.g. vqa=trainval_ans2label.pkl; .txt one a line, .json, or OFA's .pkl); repeatable")
    p.add_argument("--output", required=True, help="bundle directory to write (absent or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the bundle at --output; the old one stays until the new one is complete, and a "
                        "directory holding files other than the bundle's is refused, naming them")
    p.add_argument("--register", metavar="NAME", help="register the bundle in MLflow as a new version of NAME")
    p.add_argument("--alias", default="official", help="the alias --register points at the version (default official)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for --register (default: MLFLOW_TRACKING_URI, else "
                   "sqlite:///mlflow.db in the working directory)")
    return p


def _register(args: argparse.Namespace) -> dict:
    """The registration's part of the summary; a failure is one error line saying the bundle is written."""
    from mlflow.exceptions import MlflowException

    from pipelines.tracking.checkpoints import register_converted

    try:
        reg = register_converted(args.output, args.register, checkpoint=args.input, arch=args.arch,
                                 alias=args.alias, tracking=args.tracking_uri)
    except (MlflowException, OSError) as e:
        fail(PROG, f"the bundle is written at {args.output}, but registering it as {args.register} failed: "
                   f"{one_line(e)}")
    return {"model_uri": reg.uri, "registered": {"name": reg.name, "version": reg.version, "alias": reg.alias,
                                                 "run_id": reg.run_id, "reused": reg.reused}}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.register:
        from pipelines.tracking.checkpoints import models_uri

        try:
            models_uri(args.register, args.alias)
        except ValueError as e:
            fail(PROG, e)
    try:
        norm = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD) if args.imagenet_mean_std else {}
        preprocess = PreprocessConfig(patch_image_size=args.patch_image_size, max_src_length=args.max_src_length,
                                      max_tgt_length=args.max_tgt_length, max_image_size=args.max_image_size,
                                      max_object_length=args.max_object_length, **norm)
        summary = convert_checkpoint(args.input, args.arch, args.output, preprocess=preprocess,
                                     dict_path=args.dict_path, gpt2_vocab=args.gpt2_vocab, use_ema=args.ema,
                                     fmt=args.format, overwrite=args.overwrite, answer_sets=_answers(args.answers))
    except (InputError, OSError) as e:
        fail(PROG, one_line(e))
    if args.register:
        summary.update(_register(args))
    print_json(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
