"""ofa_model.scst: CIDEr-D against pycocoevalcap, the leave-one-out baseline, and the loss against a
hypothesis-by-hypothesis recomputation."""

from __future__ import annotations

import pytest
import torch

from ofa_model import OFAModel, get_config
from ofa_model.metrics import caption_scores
from ofa_model.preprocess import PreprocessConfig, collate
from ofa_model.scst import CiderD, leave_one_out, scst_loss
from ofa_model.tasks import TASKS, build_example
from ofa_model.vocab import Vocabulary
from tests.test_metrics import PREDICTIONS, REFERENCES
from tests.test_tasks import png


def test_cider_d_equals_pycocoevalcap_on_the_same_corpus():
    cider = CiderD(REFERENCES.values())  # document frequencies from the images scored, as pycocoevalcap does
    ours = sum(cider.score(PREDICTIONS[k], REFERENCES[k]) for k in PREDICTIONS) / len(PREDICTIONS)
    theirs = caption_scores(PREDICTIONS, REFERENCES, metrics=("CIDEr",), tokenize=False)["CIDEr"]
    assert ours == pytest.approx(theirs, abs=1e-9)
    assert cider.score("A man, riding a horse!", REFERENCES["img1"]) == pytest.approx(
        cider.score("a man riding a horse", REFERENCES["img1"]), abs=1e-12)  # OFA's normalisation first
    assert cider.score("zebra", REFERENCES["img1"]) == 0.0
    with pytest.raises(ValueError):
        CiderD([])


def test_leave_one_out_baseline_hand_worked():
    adv = leave_one_out(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]]))
    torch.testing.assert_close(adv, torch.tensor([[-1.5, 0.0, 1.5], [-1.5, -1.5, 3.0]]))
    torch.testing.assert_close(adv.sum(1), torch.zeros(2))  # the advantages of an image sum to zero
    with pytest.raises(ValueError):
        leave_one_out(torch.ones(2, 1))


@pytest.mark.parametrize("sampling", [False, True])
def test_scst_loss_equals_its_definition(sampling):
    torch.manual_seed(0)
    vocab = Vocabulary.gpt2()
    model = OFAModel(get_config("ofa-micro", vocab_size=len(vocab), pad_id=vocab.pad_id))
    pcfg = PreprocessConfig(patch_image_size=32, max_src_length=16, max_tgt_length=8)
    rows = [{"image": png(color=color), "target": "a red circle"} for color in ((255, 0, 0), (0, 0, 255))]
    batch = collate([build_example(TASKS["caption"], r, vocab, pcfg) for r in rows], vocab.pad_id)
    refs = [["a red circle", "a red round shape"], ["a blue circle"]]

    class Length:  # a reward that differs between hypotheses (an untrained model's CIDEr-D is all zeros)
        def score(self, text, references):
            return float(len(text)) + 0.5 * len(references)

    cider = Length()
    out = scst_loss(model, batch, refs, cider, vocab, samples=3, sampling=sampling, max_len_b=5, seed=1)
    assert len(out.hypotheses) == 2 and all(len(h) == 3 for h in out.hypotheses)
    rewards = torch.tensor([[cider.score(t, refs[i]) for t in out.hypotheses[i]] for i in range(2)])
    assert out.mean_reward == pytest.approx(float(rewards.mean()), abs=1e-6)
    adv = leave_one_out(rewards)
    # recompute from the definition, token by token in float64, on one forward pass of all hypotheses (the
    # ResNet's batch norm in training mode sees the whole batch, so a pass per hypothesis would differ)
    hyps = [(i, j, ids) for i in range(2) for j, ids in enumerate(out.tokens[i])]
    width = max(len(ids) for _, _, ids in hyps) + 1
    prev = torch.full((len(hyps), width), vocab.pad_id)
    for r, (_, _, ids) in enumerate(hyps):
        prev[r, : len(ids) + 1] = torch.tensor([vocab.bos_id, *ids])
    rows_of = torch.tensor([i for i, _, _ in hyps])
    with torch.no_grad():
        logits = model(batch["src_tokens"][rows_of], batch["patch_images"][rows_of], batch["patch_masks"][rows_of],
                       prev).double().log_softmax(-1)
    expected, tokens = 0.0, 0
    for r, (i, j, ids) in enumerate(hyps):
        for t, tok in enumerate([*ids, vocab.eos_id]):
            expected -= float(logits[r, t, tok]) * float(adv[i, j])
            tokens += 1
    assert out.ntokens == tokens
    assert float(adv.abs().sum()) > 0 and float(out.loss.detach()) != 0.0
    assert float(out.loss) == pytest.approx(expected, rel=1e-4, abs=1e-4)
    out.loss.backward()
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.parameters())
