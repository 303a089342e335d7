"""The update rule of training: AdamW, OFA's polynomial schedule with warmup, EMA weights, freezing.

Plain PyTorch (no Ray), so the pieces are tested on their own; `pipelines.train.worker` assembles them per worker.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipelines.train.train_config import OptimSection


def freeze(model: nn.Module, cfg: OptimSection) -> list[str]:
    """Turn off gradients of the token embedding (shared with the output projection) and/or the ResNet; returns
    the names of the frozen parameters."""
    frozen = []
    for name, p in model.named_parameters():
        if (cfg.freeze_embeddings and name.endswith("embed_tokens.weight")) or \
           (cfg.freeze_resnet and name.startswith("encoder.embed_images.")):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def build_optimizer(model: nn.Module, cfg: OptimSection, *, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay, as fairseq's `adam` that OFA trains with) over the trainable parameters,
    every one decayed as in OFA's recipes. `fused` None: the fused kernel on CPU and CUDA (bench/train.py measures
    it faster than foreach on CPU too), multi-tensor (foreach) elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    fused = all(p.device.type in ("cpu", "cuda") for p in params) if fused is None else fused
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused, foreach=None if fused else True)


def polynomial_lr(step: int, *, total: int, warmup: int, lr: float, end_lr: float, power: float) -> float:
    """Learning rate after `step` updates: linear warmup to `lr` over `warmup` updates, then polynomial decay
    to `end_lr` at `total` (and `end_lr` after)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if step >= total:
        return end_lr
    frac = 1.0 - (step - warmup) / max(1, total - warmup)
    return (lr - end_lr) * frac**power + end_lr


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimSection, total_updates: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR of `polynomial_lr` (as a factor of cfg.lr) over `total_updates` updates; the warm-up is
    cfg.warmup_updates when set, else cfg.warmup_ratio of them."""
    total = max(1, total_updates)
    warmup = cfg.warmup_updates if cfg.warmup_updates is not None else math.ceil(cfg.warmup_ratio * total)

    def factor(step: int) -> float:
        return polynomial_lr(step, total=total, warmup=warmup, lr=cfg.lr, end_lr=cfg.end_lr,
                             power=cfg.power) / cfg.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def move_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, position: int) -> None:
    """Put `scheduler` at `position` updates done, its optimizer's rates those of that position (a resumed run
    whose updates per epoch changed with its world size)."""
    scheduler.last_epoch = position
    rates = [base * factor(position) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = lr
    scheduler._last_lr = rates


class Ema:
    """Exponential moving average of a model's floating-point state (parameters and buffers), kept in fp32.

    `update` after every optimizer step: shadow = decay * shadow + (1 - decay) * current. `copy_to(model)`
    loads the averaged weights (for validation and the saved bundle)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                       if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v.to(state[k].dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not fit the model: keys differ {sorted(missing)[:5]}")
        self.decay = float(state["decay"])
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}
