"""Decoding: beam vs greedy, constraints, n-gram blocking, sampling, candidate scoring."""

import copy
import math

import pytest
import torch

from ofa_model.architecture import get_config
from ofa_model.errors import InputError
from ofa_model.generation import (
    Constraint,
    GenerationConfig,
    PrefixTrie,
    SpecialIds,
    generate,
    max_new_tokens,
    score_candidates,
)
from ofa_model.model import OFAModel

IDS = SpecialIds(bos=0, pad=1, eos=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = OFAModel(get_config("ofa-micro")).eval()
    with torch.no_grad():  # sharpen the output distribution so searches make real choices
        m.decoder.layer_norm.weight.mul_(8.0)
    return m


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 3000, (4, 6), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    src[3, 4:] = 1
    return src, torch.randn(4, 3, 32, 32, generator=g)


def test_beam_one_equals_greedy(model, batch):
    src, img = batch
    greedy = generate(model, src, img, cfg=GenerationConfig(beam_size=1, max_len_b=12), ids=IDS)
    beam2 = generate(model, src, img, cfg=GenerationConfig(beam_size=2, max_len_b=12), ids=IDS)
    from ofa_model import generation  # generate() routes beam_size=1 to greedy: run the beam code itself

    res = generation._beam(model, model.encode(src, img), torch.zeros(4, 1, dtype=torch.long),
                           None, generation._Stepper(GenerationConfig(beam_size=1, max_len_b=12), IDS, 59457, 12),
                           [None] * 4)
    assert [h[0].tokens for h in res] == [h[0].tokens for h in greedy]
    assert all(len(h[0].tokens) > 0 for h in greedy)
    # a wider beam never finds a worse sequence than greedy (scores normalised the same way)
    assert all(b[0].score >= g[0].score - 1e-6 for b, g in zip(beam2, greedy, strict=True))


def test_beam_scores_are_log_probabilities(model, batch):
    src, img = batch
    cfg = GenerationConfig(beam_size=3, max_len_b=8, num_return_sequences=3, normalize_scores=False)
    hyps = generate(model, src, img, cfg=cfg, ids=IDS)
    enc = model.encode(src, img)
    for i, hs in enumerate(hyps):
        assert len(hs) == 3 and [h.score for h in hs] == sorted((h.score for h in hs), reverse=True)
        direct = score_candidates(model, enc.index_select(torch.tensor([i])), [[h.tokens for h in hs]], ids=IDS)[0]
        for h, s in zip(hs, direct, strict=True):
            # token-level scores include EOS; without a constraint the softmax is over the vocabulary
            # minus <pad>, which barely moves the numbers
            assert abs(sum(h.token_scores) - h.score) < 1e-4
            assert abs(h.score - s) < 0.05


@pytest.mark.parametrize("mode", ["greedy", "beam", "sample"])
def test_constraints_never_violated(model, batch, mode):
    src, img = batch
    vocab = 59457
    bins = (vocab - 1000, vocab)
    answers = [[100, 101], [100, 102, 103], [200], [300, 301, 302, 303]]
    trie = PrefixTrie(answers, IDS.eos)
    base = dict(max_len_b=10, beam_size=1 if mode != "beam" else 4)
    if mode == "sample":
        base.update(sampling=True, top_k=50, num_return_sequences=3, seed=7)
    model = copy.deepcopy(model)  # perturbed below; the shared fixture stays as it is
    for _ in range(3):
        with torch.no_grad():
            for p in model.decoder.layers[0].fc2.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # different models, same guarantees
        box = generate(model, src, img, ids=IDS, constraints=Constraint(allowed_ranges=(bins,)),
                       cfg=GenerationConfig(**{**base, "min_len": 4, "max_len_b": 4}))
        for hs in box:
            for h in hs:
                assert len(h.tokens) == 4 and all(bins[0] <= t < bins[1] for t in h.tokens)
        closed = generate(model, src, img, ids=IDS, constraints=Constraint(trie=trie), cfg=GenerationConfig(**base))
        for hs in closed:
            for h in hs:
                assert h.tokens in answers
        per_example = [Constraint(trie=PrefixTrie([a], IDS.eos)) for a in answers]
        forced = generate(model, src, img, ids=IDS, constraints=per_example, cfg=GenerationConfig(**base))
        assert [hs[0].tokens for hs in forced] == answers


BINS = (59457 - 1000, 59457)  # the location tokens of the default vocabulary


def _one_bin_model(model, favourite: int) -> OFAModel:
    """A model that has learnt nothing but one favourite location token: every decoder position has the same
    hidden state v (final layer norm weight 0, bias v) and the favourite's output row is 10 v, so its logit
    (10 |v|^2) tops every other token's at every step, whatever the image. A barely trained grounding model
    (the quick demo's) behaves so."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        ln = m.decoder.layer_norm
        ln.weight.zero_()
        ln.bias.copy_(torch.randn(ln.bias.shape, generator=torch.Generator().manual_seed(3)))
        m.decoder.output_projection.weight[favourite] = 10 * ln.bias
    return m


@pytest.mark.parametrize("beam_size", [1, 5])
def test_an_ordered_box_has_area_even_when_the_model_repeats_one_bin(model, batch, beam_size):
    src, img = batch
    fav = BINS[0] + 400
    m = _one_bin_model(model, fav)
    cfg = GenerationConfig(beam_size=beam_size, min_len=4, max_len_b=4)
    ranges = Constraint(allowed_ranges=(BINS,))
    # bins alone: the favourite four times, x1 == x0 and y1 == y0, a box without area (IoU 0 with anything)
    assert [hs[0].tokens for hs in generate(m, src, img, cfg=cfg, ids=IDS, constraints=ranges)] == [[fav] * 4] * 4
    ordered = generate(m, src, img, cfg=cfg, ids=IDS,
                       constraints=Constraint(allowed_ranges=(BINS,), ordered_box=True))
    for hs in ordered:
        x0, y0, x1, y1 = hs[0].tokens
        assert (x0, y0) == (fav, fav) and x1 > x0 and y1 > y0 and max(x1, y1) < BINS[1]


def test_an_ordered_box_never_starts_at_the_last_allowed_bin(model, batch):
    src, img = batch
    top = BINS[0] + 125  # e.g. 64 px of a 512 px bin range: bins 0..125
    m = _one_bin_model(model, top)
    cons = Constraint(allowed_ranges=((BINS[0], top + 1),), ordered_box=True)
    for hs in generate(m, src, img, cfg=GenerationConfig(beam_size=3, min_len=4, max_len_b=4), ids=IDS,
                       constraints=cons):
        x0, y0, x1, y1 = hs[0].tokens  # x0 and y0 leave the top bin to x1 and y1, who take it
        assert x0 < top and y0 < top and (x1, y1) == (top, top)


@pytest.mark.parametrize("mode", ["greedy", "beam", "sample"])
def test_ordered_boxes_never_violated(model, batch, mode):
    src, img = batch
    base = dict(min_len=4, max_len_b=4, beam_size=1 if mode != "beam" else 4)
    if mode == "sample":
        base.update(sampling=True, top_k=50, num_return_sequences=3, seed=7)
    model = copy.deepcopy(model)
    for _ in range(3):
        with torch.no_grad():
            for p in model.decoder.layers[0].fc2.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        out = generate(model, src, img, ids=IDS, cfg=GenerationConfig(**base),
                       constraints=Constraint(allowed_ranges=(BINS,), ordered_box=True))
        for hs in out:
            for h in hs:
                x0, y0, x1, y1 = h.tokens
                assert all(BINS[0] <= t < BINS[1] for t in h.tokens) and x1 > x0 and y1 > y0


def test_no_repeat_ngram(model, batch):
    src, img = batch
    plain = generate(model, src, img, cfg=GenerationConfig(beam_size=1, max_len_b=15), ids=IDS)
    assert any(len(set(h[0].tokens)) < len(h[0].tokens) for h in plain)  # the model does repeat itself
    for n in (1, 2, 3):
        out = generate(model, src, img, cfg=GenerationConfig(beam_size=3, max_len_b=15, no_repeat_ngram_size=n), ids=IDS)
        for hs in out:
            seq = [IDS.bos] + hs[0].tokens
            grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
            assert len(grams) == len(set(grams)), (n, seq)


def test_prefix_tokens_are_forced_and_grouped(model, batch):
    src, img = batch
    prefixes = [[500, 501], [], [600], [500, 501]]
    cfg = GenerationConfig(beam_size=2, max_len_b=5)
    out = generate(model, src, img, cfg=cfg, ids=IDS, prefix_tokens=prefixes)
    for i, p in enumerate(prefixes):
        alone = generate(model, src[i:i + 1], img[i:i + 1], cfg=cfg, ids=IDS, prefix_tokens=[p])
        assert out[i][0].tokens == alone[0][0].tokens
        assert abs(out[i][0].score - alone[0][0].score) < 1e-4


def test_length_limits(model, batch):
    src, img = batch
    out = generate(model, src, img, cfg=GenerationConfig(beam_size=2, min_len=6, max_len_b=6), ids=IDS)
    assert all(len(hs[0].tokens) == 6 for hs in out)
    out = generate(model, src, img, cfg=GenerationConfig(beam_size=1, max_len_a=1.0, max_len_b=1), ids=IDS)
    assert all(len(hs[0].tokens) <= src.shape[1] + 1 for hs in out)


def test_sampling_is_seeded_and_filtered(model, batch):
    src, img = batch
    cfg = GenerationConfig(sampling=True, top_k=3, max_len_b=6, num_return_sequences=4, seed=11, temperature=1.5)
    a = generate(model, src, img, cfg=cfg, ids=IDS)
    b = generate(model, src, img, cfg=cfg, ids=IDS)
    assert [[h.tokens for h in hs] for hs in a] == [[h.tokens for h in hs] for hs in b]
    assert len({tuple(h.tokens) for hs in a for h in hs}) > 4  # it really samples
    # top-k=3: every sampled token is among the 3 most likely at its step
    enc = model.encode(src, img)
    h = a[0][0]
    prev = torch.tensor([[IDS.bos] + h.tokens])
    logits = model.decode(prev, enc.index_select(torch.tensor([0])))[0]
    for t, tok in enumerate(h.tokens):
        top = logits[t].topk(5).indices.tolist()
        assert tok in top[:5]  # (a banned <pad> may shift the top 3 by a place)
    nucleus = generate(model, src, img, ids=IDS,
                       cfg=GenerationConfig(sampling=True, top_p=1e-6, max_len_b=6, num_return_sequences=2, seed=3))
    greedy = generate(model, src, img, cfg=GenerationConfig(beam_size=1, max_len_b=6), ids=IDS)
    assert [hs[0].tokens for hs in nucleus] == [hs[0].tokens for hs in greedy]  # tiny top_p = argmax


def test_score_candidates_against_teacher_forcing(model, batch):
    src, img = batch
    enc = model.encode(src[:2], img[:2])
    cands = [[[100, 101], [100, 102], [200]], [[7]]]
    got = score_candidates(model, enc, cands, ids=IDS, chunk_size=2)
    restricted = score_candidates(model, enc, cands, ids=IDS, restrict_to_candidates=True)
    full = model(src[:1], img[:1], prev_output_tokens=torch.tensor([[0, 100, 101]])).log_softmax(-1)[0]
    assert abs(got[0][0] - (full[0, 100] + full[1, 101] + full[2, 2]).item()) < 1e-4
    logits = model(src[:1], img[:1], prev_output_tokens=torch.tensor([[0, 100, 102]]))[0]
    want = (logits[0, [100, 200]].log_softmax(-1)[0] + logits[1, [101, 102]].log_softmax(-1)[1]
            + logits[2, [2]].log_softmax(-1)[0]).item()
    assert abs(restricted[0][1] - want) < 1e-4
    one_by_one = score_candidates(model, enc, cands, ids=IDS, restrict_to_candidates=True, chunk_size=1)
    assert one_by_one[0] == pytest.approx(restricted[0], abs=1e-5)
    assert restricted[1] == pytest.approx([0.0], abs=1e-6)  # a single candidate is certain once restricted
    assert sum(torch.tensor(restricted[0]).exp().tolist()) == pytest.approx(1.0, abs=1e-5)


def test_score_candidates_after_prefixes_of_different_lengths_equal_teacher_forcing(model, batch):
    """Examples with prefixes of several lengths (VQA's questions), candidates of 0 to 3 tokens: each score equals
    the teacher-forced sum over `<s> + prefix + candidate + </s>` computed whole, restricted or not, whatever the
    chunking (the prefix runs once per example, the candidates from its cache)."""
    src, img = batch
    n = min(4, src.shape[0])
    enc = model.encode(src[:n], img[:n])
    prefixes = [[30, 31, 32], [40], [50, 51, 52], []][:n]
    cands = [[[100, 101], [200], [300, 301, 302]], [[7], [8, 9]], [[]], [[100], [101]]][:n]

    def teacher_forced(i: int, c: list[int], restrict: bool) -> float:
        seq = [IDS.bos] + prefixes[i] + c + [IDS.eos]
        logits = model(src[i:i + 1], img[i:i + 1], prev_output_tokens=torch.tensor([seq[:-1]]))[0]
        total = 0.0
        for t, tok in enumerate(c + [IDS.eos]):
            row = logits[len(prefixes[i]) + t]
            if restrict:
                allowed = sorted({(o + [IDS.eos])[t] for o in cands[i] if o[:t] == c[:t]})
                total += row[allowed].log_softmax(-1)[allowed.index(tok)].item()
            else:
                total += row.log_softmax(-1)[tok].item()
        return total

    for restrict in (False, True):
        want = [[teacher_forced(i, c, restrict) for c in cands[i]] for i in range(n)]
        for chunk in (1, 2, 64):
            got = score_candidates(model, enc, cands, ids=IDS, prefix_tokens=prefixes, chunk_size=chunk,
                                   restrict_to_candidates=restrict)
            for g, w in zip(got, want, strict=True):
                assert g == pytest.approx(w, abs=1e-4), (restrict, chunk)


def test_config_validation():
    with pytest.raises(ValueError, match="num_return_sequences=3 > beam_size=2"):
        GenerationConfig(beam_size=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="beam_size must be an integer"):
        GenerationConfig(beam_size="5")
    with pytest.raises(ValueError, match="seed must be an integer"):
        GenerationConfig(seed=[1])
    with pytest.raises(ValueError, match=r"beam_size must lie in \[1, 64\], got 10000"):
        GenerationConfig(beam_size=10_000)
    assert GenerationConfig(length_penalty=1).length_penalty == 1.0
    assert type(GenerationConfig(max_len_a=2).max_len_a) is float


HOSTILE_SETTINGS = [
    ("max_len_a", 1e308), ("max_len_a", 10**400), ("max_len_a", -1.0), ("length_penalty", 1e308),
    ("length_penalty", -1e308), ("seed", 2**70), ("seed", -1), ("temperature", 1e-300), ("temperature", 0),
    ("top_p", 1e-300), ("top_p", 0.0), ("top_p", 1.5), ("max_len_b", 10**6), ("min_len", -1), ("top_k", -1),
    ("no_repeat_ngram_size", 10**9), ("num_return_sequences", 0),
    ("beam_size", True), ("max_len_b", False), ("seed", True), ("sampling", 1), ("normalize_scores", "yes"),
    ("max_len_a", float("nan")), ("length_penalty", float("inf")), ("temperature", float("-inf")),
    ("beam_size", 5.0), ("max_len_b", "16"), ("top_p", "0.9"), ("temperature", None), ("beam_size", [5]),
]


@pytest.mark.parametrize("name,value", HOSTILE_SETTINGS)
def test_every_setting_is_checked_to_a_finite_range(name, value):
    with pytest.raises(InputError) as info:
        GenerationConfig(**{name: value})
    assert info.value.reason == "bad_setting" and f"GenerationConfig.{name}" in str(info.value)


def test_settings_at_their_bounds_decode(model, batch):
    """The ranges are safe: the most extreme accepted values run through every search without raising."""
    src, img = batch
    enc = model.encode(src[:2], img[:2])
    for cfg in (
        GenerationConfig(beam_size=2, max_len_a=10.0, max_len_b=0, length_penalty=10.0, no_repeat_ngram_size=4096),
        GenerationConfig(beam_size=2, max_len_b=3, length_penalty=-10.0),
        GenerationConfig(sampling=True, max_len_b=3, temperature=0.01, top_p=1e-6, top_k=1_000_000,
                         seed=2**63 - 1, num_return_sequences=2),
        GenerationConfig(sampling=True, max_len_b=3, temperature=100.0, seed=0),
    ):
        hyps = generate(model, src[:2], cfg=cfg, ids=IDS, encoder_out=enc)
        assert [len(hs) for hs in hyps] == [cfg.num_return_sequences] * 2
        assert all(math.isfinite(h.score) for hs in hyps for h in hs), cfg
        assert all(len(h.tokens) <= max_new_tokens(cfg, src.shape[1], 0, model) for hs in hyps for h in hs)


class _Biased:
    """The model with a large bias on one token's logit: a model that 'wants' to emit it."""

    def __init__(self, model, token: int, bias: float):
        self.model, self.token, self.bias, self.config = model, token, bias, model.config

    def encode(self, *args, **kw):
        return self.model.encode(*args, **kw)

    def decode(self, *args, **kw):
        logits = self.model.decode(*args, **kw).clone()
        logits[..., self.token] += self.bias
        return logits


def test_bos_can_be_generated_only_pad_is_banned(model, batch):
    """OFA's generator bans only <pad>: a model that prefers <s> emits it; one that prefers <pad> never does."""
    src, img = batch
    for cfg in (GenerationConfig(beam_size=1, max_len_b=3), GenerationConfig(beam_size=3, max_len_b=3),
                GenerationConfig(sampling=True, max_len_b=3, seed=0)):
        bos = generate(_Biased(model, IDS.bos, 50.0), src, img, cfg=cfg, ids=IDS)
        assert all(hs[0].tokens and set(hs[0].tokens) == {IDS.bos} for hs in bos), cfg
        assert all(hs[0].token_scores[0] > -1e-3 for hs in bos)  # <s> holds nearly all the probability
        pad = generate(_Biased(model, IDS.pad, 50.0), src, img, cfg=cfg, ids=IDS)
        assert all(IDS.pad not in h.tokens for hs in pad for h in hs)
        assert all(math.isfinite(h.score) for hs in pad for h in hs)


def test_trie_with_min_len_still_terminates(model, batch):
    src, img = batch
    trie = PrefixTrie([[100], [200]], IDS.eos)  # one-token answers, but min_len asks for two tokens
    for beam in (1, 3):
        out = generate(model, src, img, cfg=GenerationConfig(beam_size=beam, min_len=2, max_len_b=5), ids=IDS,
                       constraints=Constraint(trie=trie))
        assert all(hs and hs[0].tokens in ([100], [200]) for hs in out)


def test_image_code_targets_can_fill_the_whole_position_table(model, batch):
    src, img = batch
    cfg = GenerationConfig(beam_size=1, min_len=1025, max_len_b=1025)
    codes = Constraint(allowed_ranges=((50265, 58457),))
    out = generate(model, src[:1], img[:1], cfg=cfg, ids=IDS, constraints=codes, code_masks=torch.tensor([True]))
    assert len(out[0][0].tokens) == 1025 and all(50265 <= t < 58457 for t in out[0][0].tokens)


def test_an_ordered_box_needs_the_location_range():
    with pytest.raises(ValueError, match="ordered_box needs allowed_ranges"):
        Constraint(ordered_box=True)
