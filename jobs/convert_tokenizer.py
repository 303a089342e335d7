"""Convert OFA's released image tokenizer (taming's GumbelVQ: vqgan/last.ckpt + vqgan/model.yaml, inside
image_gen_large_best.zip) into an ofa-ray tokenizer bundle.

    python -m jobs.convert_tokenizer --checkpoint vqgan/last.ckpt --config vqgan/model.yaml --output DIR [--overwrite]

The checkpoint is read without running any of its code; the loss's training-only weights (loss.*) are dropped.
Every failure (a bad option, a file that is missing, corrupt, unsafe or does not fit the config, a config key this
importer does not know, an output that cannot be written) is one `error: ...` line on stderr and exit status 2; a
failed write leaves the bundle already at the output as it was. Prints a JSON summary.
"""

from __future__ import annotations

import sys

from jobs._cli import Parser, fail, print_json, setup_logging
from jobs.convert_checkpoint import one_line
from ofa_model.errors import InputError
from ofa_model.vqgan_weights import import_tokenizer

PROG = "python -m jobs.convert_tokenizer"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="taming's PyTorch Lightning checkpoint (OFA's vqgan/last.ckpt)")
    p.add_argument("--config", required=True, help="its taming config (OFA's vqgan/model.yaml)")
    p.add_argument("--output", required=True, help="tokenizer bundle directory to write (absent or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the tokenizer bundle at --output; the old one stays until the new one is complete, "
                        "and a directory holding files other than the bundle's is refused, naming them")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        summary = import_tokenizer(args.checkpoint, args.config, args.output, overwrite=args.overwrite)
    except (InputError, OSError) as e:
        fail(PROG, one_line(e))
    print_json(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
