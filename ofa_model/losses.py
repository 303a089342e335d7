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


def allowed_columns(allowed: torch.Tensor | None, target: torch.Tensor, vocab_size: int, max_share: float = 0.5
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The vocabulary columns a constrained loss can read: the union of the allowed sets of the N target tokens.

    allowed: (V,) or (N, V) for target (N,) (real tokens only, no pad). Every other column is masked to -inf
    before the softmax, so it adds nothing to the loss and receives no gradient: `label_smoothed_nll` of the
    logits of these columns alone, with the returned mask and target, is the same loss with the same gradients,
    and the projection costs C/V of the whole vocabulary's (13 answers of easy-VQA: 15 of 59457 columns).

    Returns (columns (C,) ascending, allowed (C,) or (N, C), target as positions into columns (N,)), or None
    when there is no constraint, the union is over `max_share` of the vocabulary, or a target lies outside it
    (the full loss then says so).
    """
    if allowed is None:
        return None
    union = allowed if allowed.ndim == 1 else allowed.any(0)
    columns = union.nonzero().squeeze(1)
    if columns.numel() > max_share * vocab_size:
        return None
    position = torch.full((vocab_size,), -1, dtype=torch.long, device=target.device)
    position[columns.to(target.device)] = torch.arange(columns.numel(), device=target.device)
    sub_target = position[target]
    if bool((sub_target < 0).any()):
        return None
    return columns, allowed[..., columns], sub_target


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
    trie = _answer_trie(spec, cands, vocab, pcfg)
    b_, t_ = target.shape
    allowed = torch.ones(b_, t_, vocab_size, dtype=torch.bool)
    for b, row in enumerate(target.tolist()):
        start, per_pos = _answer_positions(trie, row, vocab.pad_id)
        for j, toks in enumerate(per_pos or ()):  # None: not one of the answers, unconstrained
            allowed[b, start + j] = False
            allowed[b, start + j, toks] = True
    return allowed


def _answer_trie(spec, cands: list[str], vocab, pcfg) -> PrefixTrie:
    text_spec = spec.replace(target_kind="text")
    return PrefixTrie([text_target_tokens(text_spec, c, vocab, pcfg) for c in cands], vocab.eos_id)


def _answer_positions(trie: PrefixTrie, row: list[int], pad_id: int) -> tuple[int, list[list[int]] | None]:
    """Where a target row's answer starts, and the tokens the trie allows at each of its positions ([] for a
    row of padding; None when the answer leaves the trie)."""
    real = [i for i, tok in enumerate(row) if tok != pad_id]
    if not real:
        return 0, []
    start, end = real[0], real[-1] + 1  # the answer; the batch's right padding after it is not part of it
    answer = row[start:end]
    per_pos = [trie.allowed(answer[:j]) for j in range(len(answer))]
    if any(answer[j] not in per_pos[j] for j in range(len(answer))):
        return start, None
    return start, per_pos


def answer_columns(specs: list, vocab, pcfg, target: torch.Tensor, answers: list[tuple[str, ...]],
                   max_share: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`allowed_columns` of `mixture_constraints(specs, ...)` at the target's real tokens, built from the answer
    tries directly: the (B, T, V) masks cost more than the constrained step's projection. For a batch whose
    every row trains under a closed answer set (its `answers`, else its task's labels); None when a row does not
    (image codes, free text, an answer outside its set): then build the masks.
    """
    tries: dict[tuple[str, tuple[str, ...]], PrefixTrie] = {}
    per_token: list[list[int]] = []  # allowed tokens of each real target token, row-major as target[keep]
    for spec, ans, row in zip(specs, answers, target.tolist(), strict=True):
        cands = tuple(ans) or tuple(spec.labels)
        if spec.code_target or not cands or spec.target_kind not in ("text", "label"):
            return None
        key = (spec.name, cands)
        if key not in tries:
            tries[key] = _answer_trie(spec, list(cands), vocab, pcfg)
        _, per_pos = _answer_positions(tries[key], row, vocab.pad_id)
        if per_pos is None:
            return None
        per_token.extend(per_pos)
    columns = sorted({tok for toks in per_token for tok in toks})
    if len(columns) > max_share * len(vocab):
        return None
    where = {tok: j for j, tok in enumerate(columns)}
    allowed = torch.zeros(len(per_token), len(columns), dtype=torch.bool)
    for n, toks in enumerate(per_token):
        allowed[n, [where[t] for t in toks]] = True
    sub_target = torch.tensor([where[t] for t in target[target.ne(vocab.pad_id)].tolist()], dtype=torch.long)
    return torch.tensor(columns, dtype=torch.long), allowed, sub_target


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
