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


@pytest.mark.parametrize("shared", [False, True])
def test_the_allowed_columns_alone_give_the_same_loss_and_gradients(shared):
    """The trainer projects onto the union of the allowed sets only; against the whole-vocabulary loss."""
    from ofa_model import OFAModel, get_config
    from ofa_model.losses import allowed_columns

    torch.manual_seed(0)
    model = OFAModel(get_config("ofa-micro")).double()
    vocab_size = model.config.vocab_size
    hidden = torch.randn(6, model.config.embed_dim, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([40, 41, 2, 300, 41, 2])
    if shared:  # one set for every position, as image codes are constrained
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        allowed[[2, 40, 41, 300, 301]] = True
    else:  # a set per position, as an answer trie gives
        allowed = torch.zeros(6, vocab_size, dtype=torch.bool)
        for i, toks in enumerate([[40, 50], [41, 42], [2], [300, 40, 7], [41], [2, 9]]):
            allowed[i, toks] = True
    weights = torch.tensor([[1.0, 1.0, 1.0, 0.5, 0.5, 0.5]], dtype=torch.float64)

    def loss_and_grads(columns):
        model.zero_grad()
        hidden.grad = None
        if columns is None:
            logits, a, t = model.decoder.project(hidden), allowed, target
        else:
            index, a, t = columns
            logits = model.decoder.project(hidden, columns=index)
        out = label_smoothed_nll(logits[None], t[None], pad_id=-1, epsilon=0.1, weights=weights,
                                 allowed=a if a.ndim == 1 else a[None], drop_worst_ratio=0.2)
        out.loss.backward()
        return out, hidden.grad.clone(), model.decoder.output_projection.weight.grad.clone()

    columns = allowed_columns(allowed, target, vocab_size)
    assert columns is not None
    index, _, sub_target = columns
    want = [2, 7, 9, 40, 41, 42, 50, 300] if not shared else [2, 40, 41, 300, 301]
    assert index.tolist() == want
    assert index[sub_target].tolist() == target.tolist()
    full, sub = loss_and_grads(None), loss_and_grads(columns)
    assert full[0].ntokens == sub[0].ntokens == 4
    close = dict(rtol=1e-5, atol=1e-8)  # the loss runs in float32: its rounding, summed in another order
    torch.testing.assert_close(sub[0].loss, full[0].loss, **close)
    torch.testing.assert_close(sub[0].nll, full[0].nll, **close)
    torch.testing.assert_close(sub[1], full[1], **close)
    torch.testing.assert_close(sub[2], full[2], **close)
    assert float(full[2].abs().sum()) > 0 and float(full[1].abs().sum()) > 0


def test_allowed_columns_falls_back_to_the_whole_vocabulary():
    from ofa_model.losses import allowed_columns

    target = torch.tensor([5, 6])
    assert allowed_columns(None, target, 100) is None  # unconstrained
    wide = torch.ones(2, 100, dtype=torch.bool)  # a row left unconstrained (target outside its trie)
    wide[0, 7:] = False
    assert allowed_columns(wide, target, 100) is None
    narrow = torch.zeros(2, 100, dtype=torch.bool)
    narrow[:, 5] = True  # 6 is not allowed: the full loss must say so, not a remapped one
    assert allowed_columns(narrow, target, 100) is None


def test_answer_columns_are_the_masks_columns_without_the_masks():
    """The trainer's fast path for closed answer sets, against mixture_constraints + allowed_columns."""
    from ofa_model.losses import allowed_columns, answer_columns, mixture_constraints
    from ofa_model.preprocess import PreprocessConfig, collate
    from ofa_model.tasks import TASKS, build_example
    from ofa_model.vocab import Vocabulary
    from tests.test_tasks import png

    vocab, pcfg = Vocabulary.gpt2(), PreprocessConfig(patch_image_size=32)
    shapes = ("circle", "rectangle", "triangle")
    answers = ("circle", "red", "yes", "no", "light blue")

    def build(rows):
        samples = [build_example(TASKS[t], r, vocab, pcfg) for t, r, _ in rows]
        batch = collate(samples, vocab.pad_id)
        return batch["target"], [TASKS[t] for t, _, _ in rows], [a for *_, a in rows]

    rows = [("vqa", {"image": png(), "text": "what shape?", "target": "circle"}, answers),
            ("image_classification", {"image": png(), "target": "triangle"}, shapes),
            ("itm", {"image": png(), "text": "a red circle", "target": "no"}, ()),  # its labels
            ("vqa", {"image": png(), "text": "what colour?", "target": "light blue"}, answers)]
    target, specs, ans = build(rows)
    keep = target.ne(vocab.pad_id)
    want = allowed_columns(mixture_constraints(specs, vocab, pcfg, target, ans)[keep], target[keep], len(vocab))
    got = answer_columns(specs, vocab, pcfg, target, ans)
    assert want is not None and got is not None
    for w, g in zip(want, got, strict=True):
        assert torch.equal(g, w)
    assert got[0].numel() > 8 and got[1].shape == (int(keep.sum()), got[0].numel())

    for other in [("caption", {"image": png(), "target": "a red circle"}, ()),  # free text
                  ("vqa", {"image": png(), "text": "what colour?", "target": "green"}, answers)]:  # not an answer
        target, specs, ans = build(rows[:1] + [other])
        assert answer_columns(specs, vocab, pcfg, target, ans) is None
