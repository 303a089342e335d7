"""Convert an official OFA checkpoint into an ofa-ray bundle.

    python -m jobs.convert_checkpoint --input ofa_tiny.pt --arch ofa-tiny --dict dict.txt [--ema] --output DIR

Exits non-zero, naming every missing, unexpected or mis-shaped key, when the checkpoint does not
fit the architecture.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ofa_model.checkpoint import CheckpointMismatchError, convert_checkpoint
from ofa_model.config import ARCHITECTURES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.convert_checkpoint", description=__doc__.split("\n")[1])
    p.add_argument("--input", required=True, help="fairseq .pt, HF-port pytorch_model.bin/.safetensors or its directory")
    p.add_argument("--arch", required=True, choices=ARCHITECTURES)
    p.add_argument("--dict", dest="dict_path", help="OFA's utils/BPE/dict.txt: gives the official token ids")
    p.add_argument("--gpt2-vocab", action="store_true",
                   help="the weights use ofa-ray's GPT-2 token order (not an official checkpoint): no --dict needed")
    p.add_argument("--ema", action="store_true", help="take the EMA weights (extra_state['ema']) of a fairseq .pt")
    p.add_argument("--format", default="auto", choices=("auto", "fairseq", "hf"))
    p.add_argument("--output", required=True, help="bundle directory to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = convert_checkpoint(args.input, args.arch, args.output, dict_path=args.dict_path,
                                     gpt2_vocab=args.gpt2_vocab, use_ema=args.ema, fmt=args.format)
    except CheckpointMismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
