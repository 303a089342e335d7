"""Batched decoding for OFA: greedy, beam search, sampling, constraints and candidate scoring.

All searches run the encoder once and the decoder incrementally with its KV cache. Constraints
mask the logits before the softmax (the distribution is renormalised over allowed tokens):
- `PrefixTrie`: only continuations of allowed target sequences (VQA answer lists, label sets);
- `allowed_ranges`: only token ids in the given [start, end) ranges (bins for grounding, codes
  for image generation), EOS always allowed;
- `ordered_box`: a box x0 y0 x1 y1 of location tokens with x1 > x0 and y1 > y0 (ids ascend with
  bins). Without it a model emits what it finds likely at each position: one that has not learnt to
  locate repeats its favourite bin, and a box with x1 == x0 has no area (IoU 0 with any box).
Length limits, <pad> and n-gram blocking only forbid tokens after the softmax, as OFA's
generator does; like it, nothing else is banned (<s> may be generated; it decodes to nothing).
Scores are sums of log-probabilities of the generated tokens (a forced prefix is not scored),
divided by length ** length_penalty when `normalize_scores`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ofa_model.errors import BAD_SETTING, ConfigError, check_value
from ofa_model.model import DecoderState, EncoderOut

MAX_BEAM = 64
MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; `beam_size=1` without sampling is greedy search.

    Every field is checked against its type and a finite range (`_BOUNDS`) on construction, so no setting can
    fail inside decoding; a bad one raises `ConfigError` (an `InputError`) with reason "bad_setting".
    """

    beam_size: int = 5
    max_len_a: float = 0.0  # max new tokens = max_len_a * source length + max_len_b
    max_len_b: int = 200
    min_len: int = 1  # EOS is banned before this many tokens
    length_penalty: float = 1.0
    normalize_scores: bool = True
    no_repeat_ngram_size: int = 0
    sampling: bool = False
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    temperature: float = 1.0
    num_return_sequences: int = 1
    seed: int | None = None  # sampling seed; None draws from torch's global generator

    def __post_init__(self) -> None:
        for name, (kind, lo, hi) in _BOUNDS.items():
            value = getattr(self, name)
            if value is None and name == "seed":
                continue
            check_value(f"GenerationConfig.{name}", value, kind, lo, hi, reason=BAD_SETTING)
            if kind is float:
                object.__setattr__(self, name, float(value))
        if not self.sampling and self.num_return_sequences > self.beam_size:
            raise ConfigError(f"GenerationConfig.num_return_sequences={self.num_return_sequences} > "
                             f"beam_size={self.beam_size}", BAD_SETTING)


# Every field's type and inclusive range: finite, and small enough that no step of decoding overflows
# (length ** length_penalty, logits / temperature, int(max_len_a * length), torch's 64-bit seed).
_BOUNDS: dict[str, tuple[type, float | None, float | None]] = {
    "beam_size": (int, 1, MAX_BEAM),
    "max_len_a": (float, 0.0, 10.0),
    "max_len_b": (int, 0, MAX_NEW_TOKENS),
    "min_len": (int, 0, MAX_NEW_TOKENS),
    "length_penalty": (float, -10.0, 10.0),
    "normalize_scores": (bool, None, None),
    "no_repeat_ngram_size": (int, 0, MAX_NEW_TOKENS),
    "sampling": (bool, None, None),
    "top_k": (int, 0, 1_000_000),
    "top_p": (float, 1e-6, 1.0),
    "temperature": (float, 0.01, 100.0),
    "num_return_sequences": (int, 1, MAX_BEAM),
    "seed": (int, 0, 2**63 - 1),
}


class PrefixTrie:
    """A prefix tree over allowed target token sequences (each implicitly ends with EOS)."""

    def __init__(self, sequences: Sequence[Sequence[int]], eos_id: int):
        self.eos_id = eos_id
        self.root: dict[int, dict] = {}
        for seq in sequences:
            node = self.root
            for tok in [*seq, eos_id]:
                node = node.setdefault(int(tok), {})

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that may follow `prefix`; [] when `prefix` leaves the trie."""
        node = self.root
        for tok in prefix:
            node = node.get(int(tok))
            if node is None:
                return []
        return list(node)


@dataclass(frozen=True)
class Constraint:
    """What a target may contain: a trie of whole sequences and/or token-id ranges (EOS always allowed), and
    for a box (`ordered_box`) the order of its 4 location tokens: x1 above x0, y1 above y0."""

    trie: PrefixTrie | None = None
    allowed_ranges: tuple[tuple[int, int], ...] = ()
    ordered_box: bool = False

    def __post_init__(self) -> None:
        if self.ordered_box and not self.allowed_ranges:  # the order is among location ids, never the vocabulary
            raise ValueError("Constraint: ordered_box needs allowed_ranges (the location-token range)")


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens after BOS and any prefix, without EOS
    score: float  # (normalised) log-probability
    token_scores: list[float] = field(default_factory=list)  # per generated token, EOS included


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    pad: int
    eos: int

    @classmethod
    def of(cls, vocab) -> SpecialIds:
        return cls(vocab.bos_id, vocab.pad_id, vocab.eos_id)


def _constraint_list(constraints, n: int) -> list[Constraint | None]:
    if constraints is None or isinstance(constraints, Constraint):
        return [constraints] * n
    constraints = list(constraints)
    if len(constraints) != n:
        raise ValueError(f"{len(constraints)} constraints for a batch of {n}")
    return constraints


class _Stepper:
    """Turns decoder logits into constrained log-probabilities for one decoding step."""

    def __init__(self, cfg: GenerationConfig, ids: SpecialIds, vocab_size: int, max_len: int):
        self.cfg, self.ids, self.vocab_size, self.max_len = cfg, ids, vocab_size, max_len
        self._range_masks: dict[tuple, torch.Tensor] = {}

    def _range_mask(self, ranges: tuple[tuple[int, int], ...], device) -> torch.Tensor:
        if ranges not in self._range_masks:
            m = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
            for a, b in ranges:
                m[a:b] = True
            m[self.ids.eos] = True
            self._range_masks[ranges] = m
        return self._range_masks[ranges]

    def _order_box(self, allowed: torch.Tensor, generated: list[int]) -> None:
        """In place on one row's allowed mask (V,): x1 > x0 and y1 > y0 for a box generated as x0 y0 x1 y1
        (location ids ascend with their bins). x0 and y0 lose the largest id still allowed, so x1 and y1 always
        have one above them. EOS keeps its status; tokens after the box are not constrained."""
        eos = bool(allowed[self.ids.eos])
        n = len(generated)
        if n < 2:  # x0 or y0
            allowed[self.ids.eos] = False
            ids = allowed.nonzero()
            if ids.numel():
                allowed[ids[-1, 0]] = False
        elif n < 4:  # x1 after x0, y1 after y0
            allowed[: generated[n - 2] + 1] = False
        allowed[self.ids.eos] = eos

    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, gen_start: int, step: int,
                 constraints: Sequence[Constraint | None]) -> torch.Tensor:
        """logits (R, V) for generated step `step`; tokens (R, t) so far, generation began at column gen_start."""
        cfg, ids = self.cfg, self.ids
        logits = logits.float()
        if cfg.temperature != 1.0:
            logits = logits / cfg.temperature
        constrained = any(c is not None for c in constraints)
        if constrained:
            allowed = torch.ones_like(logits, dtype=torch.bool)
            for r, c in enumerate(constraints):
                if c is None:
                    continue
                if c.allowed_ranges:
                    allowed[r] &= self._range_mask(c.allowed_ranges, logits.device)
                if c.trie is not None:
                    row = torch.zeros(self.vocab_size, dtype=torch.bool, device=logits.device)
                    nxt = c.trie.allowed(tokens[r, gen_start:].tolist())
                    row[nxt if nxt else [ids.eos]] = True
                    allowed[r] &= row
                if c.ordered_box:
                    self._order_box(allowed[r], tokens[r, gen_start:].tolist())
            logits = logits.masked_fill(~allowed, -math.inf)
        # Constraints renormalise the distribution; the rules below only forbid tokens, so scores
        # stay the model's own log-probabilities (as fairseq scores them).
        lp = torch.log_softmax(logits, dim=-1)
        lp[:, ids.pad] = -math.inf  # the only token always banned, as in OFA's generator
        eos_lp = lp[:, ids.eos].clone()
        if step < cfg.min_len:
            lp[:, ids.eos] = -math.inf
        if step >= self.max_len:
            eos = lp[:, ids.eos].clone()
            lp[:] = -math.inf
            lp[:, ids.eos] = torch.where(torch.isinf(eos), torch.zeros_like(eos), eos)  # always terminate
        n = cfg.no_repeat_ngram_size
        if n > 0 and tokens.shape[1] >= n:
            grams = tokens.unfold(1, n, 1)  # (R, G, n)
            hit = (grams[:, :, :-1] == tokens[:, None, tokens.shape[1] - n + 1:]).all(-1)  # (R, G)
            rows, g = hit.nonzero(as_tuple=True)
            lp[rows, grams[rows, g, -1]] = -math.inf
        if not constrained and self.vocab_size > 2 + tokens.shape[1]:
            return lp  # unconstrained, the bans (pad, EOS, one token per n-gram of the prefix) leave some tokens
        dead = torch.isinf(lp).all(-1)  # the rules left nothing (e.g. a trie allows only EOS before min_len)
        if bool(dead.any()):
            lp[dead, ids.eos] = torch.where(torch.isinf(eos_lp[dead]), torch.zeros_like(eos_lp[dead]), eos_lp[dead])
        return lp


def max_new_tokens(cfg: GenerationConfig, src_len: int, prefix_len: int, model) -> int:
    """The most tokens decoding may generate after <s> and the prefix (EOS aside): max_len_a * src_len + max_len_b,
    capped by the decoder's position table."""
    limit = model.config.max_target_positions + 1 - prefix_len  # the decoder has max_target_positions + 2 rows
    return max(0, min(int(cfg.max_len_a * src_len + cfg.max_len_b), limit))


@torch.no_grad()
def generate(model, src_tokens: torch.Tensor, patch_images: torch.Tensor | None = None,
             patch_masks: torch.Tensor | None = None, *, cfg: GenerationConfig, ids: SpecialIds,
             prefix_tokens: Sequence[Sequence[int]] | None = None, constraints=None,
             code_masks: torch.Tensor | None = None, encoder_out: EncoderOut | None = None) -> list[list[Hypothesis]]:
    """Decode a batch; returns per example up to `num_return_sequences` hypotheses, best first.

    src_tokens (B, L); patch_images (B, 3, H, W); patch_masks (B,); prefix_tokens: per example a
    forced decoder prefix after <s> (e.g. the question for VQA); constraints: one Constraint for
    all or a list per example; code_masks (B,) marks image-code targets.
    """
    b = src_tokens.shape[0]
    enc = encoder_out if encoder_out is not None else model.encode(src_tokens, patch_images, patch_masks)
    prefixes = [list(p) for p in prefix_tokens] if prefix_tokens is not None else [[] for _ in range(b)]
    cons = _constraint_list(constraints, b)
    out: list[list[Hypothesis] | None] = [None] * b
    # Rows with equal prefix length decode together, so positions line up without padding.
    for plen in sorted({len(p) for p in prefixes}):
        rows = [i for i in range(b) if len(prefixes[i]) == plen]
        idx = torch.tensor(rows, device=src_tokens.device)
        start = torch.tensor([[ids.bos] + prefixes[i] for i in rows], dtype=torch.long, device=src_tokens.device)
        cm = code_masks.index_select(0, idx) if code_masks is not None else None
        sub_enc = enc.index_select(idx) if len(rows) < b else enc
        max_len = max_new_tokens(cfg, src_tokens.shape[1], plen, model)
        stepper = _Stepper(cfg, ids, model.config.vocab_size, max_len)
        sub_cons = [cons[i] for i in rows]
        if cfg.sampling:
            res = _sample(model, sub_enc, start, cm, stepper, sub_cons)
        elif cfg.beam_size == 1:
            res = _greedy(model, sub_enc, start, cm, stepper, sub_cons)
        else:
            res = _beam(model, sub_enc, start, cm, stepper, sub_cons)
        for i, hyps in zip(rows, res, strict=True):
            out[i] = hyps
    return out  # type: ignore[return-value]


def _final_score(total: float, length: int, cfg: GenerationConfig) -> float:
    return total / (max(length, 1) ** cfg.length_penalty) if cfg.normalize_scores else total


def _run_free(model, enc: EncoderOut, start: torch.Tensor, code_masks, stepper: _Stepper, cons, pick):
    """Shared loop of greedy and sampling: one hypothesis per row; `pick(lprobs) -> (R,)` chooses tokens."""
    ids, cfg = stepper.ids, stepper.cfg
    r, gen_start = start.shape[0], start.shape[1]
    state, tokens = DecoderState(), start
    done = torch.zeros(r, dtype=torch.bool)
    scores: list[list[float]] = [[] for _ in range(r)]
    logits = model.decode(tokens, enc, state, code_masks)[:, -1]
    for step in range(stepper.max_len + 1):
        lp = stepper.logprobs(logits, tokens, gen_start, step, cons)
        nxt = pick(lp)
        nxt = torch.where(done.to(nxt.device), torch.full_like(nxt, ids.pad), nxt)
        chosen = lp.gather(1, nxt[:, None].clamp(min=0))[:, 0].tolist()
        for i in range(r):
            if not done[i]:
                scores[i].append(chosen[i])
        done |= (nxt == ids.eos).cpu()
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if bool(done.all()):
            break
        logits = model.decode(tokens, enc, state, code_masks)[:, -1]
    hyps = []
    for i in range(r):
        toks = [t for t in tokens[i, gen_start:].tolist() if t not in (ids.eos, ids.pad)]
        hyps.append(Hypothesis(toks, _final_score(sum(scores[i]), len(scores[i]), cfg), scores[i]))
    return hyps


def _greedy(model, enc, start, code_masks, stepper, cons) -> list[list[Hypothesis]]:
    return [[h] for h in _run_free(model, enc, start, code_masks, stepper, cons, lambda lp: lp.argmax(-1))]


def _sample(model, enc, start, code_masks, stepper, cons) -> list[list[Hypothesis]]:
    """`num_return_sequences` samples per example. With a seed, each example draws from its own generator seeded
    with it, so an example's samples do not depend on the examples decoded beside it."""
    cfg = stepper.cfg
    n = cfg.num_return_sequences
    gens = None
    if cfg.seed is not None:
        gens = [torch.Generator(device=start.device).manual_seed(cfg.seed) for _ in range(start.shape[0])]

    def pick(lp: torch.Tensor) -> torch.Tensor:
        lp = lp.clone()
        if cfg.top_k > 0:
            kth = lp.topk(min(cfg.top_k, lp.shape[-1]), dim=-1).values[:, -1:]
            lp[lp < kth] = -math.inf
        if cfg.top_p < 1.0:
            lp = lp.log_softmax(-1)  # renormalise over what top-k and the bans left
            sorted_lp, order = lp.sort(dim=-1, descending=True)
            cum = sorted_lp.exp().cumsum(-1)
            drop = cum - sorted_lp.exp() >= cfg.top_p  # keep the smallest prefix reaching top_p
            lp.scatter_(1, order, sorted_lp.masked_fill(drop, -math.inf))
        probs = lp.softmax(-1)
        if gens is None:
            return torch.multinomial(probs, 1)[:, 0]
        return torch.cat([torch.multinomial(probs[i * n:(i + 1) * n], 1, generator=g)[:, 0]
                          for i, g in enumerate(gens)])

    rep = torch.arange(start.shape[0], device=start.device).repeat_interleave(n)
    cm = code_masks.index_select(0, rep) if code_masks is not None else None
    flat = _run_free(model, enc.index_select(rep), start.index_select(0, rep), cm, stepper,
                     [cons[i] for i in rep.tolist()], pick)
    return [sorted(flat[i * n:(i + 1) * n], key=lambda h: -h.score) for i in range(start.shape[0])]


def _beam(model, enc: EncoderOut, start: torch.Tensor, code_masks, stepper: _Stepper, cons) -> list[list[Hypothesis]]:
    """Beam search as fairseq does it: 2K candidates per step, EOS among the top K finalises a
    hypothesis, a sentence is done when it has K finished hypotheses."""
    cfg, ids = stepper.cfg, stepper.ids
    k, n, gen_start, dev = cfg.beam_size, start.shape[0], start.shape[1], start.device
    alive = list(range(n))  # original sentence index of each active sentence
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]
    rep = torch.arange(n, device=dev).repeat_interleave(k)
    enc = enc.index_select(rep)
    cm = code_masks.index_select(0, rep) if code_masks is not None else None
    row_cons = [cons[i] for i in rep.tolist()]
    tokens = start.index_select(0, rep)  # (n*k, t)
    token_scores = torch.zeros(n * k, 0, device=dev)
    cum = torch.full((n, k), -math.inf, device=dev)
    cum[:, 0] = 0.0  # only the first beam expands at step 0 (all beams start identical)
    state = DecoderState()
    logits = model.decode(tokens, enc, state, cm)[:, -1]
    vocab = logits.shape[-1]
    for step in range(stepper.max_len + 1):
        m = len(alive)
        lp = stepper.logprobs(logits, tokens, gen_start, step, row_cons)  # (m*k, V)
        cand = (cum[:, :, None] + lp.view(m, k, vocab)).view(m, k * vocab)
        top_scores, top_idx = cand.topk(min(2 * k, k * vocab), dim=-1)  # (m, 2k)
        beam_of, tok_of = top_idx // vocab, top_idx % vocab
        next_rows, next_toks, next_cum = [], [], []
        keep_sent = []
        # One transfer per step: the bookkeeping below reads Python lists, never single tensor elements.
        score_rows, beam_rows, tok_rows = top_scores.tolist(), beam_of.tolist(), tok_of.tolist()
        for s in range(m):
            sent = alive[s]
            picked = 0
            for j, sc in enumerate(score_rows[s]):
                if sc == -math.inf:
                    break
                row = s * k + beam_rows[s][j]
                tok = tok_rows[s][j]
                if tok == ids.eos:
                    if j < k and len(finished[sent]) < k:
                        per_tok = token_scores[row].tolist() + [lp[row, tok].item()]
                        finished[sent].append(Hypothesis(tokens[row, gen_start:].tolist(),
                                                         _final_score(sc, step + 1, cfg), per_tok))
                    continue
                if picked < k:
                    next_rows.append(row)
                    next_toks.append(tok)
                    next_cum.append(sc)
                    picked += 1
            if len(finished[sent]) >= k or picked == 0:
                del next_rows[len(next_rows) - picked:]
                del next_toks[len(next_toks) - picked:]
                del next_cum[len(next_cum) - picked:]
                continue
            while picked < k:  # pad the beam with dead entries (never chosen again)
                next_rows.append(next_rows[-1])
                next_toks.append(next_toks[-1])
                next_cum.append(-math.inf)
                picked += 1
            keep_sent.append(s)
        if not keep_sent:
            break
        alive = [alive[s] for s in keep_sent]
        rows_t = torch.tensor(next_rows, device=dev)
        new_tok = torch.tensor(next_toks, device=dev)
        token_scores = torch.cat([token_scores.index_select(0, rows_t), lp[rows_t, new_tok][:, None]], dim=1)
        tokens = torch.cat([tokens.index_select(0, rows_t), new_tok[:, None]], dim=1)
        cum = torch.tensor(next_cum, device=dev).view(len(alive), k)
        state.reorder(rows_t)
        enc = enc.index_select(rows_t)
        cm = cm.index_select(0, rows_t) if cm is not None else None
        row_cons = [row_cons[r] for r in next_rows]
        logits = model.decode(tokens, enc, state, cm)[:, -1]
    return [sorted(f, key=lambda h: -h.score)[: cfg.num_return_sequences] for f in finished]


@torch.no_grad()
def score_candidates(model, encoder_out: EncoderOut, candidates: Sequence[Sequence[Sequence[int]]], *,
                     ids: SpecialIds, prefix_tokens: Sequence[Sequence[int]] | None = None,
                     restrict_to_candidates: bool = False, code_masks: torch.Tensor | None = None,
                     chunk_size: int = 64) -> list[list[float]]:
    """Log-probability of every candidate target (EOS appended) per example, teacher-forced.

    candidates[i] lists token sequences for example i of `encoder_out`, each scored after `<s>` and
    prefix_tokens[i]. With `restrict_to_candidates`, each step's softmax runs only over the tokens that continue
    some candidate of that example (OFA's trie-normalised all-candidate evaluation).

    The decoder runs each example's shared `<s> + prefix` once and then only each candidate's own tokens, from the
    prefix's KV cache (`DecoderState.select`): VQA's prompt puts the question in the prefix and its answers are
    one or two tokens, so this is a fraction of teacher-forcing every candidate whole, with the same numbers
    (tests/test_generation.py). Examples are grouped by prefix length (a cache holds no padding); `chunk_size`
    bounds the examples of one prefix pass and the candidates of one continuation pass.
    """
    prefixes = [list(p) for p in prefix_tokens] if prefix_tokens is not None else [[] for _ in candidates]
    tries = [PrefixTrie(c, ids.eos) for c in candidates] if restrict_to_candidates else None
    dev = encoder_out.hidden.device
    out: list[list[float]] = [[0.0] * len(c) for c in candidates]
    by_length: dict[int, list[int]] = {}
    for i, cands in enumerate(candidates):
        if len(cands):
            by_length.setdefault(len(prefixes[i]), []).append(i)
    for examples in by_length.values():
        for lo in range(0, len(examples), chunk_size):
            group = examples[lo:lo + chunk_size]
            idx = torch.tensor(group, device=dev)
            enc = encoder_out.index_select(idx)
            cm = code_masks.index_select(0, idx) if code_masks is not None else None
            prefix = torch.tensor([[ids.bos] + prefixes[i] for i in group], dtype=torch.long, device=dev)  # (G, P+1)
            state = DecoderState()
            last = model.decode(prefix, enc, state, cm, features_only=True)[:, -1]  # (G, D): predicts token 1
            pairs = [(g, i, k, list(c)) for g, i in enumerate(group) for k, c in enumerate(candidates[i])]
            for plo in range(0, len(pairs), chunk_size):
                chunk = pairs[plo:plo + chunk_size]
                for (_, i, k, _), score in zip(chunk, _continuations(model, enc, cm, state, prefix, last, chunk,
                                                                     tries, ids), strict=True):
                    out[i][k] = score
    return out


def _continuations(model, enc: EncoderOut, cm: torch.Tensor | None, state: DecoderState,
                   prefix: torch.Tensor, last: torch.Tensor, chunk: list[tuple[int, int, int, list[int]]],
                   tries: list[PrefixTrie] | None, ids: SpecialIds) -> list[float]:
    """Scores of `chunk`'s candidates (group row g, example i, candidate k, tokens) after their group's prefix:
    the prefix's last hidden state predicts each candidate's first token, one pass from the cache the rest and
    EOS."""
    dev = prefix.device
    rows = torch.tensor([g for g, *_ in chunk], device=dev)
    width = max(len(c) for *_, c in chunk)
    first = last.index_select(0, rows)  # (C, D)
    if width:
        tokens = torch.full((len(chunk), prefix.shape[1] + width), ids.pad, dtype=torch.long, device=dev)
        tokens[:, : prefix.shape[1]] = prefix.index_select(0, rows)
        for r, (*_, c) in enumerate(chunk):
            tokens[r, prefix.shape[1]: prefix.shape[1] + len(c)] = torch.tensor(c, dtype=torch.long)
        rest = model.decode(tokens, enc.index_select(rows), state.select(rows),
                            cm.index_select(0, rows) if cm is not None else None, features_only=True)  # (C, W, D)
        h = torch.cat([torch.cat([first[r:r + 1], rest[r, : len(c)]]) for r, (*_, c) in enumerate(chunk)])
    else:
        h = first
    targets = [tok for *_, c in chunk for tok in [*c, ids.eos]]
    if tries is None:
        logp = model.decoder.project(h).float().log_softmax(-1)
        tok_logp = logp.gather(1, torch.tensor(targets, device=dev)[:, None]).squeeze(1)
    else:
        tok_logp = _restricted_logp(model.decoder.output_projection.weight, h, [(i, c) for _, i, _, c in chunk], tries,
                                    targets)
    return [float(v.sum()) for v in torch.split(tok_logp, [len(c) + 1 for *_, c in chunk])]


def _restricted_logp(weight: torch.Tensor, h: torch.Tensor, chunk: list[tuple[int, list[int]]],
                     tries: list[PrefixTrie], targets: list[int]) -> torch.Tensor:
    """Log-probability of each target token under a softmax over only the tokens its trie allows there.

    Equal to masking the full-vocabulary logits to the allowed set, but projects onto the union of the
    allowed tokens (a handful for VQA, at most the candidates' vocabulary) instead of the whole vocabulary.
    """
    allowed = [tries[i].allowed(c[:t]) for i, c in chunk for t in range(len(c) + 1)]
    union = sorted({tok for a in allowed for tok in a})
    col = {tok: j for j, tok in enumerate(union)}
    valid = torch.zeros(len(allowed), len(union), dtype=torch.bool)
    for n, a in enumerate(allowed):
        valid[n, [col[tok] for tok in a]] = True
    pick = torch.tensor([col[tok] for tok in targets], device=h.device)
    logits = (h @ weight[torch.tensor(union, device=h.device)].T).float()  # (N, U)
    logp = logits.masked_fill(~valid.to(h.device), -math.inf).log_softmax(-1)
    return logp.gather(1, pick[:, None]).squeeze(1)
