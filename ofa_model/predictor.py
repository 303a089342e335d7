"""OFAPredictor: the one inference path, used by evaluation jobs and by Ray Serve alike.

Inputs are plain data (image bytes, text, candidate lists, decoding overrides) and every field is
treated as hostile; outputs are JSON-ready dicts. A bad input gets
`{"error": {"type", "reason", "message"}}` (`errors.error_dict`) in its place and the rest of the
call is still answered. A call that cannot be served at all (unknown task, more inputs than
`PredictorLimits.max_items`) raises `TaskInputError`. Only `InputError`s are answers: any other
exception is a bug in this code and propagates.

The work one input may ask for is bounded by `PredictorLimits`, checked before it is preprocessed;
image payloads by `PreprocessConfig.max_image_bytes` / `max_image_pixels`. Inputs are preprocessed
and run `max_batch_size` at a time, so memory is bounded by one chunk, not by the call.

A closed-set task (VQA in allcand or trie mode, image classification) scores an input's own `candidates`, or,
when it sends none, the answer set the model was trained with (`answer_sets`, from the bundle): a client of a
VQA model need not send its 3,129 answers. `PredictorLimits.max_candidates` bounds what an input sends, not the
bundle's own set.

An image-generating task (text_to_image, image_infilling: `TaskSpec.code_target`) needs the bundle's image
tokenizer (else the input fails with reason "no_image_tokenizer"). It decodes exactly the model's code grid
(`tasks.codes_per_image`: (code_image_size / 8)^2 tokens, EOS only after it), constrained to the tokenizer's
codes, `num_samples` times per input (sampling with `top_k`, `top_p`, `temperature`, `seed`: input fields, OFA's
defaults top_k 256 and temperature 1.0; `decoding` may choose greedy or beam search instead). The tokenizer turns
each grid into an image, and the images are ranked by the task's `rerank_task` (text_to_image: the model's own
image-text matching, `itm`, P(" yes") over " yes" / " no" for the input's caption, asked of the PNG through the
model's normal preprocessing), ties and tasks without one by log-probability. The answer:
`{"images": [{"png": <base64>, "rank": 1.., "itm_score", "logprob", "codes" (with "return_codes": true)}],
"width", "height"}`. With a seed, an input's images do not depend on the inputs decoded beside it.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import logging
import math
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ofa_model.answer_sets import answer_sets_of
from ofa_model.bundle import BundleLimits, load_bundle
from ofa_model.errors import (
    BAD_SETTING,
    BAD_TYPE,
    LIMIT_EXCEEDED,
    NO_IMAGE_TOKENIZER,
    UNKNOWN_TASK,
    ConfigError,
    InputError,
    check_keys,
    check_value,
    error_dict,
)
from ofa_model.generation import (
    MAX_BEAM,
    GenerationConfig,
    Hypothesis,
    SpecialIds,
    generate,
    max_new_tokens,
    score_candidates,
)
from ofa_model.model import OFAModel
from ofa_model.precision import Execution
from ofa_model.preprocess import PreprocessConfig, pad_sequences
from ofa_model.tasks import (
    TASKS,
    InferenceRequest,
    NoAnswerError,
    TaskInputError,
    TaskSpec,
    code_constraint,
    codes_per_image,
    inference_request,
    max_source_length,
    parse_output,
)
from ofa_model.vqgan import Tokenizer, png_bytes

log = logging.getLogger(__name__)

MODES = ("open", "trie", "allcand")  # VQA: open-ended beam, trie-constrained beam, all-candidate scoring
_GEN_FIELDS = {f.name for f in dataclasses.fields(GenerationConfig)}
# image generation: input field -> the GenerationConfig field it sets; the length fields are the model's
_SAMPLING_FIELDS = {"num_samples": "num_return_sequences", "top_k": "top_k", "top_p": "top_p",
                    "temperature": "temperature", "seed": "seed"}
_LENGTH_FIELDS = ("max_len_a", "max_len_b", "min_len")


@dataclass(frozen=True)
class PredictorLimits:
    """The most work one predict call or one input may ask for. The defaults keep one input to a few seconds of
    CPU on ofa-tiny. Image bytes and pixels are `PreprocessConfig`'s limits; source and target tokens are
    truncated to its `max_src_length` / `max_tgt_length`, as OFA does; image and encoder tokens per input are
    the bundle's `BundleLimits`, checked when it loads. `OFAPredictor(limits=...)` also takes a mapping of some
    of these fields.

    Memory of one image: decoding holds up to 11 bytes a pixel at its peak (`preprocess.decode_image`), so an
    image at `max_image_pixels` costs about 0.7 GB of RSS at the default 64 Mi pixels (8192x8192, measured for a
    16-bit grayscale PNG; 0.5 GB for RGB) and 0.26 GB at Serve's 25 M. A chunk's images are decoded one after the
    other, so size a process for one such image per concurrent predict call on top of the model."""

    max_items: int = 64  # inputs in one call; more fail the whole call
    max_beam_tokens: int = 1024  # beams (samples when sampling) x the most tokens decoding may generate
    max_return_sequences: int = 8  # and never more than the beams
    max_candidates: int = 1000  # answers an input sends for candidate scoring or a trie (not the bundle's own set)
    max_text_chars: int = 4096  # characters of any one text field or candidate
    max_samples: int = 8  # images one input of an image-generating task asks for (num_samples)
    max_sample_codes: int = 8 * 1024  # its samples (beams) x the code grid: 8 images of 256 px (1,024 codes)
    max_images: int = 32  # images generated in one call, all inputs together

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_value(f"PredictorLimits.{f.name}", getattr(self, f.name), int, 1, math.inf)

    @classmethod
    def of(cls, limits: PredictorLimits | Mapping[str, int] | None) -> PredictorLimits:
        """`limits` itself, the defaults for None, or a mapping of some fields validated into PredictorLimits
        (unknown keys and bad values are a ConfigError naming them)."""
        if limits is None:
            return cls()
        if isinstance(limits, cls):
            return limits
        if not isinstance(limits, Mapping):
            raise ConfigError(f"limits must be a PredictorLimits or a mapping of its fields, got "
                              f"{type(limits).__name__}")
        check_keys(cls, limits, "PredictorLimits")
        return cls(**limits)


def _images_decoded(gen: GenerationConfig) -> int:
    """Images one image-generating input decodes at once: its samples, or its beams."""
    return gen.num_return_sequences if gen.sampling else gen.beam_size


class OFAPredictor:
    """Batched inference over any task of `TASKS` (or a custom TaskSpec), within `limits`.

    `precision` / `memory_format` (`ofa_model.precision`) and `fold_batchnorm`: the defaults (fp32, channels-last,
    BatchNorms folded into the convolutions) are the fastest setting that passes the fidelity bar against plain
    fp32 (`python -m bench.inference fidelity`: identical top-1 tokens and beam outputs). bf16 is faster again
    on CPUs with AMX/AVX-512 BF16 but changes some beam outputs, so it is an explicit choice.
    """

    def __init__(self, model: OFAModel, vocab, preprocess: PreprocessConfig, *, device: str | torch.device = "cpu",
                 tasks: Mapping[str, TaskSpec] | None = None, max_batch_size: int = 16,
                 limits: PredictorLimits | Mapping[str, int] | None = None, precision: str = "fp32",
                 memory_format: str = "auto", fold_batchnorm: bool = True,
                 answer_sets: Mapping[str, Sequence[str]] | None = None, image_tokenizer: Tokenizer | None = None):
        # Process-wide CPU settings (e.g. torch.set_flush_denormal(True), which bench/model.py shows matters
        # after fine-tuning) belong to the process owner: the serving replica or the job entry point.
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.execution = Execution.resolve(precision, memory_format, device)
        self.device = self.execution.device
        self.model = self.execution.prepare_inference(model, fold_batchnorm=fold_batchnorm)
        log.info("OFAPredictor on %s%s", self.execution.describe(), ", BatchNorm folded" if fold_batchnorm else "")
        self.vocab, self.preprocess = vocab, preprocess
        self.tasks = dict(TASKS if tasks is None else tasks)
        self.max_batch_size = max_batch_size
        self.limits = PredictorLimits.of(limits)
        self.ids = SpecialIds.of(vocab)
        self.answer_sets = answer_sets_of(answer_sets or {}, "answer_sets")
        self.image_tokenizer = image_tokenizer
        self.grid_length = codes_per_image(model.config.code_image_size)
        if image_tokenizer is not None and self.grid_length > model.config.max_target_positions:
            raise ConfigError(f"the model's code grid ({self.grid_length} codes at code_image_size "
                              f"{model.config.code_image_size}) is longer than its max_target_positions "
                              f"{model.config.max_target_positions}: it cannot generate an image")

    @classmethod
    def from_bundle(cls, path: str | Path, device: str | torch.device = "cpu", *,
                    bundle_limits: BundleLimits | None = None, **kw) -> OFAPredictor:
        """Model, vocabulary, preprocessing, tasks (built-in plus those declared in training), answer sets and image
        tokenizer of a bundle, loaded within `bundle_limits` (image and encoder tokens per input; default
        `BundleLimits()`)."""
        b = load_bundle(path, device=device, limits=bundle_limits)
        return cls(b.model, b.vocab, b.preprocess, device=device, tasks=b.tasks, answer_sets=b.answer_sets,
                   image_tokenizer=b.image_tokenizer, **kw)

    def predict(self, task: str | TaskSpec, inputs: Sequence[Mapping[str, Any]]) -> list[dict]:
        """One JSON-ready result per input, in order: the answer, or `{"error": {...}}` for that input alone."""
        spec = self._spec(task)
        if not isinstance(inputs, Sequence) or isinstance(inputs, (str, bytes, bytearray)):
            raise TaskInputError(f"inputs must be a list of objects, got {type(inputs).__name__}", BAD_TYPE)
        if len(inputs) > self.limits.max_items:
            raise TaskInputError(f"{len(inputs)} inputs in one call, over the limit of {self.limits.max_items}",
                                 LIMIT_EXCEEDED)
        results: list[dict | None] = [None] * len(inputs)
        groups: dict[tuple[str, GenerationConfig], list[int]] = {}
        images = 0  # generated in this call so far
        for i, item in enumerate(inputs):
            try:
                mode, gen = self._options(spec, item)
                if spec.code_target:
                    n = _images_decoded(gen)
                    if images + n > self.limits.max_images:
                        raise TaskInputError(f"{n} more images would make {images + n} in this call, over the "
                                             f"limit of {self.limits.max_images}", LIMIT_EXCEEDED)
                    images += n
                groups.setdefault((mode, gen), []).append(i)
            except InputError as e:
                results[i] = error_dict(e)
        for (mode, gen), members in groups.items():
            for lo in range(0, len(members), self.max_batch_size):  # preprocess, run and drop one chunk at a time
                chunk: list[tuple[int, InferenceRequest]] = []
                for i in members[lo:lo + self.max_batch_size]:
                    try:
                        req = inference_request(spec, inputs[i], self.vocab, self.preprocess, mode,
                                                self._answer_set(spec, mode))
                        if spec.code_target and spec.rerank_task is not None:  # its ranking question must be askable
                            self._rerank_requests(spec, inputs[i], [_probe_png()])
                        chunk.append((i, req))
                    except InputError as e:
                        results[i] = error_dict(e)
                if not chunk:
                    continue
                reqs = [r for _, r in chunk]
                outs = (self._images(spec, gen, [inputs[i] for i, _ in chunk], reqs) if spec.code_target
                        else self._run(spec, mode, gen, reqs))
                for (i, _), out in zip(chunk, outs, strict=True):
                    results[i] = out
        return results  # type: ignore[return-value]

    def images_asked(self, task: str, inputs: Sequence[Any]) -> int:
        """Images that `predict(task, inputs)` would generate (0 for a task that makes none): what counts against
        `limits.max_images`, for a caller packing several requests into one call. An input `predict` would refuse
        counts 0."""
        spec = self.tasks.get(task) if isinstance(task, str) else None
        if spec is None or not spec.code_target:
            return 0
        n = 0
        for item in inputs:
            if not isinstance(item, Mapping):
                continue
            try:
                n += _images_decoded(self._options(spec, item)[1])
            except InputError:
                pass
        return n

    def _spec(self, task: str | TaskSpec) -> TaskSpec:
        if isinstance(task, TaskSpec):
            return task
        spec = self.tasks.get(task) if isinstance(task, str) else None
        if spec is None:
            raise TaskInputError(f"unknown task {reprlib.repr(task)}; known: {sorted(self.tasks)}", UNKNOWN_TASK)
        return spec

    def _answer_set(self, spec: TaskSpec, mode: str) -> tuple[str, ...]:
        """The candidates of an input that sends none: the bundle's set for the task where `mode` scores or
        constrains to candidates (allcand, trie, a candidate-ranking task), else none (the task's labels)."""
        if mode in ("allcand", "trie") or spec.inference != "generate":
            return self.answer_sets.get(spec.name, ())
        return ()

    def _options(self, spec: TaskSpec, item: Mapping[str, Any]) -> tuple[str, GenerationConfig]:
        """Mode and decoding settings of one input, checked against the limits before it is preprocessed."""
        if not isinstance(item, Mapping):
            raise TaskInputError(f"an input must be an object of fields, got {type(item).__name__}", BAD_TYPE)
        mode = item.get("mode") or ("allcand" if spec.inference == "candidates" else "open")
        if not isinstance(mode, str) or mode not in MODES:
            raise TaskInputError(f"mode {reprlib.repr(mode)} is not one of {MODES}", BAD_SETTING)
        overrides = item.get("decoding") or {}
        if not isinstance(overrides, Mapping):
            raise TaskInputError("'decoding' must be an object of generation settings", BAD_SETTING)
        unknown = sorted(str(k) for k in set(overrides) - _GEN_FIELDS)
        if unknown:
            raise TaskInputError(f"unknown decoding settings {unknown}; known: {sorted(_GEN_FIELDS)}", BAD_SETTING)
        if spec.code_target:
            overrides = self._image_settings(spec, item, overrides)
        try:  # GenerationConfig checks every type and range
            gen = dataclasses.replace(spec.generation, **overrides) if overrides else spec.generation
        except InputError as e:
            raise TaskInputError(f"bad decoding settings: {e}", e.reason) from e
        self._check_limits(spec, item, mode, gen)
        return mode, gen

    def _image_settings(self, spec: TaskSpec, item: Mapping[str, Any], overrides: Mapping) -> dict:
        """The decoding overrides of an image-generating input: its `decoding`, its sampling fields (num_samples,
        top_k, top_p, temperature, seed) and the model's grid as the exact length."""
        if self.image_tokenizer is None:
            raise TaskInputError(f"task {spec.name}: this model's bundle carries no image tokenizer, so it cannot "
                                 "turn image codes into pixels; serve a bundle saved with save_bundle(..., "
                                 "image_tokenizer=<tokenizer bundle>) (in training: model.image_tokenizer)",
                                 NO_IMAGE_TOKENIZER)
        fixed = sorted(set(overrides) & set(_LENGTH_FIELDS))
        if fixed:
            raise TaskInputError(f"task {spec.name}: decoding settings {fixed} cannot be set: an image is exactly "
                                 f"the model's {self.grid_length} codes", BAD_SETTING)
        out = dict(overrides)
        for name, key in _SAMPLING_FIELDS.items():
            if item.get(name) is None:
                continue
            if key in out:
                raise TaskInputError(f"task {spec.name}: {name!r} and decoding.{key} set the same thing; send one",
                                     BAD_SETTING)
            if name == "num_samples":  # named as the client sent it (GenerationConfig says num_return_sequences)
                check_value("num_samples", item[name], int, 1, MAX_BEAM, reason=BAD_SETTING)
            out[key] = item[name]
        if not isinstance(item.get("return_codes", False), bool):
            raise TaskInputError(f"task {spec.name}: 'return_codes' must be true or false", BAD_TYPE)
        return {**out, "max_len_a": 0.0, "max_len_b": self.grid_length, "min_len": self.grid_length}

    def _check_limits(self, spec: TaskSpec, item: Mapping[str, Any], mode: str, gen: GenerationConfig) -> None:
        lim = self.limits
        if spec.code_target:  # images: the samples (beams) of a grid of codes each
            beams = gen.num_return_sequences if gen.sampling else gen.beam_size
            if gen.num_return_sequences > lim.max_samples:
                raise TaskInputError(f"num_samples={gen.num_return_sequences} is over the limit of "
                                     f"{lim.max_samples}", LIMIT_EXCEEDED)
            if beams * self.grid_length > lim.max_sample_codes:
                raise TaskInputError(f"{beams} {'samples' if gen.sampling else 'beams'} x {self.grid_length} codes "
                                     f"is over the limit of {lim.max_sample_codes} codes", LIMIT_EXCEEDED)
        elif gen.num_return_sequences > lim.max_return_sequences:
            raise TaskInputError(f"num_return_sequences={gen.num_return_sequences} is over the limit of "
                                 f"{lim.max_return_sequences}", LIMIT_EXCEEDED)
        elif spec.inference == "generate" and mode != "allcand":
            beams = gen.num_return_sequences if gen.sampling else gen.beam_size
            # from the longest source an input of the task can have: a chunk decodes to its widest source's limit
            longest = max_new_tokens(gen, max_source_length(spec, self.vocab, self.preprocess), 0, self.model)
            if beams * longest > lim.max_beam_tokens:
                raise TaskInputError(f"{beams} {'samples' if gen.sampling else 'beams'} x up to {longest} tokens "
                                     f"is over the limit of {lim.max_beam_tokens} decoded tokens", LIMIT_EXCEEDED)
        candidates = item.get("candidates")
        if not isinstance(candidates, (list, tuple)):
            candidates = ()
        if len(candidates) > lim.max_candidates:
            raise TaskInputError(f"{len(candidates)} candidates, over the limit of {lim.max_candidates}",
                                 LIMIT_EXCEEDED)
        fields = [col for _, col in spec.slots] + ([spec.target_field] if spec.target_kind == "infill_text" else [])
        for name, value in [(f, item.get(f)) for f in fields] + [("candidates", c) for c in candidates]:
            if isinstance(value, str) and len(value) > lim.max_text_chars:
                raise TaskInputError(f"field {name!r} has {len(value)} characters, over the limit of "
                                     f"{lim.max_text_chars}", LIMIT_EXCEEDED)

    @torch.no_grad()
    def _run(self, spec: TaskSpec, mode: str, gen: GenerationConfig, reqs: list[InferenceRequest]) -> list[dict]:
        with self.execution.autocast():
            return self._run_chunk(spec, mode, gen, reqs)

    def _encode(self, reqs: list[InferenceRequest]):
        """(src (B, L) padded sources, the encoder's output) of a chunk."""
        src = pad_sequences([r.source for r in reqs], self.vocab.pad_id).to(self.device)
        images = masks = None
        if reqs[0].image is not None:
            images = self.execution.images(torch.stack([r.image for r in reqs]))
            masks = torch.ones(len(reqs), dtype=torch.bool, device=self.device)
        return src, self.model.encode(src, images, masks)

    def _generate(self, spec: TaskSpec, gen: GenerationConfig, reqs: list[InferenceRequest], src,
                  enc) -> list[list[Hypothesis]]:
        code_masks = torch.full((len(reqs),), spec.code_target, device=self.device) if spec.code_target else None
        return generate(self.model, src, cfg=gen, ids=self.ids, encoder_out=enc,
                        prefix_tokens=[r.prefix for r in reqs], constraints=[r.constraint for r in reqs],
                        code_masks=code_masks)

    def _run_chunk(self, spec: TaskSpec, mode: str, gen: GenerationConfig, reqs: list[InferenceRequest]) -> list[dict]:
        src, enc = self._encode(reqs)
        if spec.inference == "last_token":
            return self._last_token(spec, reqs, src, enc)
        if spec.inference == "candidates" or mode == "allcand":
            return self._candidates(spec, reqs, enc)
        hyps = self._generate(spec, gen, reqs, src, enc)
        out = []
        for req, hs in zip(reqs, hyps, strict=True):
            if not hs:
                out.append(error_dict(NoAnswerError(f"task {spec.name}: decoding produced no hypothesis")))
                continue
            res = parse_output(spec, hs[0].tokens, self.vocab, req, self.preprocess)
            res["score"] = hs[0].score
            if gen.num_return_sequences > 1:
                res["alternatives"] = [{**parse_output(spec, h.tokens, self.vocab, req, self.preprocess),
                                        "score": h.score} for h in hs[1:]]
            out.append(res)
        return out

    @torch.no_grad()
    def _images(self, spec: TaskSpec, gen: GenerationConfig, items: list[Mapping[str, Any]],
                reqs: list[InferenceRequest]) -> list[dict]:
        """Generate, decode and rank the images of a chunk of inputs (the module docstring's answer)."""
        tokenizer = self.image_tokenizer
        assert tokenizer is not None  # _options refused the inputs otherwise
        constraint = code_constraint(self.vocab, tokenizer.config.n_embed)
        reqs = [dataclasses.replace(r, constraint=constraint) for r in reqs]
        with self.execution.autocast():
            hyps = self._generate(spec, gen, reqs, *self._encode(reqs))
        out = []
        for item, hs in zip(items, hyps, strict=True):
            try:
                out.append(self._image_answer(spec, item, hs))
            except InputError as e:  # this input's answer alone
                out.append(error_dict(e))
        return out

    def _image_answer(self, spec: TaskSpec, item: Mapping[str, Any], hs: list) -> dict:
        """One input's images: decoded, encoded as PNG, scored and ranked."""
        tokenizer = self.image_tokenizer
        codes = [[t - self.vocab.code_offset for t in h.tokens] for h in hs]
        if not hs or any(len(c) != self.grid_length for c in codes):  # the constraint and lengths forbid it
            raise NoAnswerError(f"task {spec.name}: decoding gave {[len(c) for c in codes]} codes, not "
                                f"{self.grid_length} per image")
        pixels = tokenizer.decode_codes(torch.tensor(codes))  # (N, S, S, 3) uint8, in fp32
        pngs = [png_bytes(p) for p in pixels]
        logprobs = [float(sum(h.token_scores[:self.grid_length])) for h in hs]
        images = [{"png": base64.b64encode(png).decode(), "logprob": lp} for png, lp in zip(pngs, logprobs,
                                                                                             strict=True)]
        if spec.rerank_task is not None:
            for image, score in zip(images, self._rerank_scores(spec, item, pngs), strict=True):
                image["itm_score"] = score
        if item.get("return_codes"):
            for image, c in zip(images, codes, strict=True):
                image["codes"] = c
        images.sort(key=lambda im: (-im.get("itm_score", 0.0), -im["logprob"]))
        for rank, image in enumerate(images, 1):
            image["rank"] = rank
        return {"images": images, "width": int(pixels.shape[2]), "height": int(pixels.shape[1])}

    def _rerank_scores(self, spec: TaskSpec, item: Mapping[str, Any], pngs: list[bytes]) -> list[float]:
        """P(first label) of `spec.rerank_task` (itm: " yes" against " no") for each PNG with the input's slot
        fields (the caption), through the model's own preprocessing and candidate scoring."""
        task = self.tasks[spec.rerank_task]
        reqs = self._rerank_requests(spec, item, pngs)
        scores: list[float] = []
        for lo in range(0, len(reqs), self.max_batch_size):
            outs = self._run(task, "allcand", task.generation, reqs[lo:lo + self.max_batch_size])
            scores += [o["scores"][task.labels[0]] for o in outs]
        return scores

    def _rerank_requests(self, spec: TaskSpec, item: Mapping[str, Any], pngs: list[bytes]) -> list[InferenceRequest]:
        """The ranking task's requests for an input's images; an InputError when its text cannot be asked (a
        caption that its normalisation empties, e.g. "!!!")."""
        task = self.tasks[spec.rerank_task]
        fields = {col: item[col] for _, col in spec.slots}
        return [inference_request(task, {**fields, task.image_field: png}, self.vocab, self.preprocess, "allcand")
                for png in pngs]

    def _candidates(self, spec: TaskSpec, reqs: list[InferenceRequest], enc) -> list[dict]:
        scores = score_candidates(self.model, enc, [r.candidate_tokens for r in reqs], ids=self.ids,
                                  prefix_tokens=[r.prefix for r in reqs], restrict_to_candidates=True)
        return [_ranked(spec.answer_key, r.candidates, torch.tensor(s)) for r, s in zip(reqs, scores, strict=True)]

    def _last_token(self, spec: TaskSpec, reqs: list[InferenceRequest], src: torch.Tensor, enc) -> list[dict]:
        logits = self.model.decode(src, enc)  # decoder reads the whole source (OFA prompt_type "src")
        last = src.ne(self.vocab.pad_id).sum(1) - 1
        out = []
        for row, r in enumerate(reqs):
            ids = [t[0] for t in r.candidate_tokens]
            out.append(_ranked(spec.answer_key, r.candidates, logits[row, last[row], ids].float()))
        return out


@functools.cache
def _probe_png() -> bytes:
    """A small white PNG: stands in for a generated image when checking an input's ranking question early."""
    return png_bytes(np.full((16, 16, 3), 255, dtype=np.uint8))


def _ranked(key: str, candidates: list[str], logp: torch.Tensor) -> dict:
    probs = logp.log_softmax(-1).exp()
    best = int(probs.argmax())
    return {key: candidates[best], "score": float(probs[best]),
            "scores": {c: float(p) for c, p in zip(candidates, probs, strict=True)}}
