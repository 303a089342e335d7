"""Inference speed and fidelity per precision and memory format (`ofa_model.precision`), side by side in one run.

    python -m bench.inference speed [--arch ofa-tiny]             # encoder 480², greedy 480², beam-5 256²
    python -m bench.inference fidelity [--arch ofa-tiny] [--bundle DIR --corpus URI]

speed: images/s of each configuration (CONFIGS) against eager fp32 as it ran before this benchmark (position
biases built per row), run alternately (a noisy machine affects every side alike). The configurations: eager
fp32 today (biases shared across the batch), channels-last, the predictor's DEFAULT (channels-last, BatchNorms
folded), and candidates that must pass the fidelity bar before they may be defaults: bf16 in the ResNet only,
bf16 autocast throughout, int8 dynamic quantization of the Transformer's linear layers. The encoder at 480² (batch 16), greedy captions at 480² (batch 16, up to 16 tokens) and beam-5
captions at 256² (batch 16, up to 16 tokens, no-repeat 3).

fidelity: the bar a configuration must pass against fp32 on the same weights before it may be a default:
* top-1 agreement of next-token logits >= 99.9%, teacher-forced on fp32's beam-5 outputs, over real inputs
  (easy-VQA test images and the scikit-learn photos) and each task's prompts;
* beam-5 outputs identical (answer text or box) on >= 99% of items;
* on a trained bundle (`--bundle`, e.g. the easy-VQA model of bench/learning_curve.py, with `--corpus` its
  converted corpus): the VQA score on the test split moves by <= 0.2 points.
"Random weights with non-trivial norms": a fresh model's tied embeddings (std 0.02) give near-uniform logits
whose top-1 is decided by noise, so the embedding is rescaled to make logits of std ~4 (a trained model's
range) before comparing.
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ofa_model.architecture import get_config
from ofa_model.bundle import load_bundle
from ofa_model.generation import GenerationConfig, SpecialIds, generate
from ofa_model.model import OFAModel
from ofa_model.precision import Execution, cpu_flags
from ofa_model.predictor import OFAPredictor
from ofa_model.preprocess import PreprocessConfig, pad_sequences
from ofa_model.tasks import TASKS, inference_request
from ofa_model.vocab import Vocabulary

BAR_TOP1, BAR_BEAM, BAR_METRIC = 0.999, 0.99, 0.2


class _Bf16Images(torch.nn.Module):
    """The ResNet under bf16 autocast, its features back in fp32: the rest of the model stays fp32."""

    def __init__(self, resnet: torch.nn.Module):
        super().__init__()
        self.resnet = resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.resnet(x).float()

    def fold_batchnorm(self, enabled: bool) -> None:  # what `Execution.prepare_inference` sets on the ResNet
        self.resnet.fold_batchnorm(enabled)


def _bf16_resnet(model: OFAModel) -> OFAModel:
    model.encoder.embed_images = _Bf16Images(model.encoder.embed_images)
    return model


def _int8_linear(model: OFAModel) -> OFAModel:
    """int8 dynamic quantization of the Transformer's linear layers (not the tied output projection, which
    scoring reads as a weight)."""
    from torch.ao.quantization import quantize_dynamic

    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "output_projection" not in n}
    return quantize_dynamic(model, names, dtype=torch.qint8)


def _per_row_biases(model: OFAModel) -> OFAModel:
    """The encoder as it ran before its position biases were shared across the batch: patch position ids per
    row (B, N), so the absolute and relative position biases are built B times (the same values)."""
    embed = model.encoder.embed_image

    def per_row(patch_images, *args):
        x, pad, ids = embed(patch_images, *args)
        return x, pad, ids.expand(x.shape[0], -1)

    model.encoder.embed_image = per_row
    return model


@dataclass(frozen=True)
class Config:
    name: str
    precision: str
    memory_format: str
    fold: bool
    transform: Callable[[OFAModel], OFAModel] | None = None  # bench-only variants, not predictor options


# The first is the reference: plain eager fp32, as the model ran before this benchmark's settings existed
# (position biases per row); then the same eager fp32 with the biases shared across the batch (today's code).
CONFIGS = [
    Config("fp32 eager, before", "fp32", "contiguous", False, _per_row_biases),
    Config("fp32 eager", "fp32", "contiguous", False),
    Config("fp32 channels-last", "fp32", "channels_last", False),
    Config("DEFAULT fp32 CL folded", "fp32", "channels_last", True),
    Config("bf16-ResNet CL folded", "fp32", "channels_last", True, _bf16_resnet),
    Config("bf16 CL folded", "bf16", "channels_last", True),
    Config("int8-linear CL folded", "fp32", "channels_last", True, _int8_linear),
]


def _peaked(model: OFAModel) -> OFAModel:
    """Rescales the tied embedding so that output logits have std ~4 (a trained model's spread)."""
    with torch.no_grad():
        w = model.decoder.output_projection.weight
        w.mul_(4.0 / math.sqrt(w.shape[1]) / float(w.std()))
    return model


def _copy(model: OFAModel, c: Config) -> tuple[OFAModel, Execution]:
    ex = Execution.resolve(c.precision, c.memory_format, "cpu")
    model = ex.prepare_inference(copy.deepcopy(model), fold_batchnorm=c.fold)
    return (c.transform(model) if c.transform else model).eval(), ex


def _median_interleaved(fns: dict[str, Callable[[], None]], repeat: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# =============================================================================================================
# Speed


@torch.no_grad()
def speed(arch: str, repeat: int) -> None:
    torch.manual_seed(0)
    base = _peaked(OFAModel(get_config(arch)))
    ids = SpecialIds(bos=0, pad=1, eos=2)
    g = torch.Generator().manual_seed(0)
    b = 16
    src = torch.randint(4, 50000, (b, 12), generator=g)
    models = {c.name: _copy(base, c) for c in CONFIGS}

    def case(title: str, size: int, run: Callable[[OFAModel, torch.Tensor], None]) -> None:
        img = torch.randn(b, 3, size, size, generator=g)

        def fn(model, ex):
            def call():
                with ex.autocast():
                    run(model, ex.images(img))
            return call

        t = _median_interleaved({k: fn(m, ex) for k, (m, ex) in models.items()}, repeat)
        ref = t[CONFIGS[0].name]
        print(f"\n{title} (batch {b}, {size}x{size}), median of {repeat}")
        for k, v in t.items():
            print(f"  {k:24s} {v:7.2f} s  {b / v:6.2f} images/s  {ref / v:5.2f}x")

    case("encoder", 480, lambda m, img: m.encode(src, img))
    case("greedy captions, up to 16 tokens", 480,
         lambda m, img: generate(m, src, img, cfg=GenerationConfig(beam_size=1, max_len_b=16), ids=ids))
    case("beam-5 captions, up to 16 tokens, no-repeat 3", 256,
         lambda m, img: generate(m, src, img, cfg=GenerationConfig(beam_size=5, max_len_b=16, no_repeat_ngram_size=3),
                                 ids=ids))


# =============================================================================================================
# Fidelity


def _images(n: int) -> list[tuple[bytes, dict]]:
    """Real images with what they show: easy-VQA test images (shape, colour from its questions) and the
    scikit-learn photos."""
    import easy_vqa
    from sklearn.datasets import load_sample_images

    out: list[tuple[bytes, dict]] = []
    questions, _answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    by_image: dict[int, list[str]] = {}
    for q, i in zip(questions, image_ids, strict=True):
        by_image.setdefault(i, []).append(q)
    for i in sorted(by_image)[: max(0, n - 2)]:
        out.append((Path(paths[i]).read_bytes(), {"questions": by_image[i][:2]}))
    for arr in load_sample_images().images:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(arr)).save(buf, "JPEG", quality=90)
        out.append((buf.getvalue(), {"questions": ["what is in the picture?", "is it outdoors?"]}))
    return out


def _items(images: list[tuple[bytes, dict]]) -> list[tuple[str, dict]]:
    beam = {"beam_size": 5, "max_len_b": 12}
    items = []
    for img, meta in images:
        items.append(("caption", {"image": img, "decoding": beam}))
        for q in meta["questions"]:
            items.append(("vqa", {"image": img, "text": q, "decoding": beam}))
        items.append(("grounding", {"image": img, "text": "the shape in the middle"}))
        items.append(("visual_entailment", {"image": img, "text": "there is a shape", "decoding": beam}))
    return items


def _answer(res: dict) -> object:
    return {k: v for k, v in res.items() if k not in ("score", "scores", "alternatives")}


@torch.no_grad()
def _top1_agreement(base: OFAModel, other: OFAModel, ex: Execution, vocab, pre, items, hyps) -> tuple[int, int]:
    """Positions where `other`'s next-token argmax equals fp32's, teacher-forced on fp32's outputs."""
    agree = total = 0
    for (task, item), tokens in zip(items, hyps, strict=True):
        spec = TASKS[task]
        req = inference_request(spec, item, vocab, pre)
        prev = torch.tensor([[vocab.bos_id, *req.prefix, *tokens]])
        src = pad_sequences([req.source], vocab.pad_id)
        img = req.image[None] if req.image is not None else None
        a = base(src, img, None, prev)[0, len(req.prefix):].argmax(-1)
        with ex.autocast():
            b = other(src, ex.images(img), None, prev)[0, len(req.prefix):].float().argmax(-1)
        agree += int((a == b).sum())
        total += a.numel()
    return agree, total


def fidelity(arch: str, n_images: int, bundle: str | None, corpus: str | None, rows: int) -> None:
    torch.manual_seed(0)
    vocab, pre = Vocabulary.gpt2(), PreprocessConfig(patch_image_size=256)
    items = _items(_images(n_images))
    base = _peaked(OFAModel(get_config(arch))).eval()
    ref = OFAPredictor(base, vocab, pre, max_batch_size=16, memory_format="contiguous", fold_batchnorm=False)
    want = [ref.predict(task, [item])[0] for task, item in items]
    hyps = []
    for task, item in items:  # fp32's beam-5 tokens, for teacher forcing
        spec = TASKS[task]
        req = inference_request(spec, item, vocab, pre)
        h = generate(base, pad_sequences([req.source], vocab.pad_id), req.image[None] if req.image is not None else None,
                     cfg=GenerationConfig(**{**spec.generation.__dict__, **item.get("decoding", {})}),
                     ids=ref.ids, prefix_tokens=[req.prefix], constraints=[req.constraint])
        hyps.append(h[0][0].tokens if h[0] else [])
    print(f"fidelity on {arch}, random weights (logit std ~4), {len(items)} items over "
          f"{sorted({t for t, _ in items})}, {sum(len(h) + 1 for h in hyps)} teacher-forced positions")
    print(f"  {'configuration':24s} {'top-1 agree':>12s} {'beam-5 same':>12s}  bar (>= {BAR_TOP1:.1%}, >= {BAR_BEAM:.0%})")
    for c in CONFIGS:
        model, ex = _copy(base, c)
        pred = OFAPredictor(model, vocab, pre, max_batch_size=16, precision=c.precision,
                            memory_format=c.memory_format, fold_batchnorm=c.fold)
        got = [pred.predict(task, [item])[0] for task, item in items]
        same = sum(_answer(a) == _answer(b) for a, b in zip(want, got, strict=True)) / len(items)
        agree, total = _top1_agreement(base, model, ex, vocab, pre, items, hyps)
        ok = agree / total >= BAR_TOP1 and same >= BAR_BEAM
        print(f"  {c.name:24s} {agree / total:12.4%} {same:12.2%}  {'passes' if ok else 'FAILS'}")
    if bundle:
        _bundle_metric(bundle, corpus, rows)


def _bundle_metric(bundle: str, corpus: str | None, rows: int) -> None:
    import itertools

    from ofa_model.evaluation import evaluate_rows
    from pipelines.data.shards import iter_rows

    if corpus is None:
        raise SystemExit("--bundle needs --corpus (the converted easy-VQA corpus the bundle was validated on)")
    from pipelines.data.converters.easyvqa import answer_set

    answers = list(answer_set())
    print(f"\ntrained bundle {bundle}: VQA score on {rows} easy-VQA test questions")
    scores = {}
    for c in CONFIGS:
        b = load_bundle(bundle)
        model, _ = _copy(b.model, c)
        pred = OFAPredictor(model, b.vocab, b.preprocess, tasks=b.tasks, max_batch_size=64, precision=c.precision,
                            memory_format=c.memory_format, fold_batchnorm=c.fold)
        for mode in ("allcand", "open"):
            t = time.perf_counter()
            test = itertools.islice(iter_rows(corpus, splits=["test"], tasks=["vqa"]), rows)
            res = evaluate_rows(pred, "vqa", test, mode=mode, candidates=answers if mode == "allcand" else None)
            scores[(c.name, mode)] = res.metrics["vqa_score"]
            print(f"  {c.name:24s} {mode:8s} {100 * res.metrics['vqa_score']:7.2f}  "
                  f"({time.perf_counter() - t:.0f} s)")
    for (name, mode), v in scores.items():
        d = 100 * abs(v - scores[(CONFIGS[0].name, mode)])
        if name != CONFIGS[0].name:
            print(f"  {name} {mode}: moves {d:.2f} points ({'passes' if d <= BAR_METRIC else 'FAILS'} "
                  f"the {BAR_METRIC} bar)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["speed", "fidelity"])
    p.add_argument("--arch", default="ofa-tiny")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--images", type=int, default=40, help="real images for the fidelity items")
    p.add_argument("--bundle", help="a trained bundle for the metric check")
    p.add_argument("--corpus", help="its converted corpus (local path or s3://)")
    p.add_argument("--rows", type=int, default=2000, help="test questions for the metric check")
    a = p.parse_args(argv)
    torch.set_flush_denormal(True)
    flags = cpu_flags()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, avx512_bf16 "
          f"{'avx512_bf16' in flags}, amx_bf16 {'amx_bf16' in flags}")
    if a.what == "speed":
        speed(a.arch, a.repeat)
    else:
        fidelity(a.arch, a.images, a.bundle, a.corpus, a.rows)


if __name__ == "__main__":
    main()
