"""Training losses with OFA's semantics.

`label_smoothed_nll` is OFA's `label_smoothed_nll_loss`:

* log-probabilities are taken after disallowed tokens are masked to -inf (`allowed`, when a task constrains its
  targets: VQA answers, entailment and GLUE labels, image codes), so the softmax runs over the allowed set only;
* they are scaled by the sample's confidence (`weights`: VQA answer confidence) before the loss;
* per token: `(1 - eps - eps_i) * nll + eps_i * smooth`, where `smooth` is minus the sum of the log-probabilities
  of the allowed tokens and `eps_i = eps / (n_allowed - 1)` (the whole vocabulary when unconstrained);
* after `drop_worst_ratio` is switched on (the trainer does so after `drop_worst_after` updates), the worst
  tokens of the batch (highest loss, pad excluded) are dropped and only the lowest `1 - ratio` fraction is kept.

The loss is a sum over the kept tokens; the trainer divides by the number of target tokens it reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ofa_model.generation import PrefixTrie
from ofa_model.tasks import text_target_tokens


@dataclass(frozen=True)
class LossOut:
    loss: torch.Tensor  # scalar: sum over kept tokens of the smoothed loss
    nll: torch.Tensor  # scalar: sum over kept tokens of the plain negative log-likelihood
    ntokens: int  # tokens kept (non-pad, after drop-worst)


def label_smoothed_nll(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    pad_id: int,
    epsilon: float = 0.0,
    weights: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    drop_worst_ratio: float = 0.0,
) -> LossOut:
    """Loss of `logits` (B, T, V) against `target` (B, T) (pad positions ignored).

    weights: (B,) per-sample confidence (or (B, T) per token), multiplies the log-probabilities. allowed: bool
    (V,) shared by every position, or (B, T, V) per position; the target must be allowed wherever it is not pad.
    The trainer passes only the target positions, as (1, N, V) logits and (1, N) targets: the same loss
    without the full-vocabulary softmax of pad positions.
    """
    if logits.ndim != 3 or target.shape != logits.shape[:2]:
        raise ValueError(f"logits (B, T, V) and target (B, T) expected, got {tuple(logits.shape)} / "
                         f"{tuple(target.shape)}")
    if not 0.0 <= epsilon < 1.0 or not 0.0 <= drop_worst_ratio < 1.0:
        raise ValueError(f"need 0 <= epsilon < 1 and 0 <= drop_worst_ratio < 1, got {epsilon}, {drop_worst_ratio}")
    logits = logits.float()
    vocab = logits.shape[-1]
    if allowed is not None:
        allowed = allowed.to(device=logits.device, dtype=torch.bool)
        if allowed.shape not in ((vocab,), logits.shape):
            raise ValueError(f"allowed must be (V,) or (B, T, V), got {tuple(allowed.shape)}")
        logits = logits.masked_fill(~allowed, float("-inf"))
    lprobs = logits.log_softmax(-1)  # (B, T, V)
    if weights is not None:
        w = weights.to(lprobs)
        lprobs = lprobs * (w.unsqueeze(-1) if w.shape == target.shape else w.view(-1, 1, 1))

    keep = target.ne(pad_id)  # (B, T)
    tgt = target.masked_fill(~keep, 0)
    nll = -lprobs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (B, T)
    if allowed is None:
        smooth = -lprobs.sum(-1)
        n_allowed = torch.full_like(smooth, float(vocab))
    else:
        smooth = -lprobs.masked_fill(~allowed, 0.0).sum(-1)
        n_allowed = allowed.sum(-1).to(smooth).expand_as(smooth)
    eps_i = epsilon / (n_allowed - 1).clamp_min(1.0)
    loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth  # (B, T)

    loss, nll = loss[keep], nll[keep]  # (N,) tokens of the batch
    if not torch.isfinite(loss).all():
        raise ValueError("a target token is not in the allowed set (its log-probability is -inf)")
    if drop_worst_ratio > 0.0 and loss.numel() > 0:
        k = int(loss.numel() * (1.0 - drop_worst_ratio))
        loss, idx = torch.topk(loss, k, largest=False)
        nll = nll[idx]
    return LossOut(loss.sum(), nll.sum(), int(loss.numel()))


def target_constraints(spec, vocab, pcfg, target: torch.Tensor, answers: tuple[str, ...] | list[str] = ()
                       ) -> torch.Tensor | None:
    """The tokens the loss's softmax runs over, as OFA trains each task (None: the whole vocabulary).

    * image codes (`spec.code_target`): the code tokens and the four specials, shared by every position (V,);
    * a closed answer set (`answers`, else the task's labels): at each target position the tokens a trie of the
      answers allows after the answer's prefix so far, (B, T, V). A row whose target is not one of the answers
      (it leaves the trie) keeps the whole vocabulary rather than an impossible constraint;
    * anything else (captions, boxes, free text): None.
    """
    vocab_size = len(vocab)
    if spec.code_target:
        lo, hi = vocab.code_range
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        allowed[lo:hi] = True
        allowed[: 4] = True  # <s> <pad> </s> <unk>
        return allowed
    cands = list(answers) or list(spec.labels)
    if not cands or spec.target_kind not in ("text", "label"):
        return None
    text_spec = spec.replace(target_kind="text")
    trie = PrefixTrie([text_target_tokens(text_spec, c, vocab, pcfg) for c in cands], vocab.eos_id)
    b_, t_ = target.shape
    allowed = torch.ones(b_, t_, vocab_size, dtype=torch.bool)
    rows = target.tolist()
    for b, row in enumerate(rows):
        real = [i for i, tok in enumerate(row) if tok != vocab.pad_id]
        if not real:
            continue
        start, end = real[0], real[-1] + 1  # the answer; the batch's right padding after it is not part of it
        answer = row[start:end]
        per_pos = [trie.allowed(answer[:j]) for j in range(len(answer))]
        if any(answer[j] not in per_pos[j] for j in range(len(answer))):
            continue  # not one of the answers: unconstrained
        for j, toks in enumerate(per_pos):
            allowed[b, start + j] = False
            allowed[b, start + j, toks] = True
    return allowed


def mixture_constraints(specs: list, vocab, pcfg, target: torch.Tensor, answers: list[tuple[str, ...]]
                        ) -> torch.Tensor | None:
    """`target_constraints` row by row for a batch of several tasks: row i trains under the rule of its own
    task `specs[i]` with its closed answer set `answers[i]` (empty: the task's labels), exactly as it would in a
    batch of that task alone. (B, T, V), True everywhere in rows without a constraint; None when no row has one.
    """
    if len(specs) != target.shape[0] or len(answers) != target.shape[0]:
        raise ValueError(f"{target.shape[0]} target rows but {len(specs)} specs and {len(answers)} answer sets")
    groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for i, (spec, ans) in enumerate(zip(specs, answers, strict=True)):
        groups.setdefault((spec.name, tuple(ans)), []).append(i)
    allowed = None
    for (_, ans), rows in groups.items():
        part = target_constraints(specs[rows[0]], vocab, pcfg, target[rows], ans)
        if part is None:
            continue
        if allowed is None:
            allowed = torch.ones(*target.shape, len(vocab), dtype=torch.bool)
        allowed[rows] = part if part.ndim == 3 else part.expand(len(rows), target.shape[1], -1)
    return allowed
