"""OFAPredictor: the one inference path, used by evaluation jobs and by Ray Serve alike.

Inputs are plain data (image bytes, text, candidate lists, decoding overrides); outputs are
JSON-ready dicts. A bad input yields an `{"error": {...}}` entry in its place; the rest of the
batch is still answered.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ofa_model.checkpoint import load_bundle
from ofa_model.generation import GenerationConfig, SpecialIds, generate, score_candidates
from ofa_model.model import OFAModel
from ofa_model.preprocess import ImageError, PreprocessConfig, pad_sequences
from ofa_model.tasks import (
    TASKS,
    InferenceRequest,
    TaskInputError,
    TaskSpec,
    inference_request,
    parse_instruction,
    parse_output,
)

log = logging.getLogger(__name__)

MODES = ("open", "trie", "allcand")  # VQA: open-ended beam, trie-constrained beam, all-candidate scoring
_GEN_FIELDS = {f.name for f in dataclasses.fields(GenerationConfig)}


class OFAPredictor:
    """Batched inference over any task of `TASKS` (or a custom TaskSpec)."""

    def __init__(self, model: OFAModel, vocab, preprocess: PreprocessConfig, *, device: str | torch.device = "cpu",
                 tasks: Mapping[str, TaskSpec] | None = None, max_batch_size: int = 16):
        # Process-wide CPU settings (e.g. torch.set_flush_denormal(True), which bench/model.py shows matters
        # after fine-tuning) belong to the process owner: the serving replica or the job entry point.
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.vocab, self.preprocess = vocab, preprocess
        self.tasks = dict(TASKS if tasks is None else tasks)
        self.max_batch_size = max_batch_size
        self.ids = SpecialIds.of(vocab)

    @classmethod
    def from_bundle(cls, path: str | Path, device: str | torch.device = "cpu", **kw) -> OFAPredictor:
        b = load_bundle(path, device=device)
        pcfg = PreprocessConfig.from_dict(b.preprocess) if b.preprocess else PreprocessConfig()
        tasks = dict(TASKS)
        for name, line in (b.metadata.get("custom_tasks") or {}).items():  # tasks declared at training time
            tasks[name] = parse_instruction(line, name)
        return cls(b.model, b.vocab, pcfg, device=device, tasks=tasks, **kw)

    def predict(self, task: str | TaskSpec, inputs: Sequence[Mapping[str, Any]]) -> list[dict]:
        """One JSON-ready result per input, in order."""
        spec = task if isinstance(task, TaskSpec) else self.tasks.get(task)
        if spec is None:
            raise ValueError(f"unknown task {task!r}; known: {sorted(self.tasks)}")
        results: list[dict | None] = [None] * len(inputs)
        groups: dict[tuple, list[tuple[int, InferenceRequest]]] = {}
        for i, item in enumerate(inputs):
            try:
                mode, gen = self._options(spec, item)
                req = inference_request(spec, item, self.vocab, self.preprocess, mode)
            except (TaskInputError, ImageError, ValueError, TypeError) as e:
                results[i] = {"error": {"type": type(e).__name__, "message": str(e)}}
                continue
            groups.setdefault((mode, gen), []).append((i, req))
        for (mode, gen), items in groups.items():
            for lo in range(0, len(items), self.max_batch_size):
                chunk = items[lo:lo + self.max_batch_size]
                for (i, _), out in zip(chunk, self._run(spec, mode, gen, [r for _, r in chunk]), strict=True):
                    results[i] = out
        return results  # type: ignore[return-value]

    def _options(self, spec: TaskSpec, item: Mapping[str, Any]) -> tuple[str, GenerationConfig]:
        if not isinstance(item, Mapping):
            raise TaskInputError(f"an input must be an object of fields, got {type(item).__name__}")
        mode = item.get("mode") or ("allcand" if spec.inference == "candidates" else "open")
        if mode not in MODES:
            raise TaskInputError(f"mode {mode!r} is not one of {MODES}")
        overrides = item.get("decoding") or {}
        if not isinstance(overrides, Mapping):
            raise TaskInputError("'decoding' must be an object of generation settings")
        unknown = sorted(set(overrides) - _GEN_FIELDS)
        if unknown:
            raise TaskInputError(f"unknown decoding settings {unknown}; known: {sorted(_GEN_FIELDS)}")
        try:  # GenerationConfig checks types and bounds
            gen = dataclasses.replace(spec.generation, **overrides) if overrides else spec.generation
        except ValueError as e:
            raise TaskInputError(f"bad decoding settings: {e}") from e
        return mode, gen

    @torch.no_grad()
    def _run(self, spec: TaskSpec, mode: str, gen: GenerationConfig, reqs: list[InferenceRequest]) -> list[dict]:
        dev, pad = self.device, self.vocab.pad_id
        src = pad_sequences([r.source for r in reqs], pad).to(dev)
        images = masks = None
        if reqs[0].image is not None:
            images = torch.stack([r.image for r in reqs]).to(dev)
            masks = torch.ones(len(reqs), dtype=torch.bool, device=dev)
        enc = self.model.encode(src, images, masks)
        if spec.inference == "last_token":
            return self._last_token(reqs, src, enc)
        if spec.inference == "candidates" or mode == "allcand":
            return self._candidates(spec, reqs, enc)
        code_masks = torch.full((len(reqs),), spec.code_target, device=dev) if spec.code_target else None
        hyps = generate(self.model, src, cfg=gen, ids=self.ids, encoder_out=enc,
                        prefix_tokens=[r.prefix for r in reqs], constraints=[r.constraint for r in reqs],
                        code_masks=code_masks)
        out = []
        for req, hs in zip(reqs, hyps, strict=True):
            if not hs:
                out.append({"error": {"type": "NoHypothesis", "message": "decoding produced no hypothesis"}})
                continue
            res = parse_output(spec, hs[0].tokens, self.vocab, req, self.preprocess)
            res["score"] = hs[0].score
            if gen.num_return_sequences > 1:
                res["alternatives"] = [{**parse_output(spec, h.tokens, self.vocab, req, self.preprocess),
                                        "score": h.score} for h in hs[1:]]
            out.append(res)
        return out

    def _candidates(self, spec: TaskSpec, reqs: list[InferenceRequest], enc) -> list[dict]:
        scores = score_candidates(self.model, enc, [r.candidate_tokens for r in reqs], ids=self.ids,
                                  prefix_tokens=[r.prefix for r in reqs], restrict_to_candidates=True)
        key = "answer" if spec.metric == "vqa" else "label"
        return [_ranked(key, r.candidates, torch.tensor(s)) for r, s in zip(reqs, scores, strict=True)]

    def _last_token(self, reqs: list[InferenceRequest], src: torch.Tensor, enc) -> list[dict]:
        logits = self.model.decode(src, enc)  # decoder reads the whole source (OFA prompt_type "src")
        last = src.ne(self.vocab.pad_id).sum(1) - 1
        out = []
        for row, r in enumerate(reqs):
            ids = [t[0] for t in r.candidate_tokens]
            out.append(_ranked("label", r.candidates, logits[row, last[row], ids].float()))
        return out


def _ranked(key: str, candidates: list[str], logp: torch.Tensor) -> dict:
    probs = logp.log_softmax(-1).exp()
    best = int(probs.argmax())
    return {key: candidates[best], "score": float(probs[best]),
            "scores": {c: float(p) for c, p in zip(candidates, probs, strict=True)}}
