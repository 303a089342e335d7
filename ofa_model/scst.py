"""Self-critical sequence training (caption stage 2), with OFA's CIDEr-D reward and leave-one-out baseline.

For every image, `samples` hypotheses come from beam search (all beams kept) or sampling, without gradients;
each gets the CIDEr-D reward against the image's references; its baseline is the mean reward of the image's
other hypotheses. The model then re-scores the hypotheses teacher-forced in training mode, and the loss is
`-sum_t log p(y_t) * (r - b)` over the hypotheses' tokens (end of sentence included).

`CiderD` takes its document frequencies from a fixed corpus of references (the training split's, as OFA's
`coco-train-words.p`), not from the batch, so one image's reward does not depend on its batch-mates. Text is
compared after OFA's caption normalisation (lower case, no punctuation).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ofa_model.generation import GenerationConfig, SpecialIds, generate
from ofa_model.preprocess import normalize_caption, pad_sequences

NGRAMS = 4
SIGMA = 6.0


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


class CiderD:
    """CIDEr-D (n = 1..4, sigma 6, clipped tf-idf, x10) with document frequencies from `corpus`: one entry per
    image, its reference captions."""

    def __init__(self, corpus: Iterable[Sequence[str]]):
        self.doc_freq: Counter = Counter()
        num = 0
        for refs in corpus:
            num += 1
            self.doc_freq.update({g for r in refs for n in range(1, NGRAMS + 1)
                                  for g in _ngrams(normalize_caption(r).split(), n)})
        if num == 0:
            raise ValueError("CiderD needs a corpus of at least one image's references")
        self.log_docs = math.log(float(num))

    def _vectors(self, tokens: Sequence[str]) -> list[tuple[dict, float]]:
        out = []
        for n in range(1, NGRAMS + 1):
            vec = {g: c * (self.log_docs - math.log(max(1.0, self.doc_freq[g]))) for g, c in _ngrams(tokens, n).items()}
            out.append((vec, math.sqrt(sum(v * v for v in vec.values()))))
        return out

    def score(self, hypothesis: str, references: Sequence[str]) -> float:
        """CIDEr-D of one caption against its image's references."""
        if not references:
            raise ValueError("CIDEr-D needs at least one reference")
        hyp = normalize_caption(hypothesis).split()
        v_hyp = self._vectors(hyp)
        total = 0.0
        for ref in references:
            ref_tokens = normalize_caption(ref).split()
            penalty = math.exp(-((len(hyp) - len(ref_tokens)) ** 2) / (2 * SIGMA**2))
            sim = 0.0
            for (vh, nh), (vr, nr) in zip(v_hyp, self._vectors(ref_tokens), strict=True):
                if nh > 0 and nr > 0:
                    dot = sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vh.items())
                    sim += dot / (nh * nr) * penalty
            total += sim / NGRAMS
        return 10.0 * total / len(references)


@dataclass(frozen=True)
class ScstOut:
    loss: torch.Tensor  # scalar: sum over hypothesis tokens of -log p * advantage
    ntokens: int  # hypothesis tokens scored (EOS included)
    mean_reward: float
    hypotheses: list[list[str]]  # per image, its decoded hypotheses
    tokens: list[list[list[int]]]  # per image, its hypotheses' tokens (without EOS)


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """(B, K) rewards -> (B, K) advantages r - mean(other K - 1 rewards of the same image)."""
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 hypotheses per image")
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def scst_loss(model, batch: dict, references: Sequence[Sequence[str]], cider, vocab, *, samples: int,
              sampling: bool = False, max_len_b: int = 16, no_repeat_ngram_size: int = 3, seed: int = 0,
              train_model=None) -> ScstOut:
    """The SCST loss of a caption batch (`collate` output; `references[i]` are row i's captions).

    `model` decodes (no gradients); `train_model` (default `model`; e.g. its DDP wrapper) re-scores with them.
    `cider`: the reward, anything with `score(hypothesis, references) -> float` (a `CiderD`)."""
    train_model = train_model or model
    ids = SpecialIds.of(vocab)
    src, images, masks = batch["src_tokens"], batch.get("patch_images"), batch.get("patch_masks")
    b = src.shape[0]
    if len(references) != b:
        raise ValueError(f"{len(references)} reference lists for a batch of {b}")
    gen = GenerationConfig(beam_size=1 if sampling else samples, num_return_sequences=samples, sampling=sampling,
                           max_len_a=0.0, max_len_b=max_len_b, no_repeat_ngram_size=no_repeat_ngram_size,
                           seed=seed)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        hyps = generate(model, src, images, masks, cfg=gen, ids=ids)
    model.train(was_training)

    rows, texts, tokens, rewards = [], [], [], torch.zeros(b, samples)
    for i, hs in enumerate(hyps):
        if len(hs) != samples:
            raise RuntimeError(f"decoding gave {len(hs)} hypotheses for image {i}, expected {samples}")
        decoded = [vocab.decode(h.tokens).strip() for h in hs]
        texts.append(decoded)
        tokens.append([list(h.tokens) for h in hs])
        for j, (h, text) in enumerate(zip(hs, decoded, strict=True)):
            rewards[i, j] = cider.score(text, references[i])
            rows.append(h.tokens)
    advantage = leave_one_out(rewards).reshape(-1).to(src.device)  # (B*K,)

    prev = pad_sequences([[ids.bos, *t] for t in rows], ids.pad).to(src.device)  # (B*K, T)
    target = pad_sequences([[*t, ids.eos] for t in rows], ids.pad).to(src.device)
    expand = torch.arange(b, device=src.device).repeat_interleave(samples)
    logits = train_model(src.index_select(0, expand),
                         images.index_select(0, expand) if images is not None else None,
                         masks.index_select(0, expand) if masks is not None else None, prev)  # (B*K, T, V)
    lprobs = logits.float().log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B*K, T)
    keep = target.ne(ids.pad)
    loss = -(lprobs * keep * advantage.unsqueeze(1)).sum()
    return ScstOut(loss, int(keep.sum()), float(rewards.mean()), texts, tokens)
