"""Generate images from a caption with a text-to-image model; write them as PNGs, best first.

    python -m jobs.generate_images --model bundles/ofa-t2i --text "a red circle" --num-samples 4 --output out/
    python -m jobs.generate_images --model models:/ofa-t2i@champion --text "a blue square" --seed 0 --output out/

--model: a bundle directory, s3://bucket/prefix or models:/name@alias; its bundle must carry an image tokenizer
(`save_bundle(..., image_tokenizer=...)`, in training `model.image_tokenizer`). The images are sampled (top-k 256,
temperature 1.0 unless set), ranked by the model's own image-text matching and written to --output as
rank01.png, rank02.png, ... with images.json (rank, itm_score, logprob per file; the codes too with
--return-codes). --decoding takes the predictor's decoding settings as JSON, e.g. '{"beam_size": 4}' for beam
search instead of sampling. Exit status 2 on a bad model, caption, option or output directory.
"""

from __future__ import annotations

import dataclasses
import json

from jobs._cli import Parser, fail, print_json, setup_logging

PROG = "python -m jobs.generate_images"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="bundle directory, s3://bucket/prefix or models:/name@alias")
    p.add_argument("--text", required=True, help="the caption")
    p.add_argument("--output", required=True, help="directory for the PNGs and images.json")
    p.add_argument("--num-samples", type=int, help="images to generate and rank (default 1)")
    p.add_argument("--seed", type=int, help="sampling seed (the same seed and caption give the same images)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest codes (default 256)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (default 1.0: off)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 1.0)")
    p.add_argument("--decoding", help="decoding settings as a JSON object (the predictor's 'decoding' field)")
    p.add_argument("--return-codes", action="store_true", help="write each image's code tokens into images.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: MLFLOW_TRACKING_URI)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    import torch

    torch.set_flush_denormal(True)  # process-wide, so the entry point's call: denormals slow CPU decoding
    from ofa_model.errors import InputError
    from pipelines.generate import generate_images
    from pipelines.tracking.registry import ModelSourceError

    settings = {"num_samples": args.num_samples, "seed": args.seed, "top_k": args.top_k, "top_p": args.top_p,
                "temperature": args.temperature, "return_codes": args.return_codes or None}
    if args.decoding is not None:
        try:
            settings["decoding"] = json.loads(args.decoding)
        except json.JSONDecodeError as exc:
            fail(PROG, f"--decoding is not JSON: {exc}")
    try:
        out = generate_images(args.model, args.text, args.output, device=args.device, tracking=args.tracking_uri,
                              settings={k: v for k, v in settings.items() if v is not None})
    except (ModelSourceError, InputError) as exc:
        fail(PROG, exc)
    except OSError as exc:
        fail(PROG, f"--output {args.output}: {exc}")
    print_json(dataclasses.asdict(out))


if __name__ == "__main__":
    main()
