"""One training step, in two parts: the forward pass and its loss on a batch, and the optimizer update.

The worker loop (`pipelines.train.worker`) calls `forward_loss` on every micro-batch and `optimizer_step` every
`optim.grad_accum` of them; `Learner` is the model with everything an update changes (what a checkpoint saves).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ofa_model import OFAModel
from ofa_model.losses import (
    allowed_columns,
    answer_columns,
    label_smoothed_nll,
    mixture_constraints,
    target_constraints,
)
from ofa_model.precision import Execution
from ofa_model.scst import CiderD, scst_loss
from ofa_model.tasks import TaskSpec
from ofa_model.vocab import Vocabulary
from pipelines.data.shards import iter_rows
from pipelines.train.optim import Ema
from pipelines.train.train_config import TrainConfig


@dataclass
class Learner:
    """The model and everything an update changes; a checkpoint saves all of it (`state_dict`)."""

    model: torch.nn.Module  # DDP-wrapped on several workers
    raw: OFAModel  # the model itself
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Ema | None
    scaler: torch.amp.GradScaler
    step: int = 0  # optimizer updates so far in the run
    metrics: dict = field(default_factory=dict)  # the latest epoch's: mid-epoch checkpoints carry them (best-N)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "scaler": self.scaler.state_dict(), "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A checkpoint's state (the model's weights are loaded before it is wrapped; see the worker)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        self.metrics = dict(state["metrics"])


def forward_loss(cfg: TrainConfig, learner: Learner, execution: Execution, vocab: Vocabulary,
                 specs: Mapping[str, TaskSpec], batch: dict, scst: tuple | None) -> Any:
    """The summed loss of a batch (`.loss`, `.ntokens`; `.nll`, or `.mean_reward` under self-critical training).

    Cross-entropy: logits at the target positions only (the vocabulary projection dominates the step) and,
    under a constraint, only at the columns it allows: the same loss and gradients. Self-critical (`scst`: the
    references and CIDEr-D of `scst_setup`): the CIDEr-D reward of the model's own hypotheses."""
    model, raw = learner.model, learner.raw
    with execution.autocast():
        if scst is not None:
            refs, cider = scst
            return scst_loss(raw, batch, [refs[i] for i in batch["ids"]], cider, vocab, samples=cfg.scst.samples,
                             sampling=cfg.scst.sampling, max_len_b=cfg.scst.max_len_b,
                             no_repeat_ngram_size=cfg.scst.no_repeat_ngram_size, seed=cfg.seed + learner.step,
                             train_model=model)
        code_masks = batch["code_masks"] if bool(batch["code_masks"].any()) else None
        hidden = model(batch["src_tokens"], batch.get("patch_images"), batch.get("patch_masks"),
                       batch["prev_output_tokens"], code_masks, features_only=True)  # (B, T, D)
        keep = batch["target"].ne(vocab.pad_id)  # (B, T)
        index, allowed, target = loss_targets(cfg, vocab, specs, batch, keep, hidden.device)
        logits = raw.decoder.project(hidden[keep], columns=index)  # (N, C|V)
    ratio = cfg.optim.drop_worst_ratio if learner.step >= cfg.optim.drop_worst_after else 0.0
    weights = batch["target_weights"].unsqueeze(1).expand_as(keep)[keep].unsqueeze(0)  # (1, N)
    if allowed is not None and allowed.ndim == 2:
        allowed = allowed.unsqueeze(0)  # (1, N, C|V)
    return label_smoothed_nll(logits.unsqueeze(0), target.unsqueeze(0), pad_id=-1,  # no pad among them
                              epsilon=cfg.optim.label_smoothing, weights=weights, allowed=allowed,
                              drop_worst_ratio=ratio)


def optimizer_step(learner: Learner, clip_norm: float) -> float:
    """One update from the accumulated gradients (clipped to `clip_norm`, 0: not clipped); the gradient norm."""
    learner.scaler.unscale_(learner.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(learner.raw.parameters(), clip_norm if clip_norm else float("inf"))
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    learner.optimizer.zero_grad(set_to_none=True)
    learner.scheduler.step()
    if learner.ema is not None:
        learner.ema.update(learner.raw)
    learner.step += 1
    return float(grad_norm)


def loss_targets(cfg: TrainConfig, vocab: Vocabulary, specs: Mapping[str, TaskSpec], batch: dict,
                 keep: torch.Tensor, device: torch.device
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """What the loss reads of a batch's real target tokens (N,): the vocabulary columns to project onto (None:
    all), the mask of allowed tokens at them ((C|V,) or (N, C|V); None: unconstrained) and the targets as
    positions into those columns. Each row trains under its own task's constraint (a mixture's rows as in a
    batch of their task alone): its closed answer set, else its task's labels, else codes or none."""
    tasks = batch["tasks"] if cfg.mixture else [cfg.task] * batch["target"].shape[0]
    row_specs = [specs[t] for t in tasks]
    sets = cfg.answer_sets()  # the main task's answers, the mixture's labels
    answers = [sets.get(t, ()) for t in tasks]
    columns = answer_columns(row_specs, vocab, cfg.data.preprocess, batch["target"].cpu(), answers)
    if columns is None:  # codes, free text or an answer outside its set: the masks, and their columns
        if cfg.mixture:
            allowed = mixture_constraints(row_specs, vocab, cfg.data.preprocess, batch["target"], answers)
        else:
            allowed = target_constraints(row_specs[0], vocab, cfg.data.preprocess, batch["target"],
                                         sets.get(cfg.task, ()))
        target = batch["target"][keep]
        if allowed is not None:
            allowed = allowed.to(device)[keep] if allowed.ndim == 3 else allowed.to(device)  # (N|, V)
        columns = allowed_columns(allowed, target, len(vocab))
        if columns is None:
            return None, allowed, target
    index, allowed, target = columns
    return index.to(device), allowed.to(device), target.to(device)


def scst_setup(cfg: TrainConfig) -> tuple[dict[str, list[str]], CiderD]:
    """References of the training split's rows by id, and CIDEr-D with their document frequencies."""
    refs: dict[str, list[str]] = {}
    for row in iter_rows(cfg.data.uri, s3=cfg.data.s3, columns=["id", "target", "targets"],
                         splits=list(cfg.data.splits), tasks=[cfg.task]):
        captions = list(row["targets"] or []) or ([row["target"]] if row["target"] else [])
        if captions:
            refs[row["id"]] = captions
    if not refs:
        raise ValueError(f"scst: no references in {cfg.data.uri} for task {cfg.task} in {cfg.data.splits}")
    return refs, CiderD(refs.values())
