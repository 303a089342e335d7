"""label_smoothed_nll against a token-by-token restatement of OFA's formula, and hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from ofa_model.losses import label_smoothed_nll

PAD = 1


def naive(logits, target, eps, weights=None, allowed=None, drop=0.0):
    """One token at a time in float64: OFA's label_smoothed_nll_loss written out."""
    losses, nlls = [], []
    b_, t_, v_ = logits.shape
    for b in range(b_):
        for t in range(t_):
            y = int(target[b, t])
            if y == PAD:
                continue
            row = logits[b, t].double()
            ok = [True] * v_ if allowed is None else [bool(a) for a in (allowed if allowed.ndim == 1 else allowed[b, t])]
            z = math.log(sum(math.exp(float(row[v])) for v in range(v_) if ok[v]))
            lp = [float(row[v]) - z if ok[v] else None for v in range(v_)]
            w = 1.0 if weights is None else float(weights[b])
            nll = -lp[y] * w
            smooth = -sum(x for x in lp if x is not None) * w
            eps_i = eps / (sum(ok) - 1)
            losses.append((1 - eps - eps_i) * nll + eps_i * smooth)
            nlls.append(nll)
    order = sorted(range(len(losses)), key=lambda i: losses[i])[: int(len(losses) * (1 - drop))]
    return sum(losses[i] for i in order), sum(nlls[i] for i in order), len(order)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    target = torch.tensor([[4, 5, 2, PAD, PAD], [7, 2, PAD, PAD, PAD], [3, 3, 8, 9, 2]])
    return logits, target


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_unconstrained_matches_the_formula(batch, eps):
    logits, target = batch
    out = label_smoothed_nll(logits, target, pad_id=PAD, epsilon=eps)
    loss, nll, n = naive(logits, target, eps)
    assert out.ntokens == n == 10
    assert float(out.loss) == pytest.approx(loss, rel=1e-5)
    assert float(out.nll) == pytest.approx(nll, rel=1e-5)


def test_weights_and_drop_worst(batch):
    logits, target = batch
    w = torch.tensor([1.0, 0.3, 0.6])
    out = label_smoothed_nll(logits, target, pad_id=PAD, epsilon=0.1, weights=w, drop_worst_ratio=0.2)
    loss, nll, n = naive(logits, target, 0.1, weights=w, drop=0.2)
    assert out.ntokens == n == 8  # 10 tokens, the worst 2 dropped
    assert float(out.loss) == pytest.approx(loss, rel=1e-5)
    assert float(out.nll) == pytest.approx(nll, rel=1e-5)


def test_constraint_restricts_softmax_and_smoothing(batch):
    logits, target = batch
    allowed = torch.zeros(11, dtype=torch.bool)
    allowed[[2, 3, 4, 5, 7, 8, 9]] = True
    out = label_smoothed_nll(logits, target, pad_id=PAD, epsilon=0.1, allowed=allowed)
    loss, nll, _ = naive(logits, target, 0.1, allowed=allowed)
    assert float(out.loss) == pytest.approx(loss, rel=1e-5)
    assert float(out.nll) == pytest.approx(nll, rel=1e-5)
    per_pos = allowed.expand(3, 5, 11).clone()
    per_pos[0, 0, 10] = True  # a per-position set differs at one place
    out2 = label_smoothed_nll(logits, target, pad_id=PAD, epsilon=0.1, allowed=per_pos)
    assert float(out2.loss) == pytest.approx(naive(logits, target, 0.1, allowed=per_pos)[0], rel=1e-5)
    assert float(out2.loss) != pytest.approx(float(out.loss), rel=1e-6)


def test_hand_worked_value():
    # two equal logits over V=2: log p = log 1/2 for both; eps=0.2, eps_i=0.2 -> (1-0.4)*ln2 + 0.2*2ln2 = ln2
    out = label_smoothed_nll(torch.zeros(1, 1, 2), torch.tensor([[0]]), pad_id=PAD, epsilon=0.2)
    assert float(out.loss) == pytest.approx(math.log(2), rel=1e-6)
    assert float(out.nll) == pytest.approx(math.log(2), rel=1e-6)


def test_a_target_outside_the_allowed_set_is_an_error(batch):
    logits, target = batch
    allowed = torch.ones(11, dtype=torch.bool)
    allowed[4] = False
    with pytest.raises(ValueError, match="allowed set"):
        label_smoothed_nll(logits, target, pad_id=PAD, allowed=allowed)


def test_gradient_flows_only_through_kept_tokens(batch):
    logits, target = batch
    logits = logits.clone().requires_grad_(True)
    label_smoothed_nll(logits, target, pad_id=PAD, epsilon=0.1).loss.backward()
    assert torch.count_nonzero(logits.grad[target.eq(PAD)]) == 0
    assert torch.count_nonzero(logits.grad[target.ne(PAD)]) > 0


def test_target_constraints_follow_the_answer_trie():
    from ofa_model.losses import target_constraints
    from ofa_model.preprocess import PreprocessConfig, collate
    from ofa_model.tasks import TASKS, build_example
    from ofa_model.vocab import Vocabulary
    from tests.test_tasks import png

    vocab, pcfg = Vocabulary.gpt2(), PreprocessConfig(patch_image_size=32)
    spec = TASKS["visual_entailment"]
    rows = [{"image": png(), "text": "a cat", "target": t} for t in ("yes", "maybe")]
    batch = collate([build_example(spec, r, vocab, pcfg) for r in rows], vocab.pad_id)
    allowed = target_constraints(spec, vocab, pcfg, batch["target"])
    firsts = {vocab.encode(" " + w)[0] for w in ("no", "yes", "maybe")}
    for b, word in enumerate(("yes", "maybe")):
        row = batch["target"][b].tolist()
        start = next(i for i, t in enumerate(row) if t != vocab.pad_id)
        assert set(allowed[b, start].nonzero().flatten().tolist()) == firsts
        ids = vocab.encode(" " + word)
        for j in range(1, len(ids) + 1):  # inside the word only its continuation, then </s>
            want = {ids[j]} if j < len(ids) else {vocab.eos_id}
            assert set(allowed[b, start + j].nonzero().flatten().tolist()) == want
        assert bool(allowed[b, :start].all())  # positions before the answer (pad targets) stay open
    # rows of different lengths in one batch: the shorter one's right padding does not void its constraint
    vqa_rows = [{"image": png(), "text": "what colour?", "target": t} for t in ("red", "dark slate grey")]
    vqa_batch = collate([build_example(TASKS["vqa"], r, vocab, pcfg) for r in vqa_rows], vocab.pad_id)
    answers = ("red", "dark slate grey", "blue")
    got = target_constraints(TASKS["vqa"], vocab, pcfg, vqa_batch["target"], answers)
    short = vqa_batch["target"][0].tolist()
    assert short[-1] == vocab.pad_id  # padded to the longer row
    start = next(i for i, t in enumerate(short) if t != vocab.pad_id)
    assert set(got[0, start].nonzero().flatten().tolist()) == {vocab.encode(" " + a)[0] for a in answers}
    # a target outside the answer set keeps the whole vocabulary rather than an impossible constraint
    vqa = collate([build_example(TASKS["vqa"], {"image": png(), "text": "what?", "target": "purple"}, vocab, pcfg)],
                  vocab.pad_id)
    assert bool(target_constraints(TASKS["vqa"], vocab, pcfg, vqa["target"], ("red", "blue")).all())
    codes = target_constraints(TASKS["text_to_image"], vocab, pcfg, batch["target"])
    lo, hi = vocab.code_range
    assert codes.shape == (len(vocab),) and int(codes.sum()) == (hi - lo) + 4 and bool(codes[lo:hi].all())
    assert target_constraints(TASKS["caption"], vocab, pcfg, batch["target"]) is None
    assert target_constraints(TASKS["grounding"], vocab, pcfg, batch["target"]) is None


def test_target_positions_only_give_the_same_loss(batch):
    """The trainer's form: logits at the non-pad target positions, per-token weights and constraints."""
    logits, target = batch
    w = torch.tensor([1.0, 0.3, 0.6])
    allowed = torch.rand(3, 5, 11, generator=torch.Generator().manual_seed(1)) > 0.3
    allowed.scatter_(-1, target.clamp_min(0).unsqueeze(-1), True)  # every target allowed
    full = label_smoothed_nll(logits, target, pad_id=PAD, epsilon=0.1, weights=w, allowed=allowed,
                              drop_worst_ratio=0.2)
    keep = target.ne(PAD)
    part = label_smoothed_nll(logits[keep].unsqueeze(0), target[keep].unsqueeze(0), pad_id=PAD, epsilon=0.1,
                              weights=w.unsqueeze(1).expand_as(target)[keep].unsqueeze(0),
                              allowed=allowed[keep].unsqueeze(0), drop_worst_ratio=0.2)
    assert part.ntokens == full.ntokens == 8
    torch.testing.assert_close(part.loss, full.loss)
    torch.testing.assert_close(part.nll, full.nll)


def test_features_only_projects_to_the_same_logits():
    from ofa_model import OFAModel, get_config

    torch.manual_seed(0)
    model = OFAModel(get_config("ofa-micro")).eval()
    src = torch.randint(4, 500, (2, 7))
    prev = torch.randint(4, 500, (2, 5))
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(src, imgs, torch.ones(2, dtype=torch.bool), prev)
        hidden = model(src, imgs, torch.ones(2, dtype=torch.bool), prev, features_only=True)
    assert hidden.shape == (2, 5, model.config.embed_dim)
    torch.testing.assert_close(model.decoder.project(hidden), logits, rtol=1e-5, atol=1e-5)


def test_mixture_rows_train_under_their_own_tasks_constraint():
    from ofa_model.losses import mixture_constraints, target_constraints
    from ofa_model.preprocess import PreprocessConfig, collate
    from ofa_model.tasks import TASKS, build_example
    from ofa_model.vocab import Vocabulary
    from tests.test_tasks import png

    vocab, pcfg = Vocabulary.gpt2(), PreprocessConfig(patch_image_size=32)
    shapes = ("circle", "rectangle", "triangle")
    rows = [("vqa", {"image": png(), "text": "what shape?", "target": "circle"}, ("circle", "red")),
            ("caption", {"image": png(), "target": "a red circle"}, ()),
            ("image_classification", {"image": png(), "target": "triangle"}, shapes),
            ("itm", {"image": png(), "text": "a red circle", "target": "no"}, ()),
            ("vqa", {"image": png(), "text": "what colour?", "target": "red"}, ("circle", "red"))]
    samples = [build_example(TASKS[t], r, vocab, pcfg) for t, r, _ in rows]
    batch = collate(samples, vocab.pad_id)
    got = mixture_constraints([TASKS[t] for t, _, _ in rows], vocab, pcfg, batch["target"], [a for *_, a in rows])
    assert got.shape == (*batch["target"].shape, len(vocab))
    for i, (task, _, answers) in enumerate(rows):  # each row as computed in a batch of its own
        alone = target_constraints(TASKS[task], vocab, pcfg, batch["target"][i:i + 1], answers)
        want = torch.ones_like(got[i]) if alone is None else alone[0]
        assert torch.equal(got[i], want), task
    start = next(j for j, t in enumerate(batch["target"][2].tolist()) if t != vocab.pad_id)
    assert set(got[2, start].nonzero().flatten().tolist()) == {vocab.encode(" " + s)[0] for s in shapes}
    assert bool(got[1].all()) and not bool(got[3].all())  # a caption row is free; itm keeps its yes/no labels
    captions = [TASKS["caption"]] * 2
    assert mixture_constraints(captions, vocab, pcfg, batch["target"][1:3], [(), ()]) is None
    with pytest.raises(ValueError, match="5 target rows but 2 specs"):
        mixture_constraints(captions, vocab, pcfg, batch["target"], [(), ()])
