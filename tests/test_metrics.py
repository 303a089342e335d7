"""Metric values against hand-worked numbers and an independent BLEU / CIDEr-D implementation."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from ofa_model.metrics import (
    accuracy,
    box_iou,
    caption_scores,
    f1_binary,
    grounding_accuracy,
    matthews_corrcoef,
    normalize_vqa_answer,
    rouge_l,
    rouge_n,
    summarization_scores,
    vqa_accuracy,
    vqa_score_weighted,
)

# Already tokenised (lowercase, no punctuation): 3 images with 3, 2 and 5 references.
PREDICTIONS = {
    "img1": "a man riding a horse",
    "img2": "two dogs in a field",  # shorter than its closest reference: brevity penalty applies
    "img3": "a plate of rice and broccoli",
}
REFERENCES = {
    "img1": ["a man riding a horse on a beach", "a person rides a brown horse", "a man on a horse near the sea"],
    "img2": ["two dogs playing in the grass", "a pair of dogs run across a field"],
    "img3": [
        "a plate of food with broccoli and rice",
        "a white plate with rice and vegetables",
        "broccoli and rice on a plate",
        "a meal of rice and broccoli",
        "food on a white plate",
    ],
}


# ---- independent reference implementations (written from the metric definitions) ----------------------------


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def reference_bleu(preds: dict[str, str], refs: dict[str, list[str]]) -> dict[str, float]:
    """Corpus BLEU-1..4: clipped n-gram precisions summed over images, brevity penalty from the summed
    closest reference lengths (ties go to the shorter reference)."""
    matched, proposed = [0] * 4, [0] * 4
    hyp_total, ref_total = 0, 0
    for key, pred in preds.items():
        hyp = pred.split()
        ref_tokens = [r.split() for r in refs[key]]
        hyp_total += len(hyp)
        ref_total += min((len(r) for r in ref_tokens), key=lambda length: (abs(length - len(hyp)), length))
        for n in range(1, 5):
            max_ref = Counter()
            for r in ref_tokens:
                max_ref |= _ngrams(r, n)
            counts = _ngrams(hyp, n)
            matched[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            proposed[n - 1] += sum(counts.values())
    brevity = 1.0 if hyp_total >= ref_total else math.exp(1.0 - ref_total / hyp_total)
    log_p = [math.log(m / p) for m, p in zip(matched, proposed, strict=True)]
    return {f"BLEU_{n}": brevity * math.exp(sum(log_p[:n]) / n) for n in range(1, 5)}


def reference_cider_d(preds: dict[str, str], refs: dict[str, list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D: tf-idf n-gram vectors (n=1..4, df over the images' reference sets), cosine with the candidate's
    tf-idf clipped at the reference's, gaussian length penalty, mean over n and references, x10, mean over
    images."""
    num_images = len(refs)
    doc_freq = Counter()
    for captions in refs.values():
        doc_freq.update({g for c in captions for n in range(1, 5) for g in _ngrams(c.split(), n)})

    def tfidf(tokens: list[str], n: int) -> dict[tuple, float]:
        return {g: c * (math.log(num_images) - math.log(max(1.0, doc_freq[g]))) for g, c in _ngrams(tokens, n).items()}

    per_image = []
    for key, pred in preds.items():
        hyp = pred.split()
        per_ref = []
        for ref in refs[key]:
            ref_tokens = ref.split()
            penalty = math.exp(-((len(hyp) - len(ref_tokens)) ** 2) / (2 * sigma**2))
            total = 0.0
            for n in range(1, 5):
                v_hyp, v_ref = tfidf(hyp, n), tfidf(ref_tokens, n)
                norm_hyp = math.sqrt(sum(v * v for v in v_hyp.values()))
                norm_ref = math.sqrt(sum(v * v for v in v_ref.values()))
                dot = sum(min(v, v_ref.get(g, 0.0)) * v_ref.get(g, 0.0) for g, v in v_hyp.items())
                if norm_hyp > 0 and norm_ref > 0:
                    total += dot / (norm_hyp * norm_ref) * penalty
            per_ref.append(total / 4)
        per_image.append(10.0 * sum(per_ref) / len(per_ref))
    return sum(per_image) / len(per_image)


# ---- caption metrics ---------------------------------------------------------------------------------------


def test_bleu_and_cider_match_independent_implementation():
    scores = caption_scores(PREDICTIONS, REFERENCES, metrics=("CIDEr", "BLEU_4"), tokenize=False)
    expected_bleu = reference_bleu(PREDICTIONS, REFERENCES)
    assert set(scores) == {"CIDEr", "BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4"}
    for key, value in expected_bleu.items():
        assert scores[key] == pytest.approx(value, abs=1e-6), key
    assert scores["CIDEr"] == pytest.approx(reference_cider_d(PREDICTIONS, REFERENCES), abs=1e-6)
    # Guard against a degenerate example: the scores are neither 0 nor perfect.
    assert 0.05 < scores["BLEU_4"] < 0.9
    assert 0.1 < scores["CIDEr"] < 5.0


def test_exact_match_hand_worked():
    # Each prediction equals its closest-length reference: every n-gram matches and the brevity penalty is 1.
    preds = {"1": "a cat sits on a mat", "2": "red bus parked outside"}
    refs = {"1": ["a cat sits on a mat", "a dog"], "2": ["red bus parked outside"]}
    scores = caption_scores(preds, refs, metrics=("BLEU_1", "ROUGE_L"), tokenize=False)
    assert set(scores) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L"}
    for n in range(1, 5):
        assert scores[f"BLEU_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE_L"] == pytest.approx(1.0)


def test_cider_exact_match_of_disjoint_images_hand_worked():
    # Two images share no n-gram: every n-gram has idf log(2) - log(1); candidate and reference tf-idf vectors
    # are equal, so each n-gram order present has cosine 1 and the length penalty is 1. With 4-word captions
    # all four orders score 1 -> mean 1, times 10.
    preds = {"x": "red bus parked outside", "y": "blue sky over hills"}
    refs = {k: [v] for k, v in preds.items()}
    assert caption_scores(preds, refs, metrics=("CIDEr",), tokenize=False) == {"CIDEr": pytest.approx(10.0)}
    # 2-word captions have no 3- or 4-grams: those orders score 0 -> (1 + 1 + 0 + 0) / 4 * 10 = 5.
    preds = {"x": "red bus", "y": "blue sky"}
    refs = {k: [v] for k, v in preds.items()}
    assert caption_scores(preds, refs, metrics=("CIDEr",), tokenize=False) == {"CIDEr": pytest.approx(5.0)}


def test_cider_of_one_image_is_zero():
    # idf = log(#images) - log(df) = log 1 - log 1 = 0 for every n-gram of a lone image.
    scores = caption_scores({"a": "a dog"}, {"a": ["a dog"]}, metrics=("CIDEr",), tokenize=False)
    assert scores == {"CIDEr": 0.0}


def test_tokenize_matches_pycocoevalcap_ptb_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # The line break must not shift later captions out of alignment (the tokenizer works line by line).
    raw_preds = {"a": "A Man,\nriding a horse.", "b": "Two dogs (brown) don't play!"}
    raw_refs = {"a": ["A man rides a horse on the beach.", "Someone's riding a HORSE"],
                "b": ["Two dogs aren't playing -- in the grass.", "Dogs: two of them."]}
    tokenized_refs = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in raw_refs.items()})
    tokenized_preds = PTBTokenizer().tokenize({k: [{"caption": v}] for k, v in raw_preds.items()})
    assert tokenized_preds["a"] == ["a man riding a horse"]
    metrics = ("CIDEr", "BLEU_4", "ROUGE_L")
    ours = caption_scores(raw_preds, raw_refs, metrics=metrics, tokenize=True)
    theirs = caption_scores({k: v[0] for k, v in tokenized_preds.items()}, tokenized_refs, metrics=metrics,
                            tokenize=False)
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours["ROUGE_L"] > 0.3


def test_meteor_and_rouge_l_with_java_tokenizer():
    preds = {"a": "A man riding a horse.", "b": "A dog runs on the grass."}
    refs = {"a": ["A man riding a horse.", "A person on a brown horse."],
            "b": ["A dog is running on the grass.", "A brown dog plays outside."]}
    scores = caption_scores(preds, refs, metrics=("METEOR", "ROUGE_L"), tokenize=True)
    assert set(scores) == {"METEOR", "ROUGE_L"}
    # Image a is an exact match (1.0). Image b after tokenisation: "a dog runs on the grass" (6 tokens);
    # LCS 5 with "a dog is running on the grass" (7), 2 with "a brown dog plays outside" (5).
    # pycocoevalcap: P = max LCS/6 = 5/6, R = max LCS/len(ref) = 5/7, F_beta with beta^2 = 1.44.
    p, r = 5 / 6, 5 / 7
    rouge_b = (1 + 1.44) * p * r / (r + 1.44 * p)
    assert scores["ROUGE_L"] == pytest.approx((1.0 + rouge_b) / 2, abs=1e-9)
    assert 0.0 < scores["METEOR"] <= 1.0


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="java"):
        caption_scores(PREDICTIONS, REFERENCES, metrics=("CIDEr",), tokenize=True)


def test_caption_input_errors_name_the_id():
    with pytest.raises(ValueError, match="'img9'"):
        caption_scores({**PREDICTIONS, "img9": "x"}, REFERENCES, metrics=("CIDEr",), tokenize=False)
    with pytest.raises(ValueError, match="'img2'"):
        caption_scores({k: v for k, v in PREDICTIONS.items() if k != "img2"}, REFERENCES, metrics=("CIDEr",),
                       tokenize=False)
    with pytest.raises(ValueError, match="'img3'.*empty"):
        caption_scores(PREDICTIONS, {**REFERENCES, "img3": []}, metrics=("CIDEr",), tokenize=False)
    with pytest.raises(ValueError, match="'img1'.*blank"):
        caption_scores(PREDICTIONS, {**REFERENCES, "img1": ["a horse", "  "]}, tokenize=False)
    with pytest.raises(TypeError, match="'img2'"):
        caption_scores({**PREDICTIONS, "img2": None}, REFERENCES, tokenize=False)
    with pytest.raises(ValueError, match="SPICE"):
        caption_scores(PREDICTIONS, REFERENCES, metrics=("SPICE",), tokenize=False)
    with pytest.raises(TypeError, match="bare string"):
        caption_scores(PREDICTIONS, REFERENCES, metrics="CIDEr", tokenize=False)


# ---- VQA ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two.", "2"),
        ("the dog", "dog"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("1,000", "1000"),  # a digit,digit comma makes every mark vanish instead of turning into a space
        ("yes,no", "yes no"),
        ("red, white", "red white"),
        ("t-shirt", "t shirt"),
        ("3.5", "3.5"),
        ("  A  Big\tDog!\n", "big dog"),
        ("none", "0"),
        ("an apple", "apple"),
    ],
)
def test_normalize_vqa_answer(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        # k of 10 answers match. Leaving out a matching answer leaves k-1 matches, leaving out another leaves k:
        # acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10.
        (4, 1.0),  # (4*1 + 6*1)/10
        (3, 0.9),  # (3*2/3 + 7*1)/10
        (2, 0.6),  # (2*1/3 + 8*2/3)/10
        (1, 0.3),  # (1*0 + 9*1/3)/10
        (0, 0.0),
    ],
)
def test_vqa_accuracy_leave_one_out(matches, expected):
    answers = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    # "Don't", "dont " and "don't" all normalise to "don't"; "do not" stays different: 3 matches -> 0.9.
    answers = ["Don't", "dont ", "do not", "don't", "no", "no", "no", "no", "no", "no"]
    assert vqa_accuracy("DONT", answers) == pytest.approx(0.9)
    assert vqa_accuracy("The Dog.", ["dog"] * 10) == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("dog", [])


def test_vqa_score_weighted():
    assert vqa_score_weighted("Two", ["2", "3"], [0.9, 0.3]) == pytest.approx(0.9)
    assert vqa_score_weighted("four", ["2", "3"], [0.9, 0.3]) == 0.0
    assert vqa_score_weighted("the cat", ["cat", "Cat.", "dog"], [0.3, 0.6, 1.0]) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="2 answers but 1 weights"):
        vqa_score_weighted("2", ["2", "3"], [1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vqa_score_weighted("2", ["2"], [1.5])


# ---- grounding ---------------------------------------------------------------------------------------------


def test_box_iou_hand_worked():
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)  # inter 1, union 4 + 4 - 1
    assert box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(0.25)  # contained: 4 / 16
    assert box_iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0  # touching edges
    assert box_iou((0, 0, 1, 1), (5, 5, 6, 6)) == 0.0
    assert box_iou((10, 20, 30, 40), (10, 20, 30, 40)) == 1.0
    with pytest.raises(ValueError, match="x1 < x0"):
        box_iou((2, 0, 1, 1), (0, 0, 1, 1))


def test_grounding_accuracy_hand_worked():
    pred = [(0, 0, 2, 2), (0, 0, 2, 2), (0, 0, 2, 1), (0, 0, 1, 1)]
    gt = [(0, 0, 2, 2), (1, 1, 3, 3), (0, 0, 2, 2), (3, 3, 4, 4)]
    # IoUs 1, 1/7, exactly 0.5 (inter 2 / union 4, counts), 0 -> 2 of 4.
    assert grounding_accuracy(pred, gt) == 0.5
    assert grounding_accuracy(pred, gt, threshold=0.1) == 0.75
    with pytest.raises(ValueError, match="3 predicted boxes but 4"):
        grounding_accuracy(pred[:3], gt)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        grounding_accuracy([(0, 0, 1)], [(0, 0, 1)])


# ---- GLUE --------------------------------------------------------------------------------------------------

BIN_PRED = [1, 1, 0, 1, 0, 0, 1, 0]
BIN_GOLD = [1, 0, 0, 1, 1, 0, 1, 0]  # tp 3, fp 1, fn 1, tn 3
MC_GOLD = [0, 0, 1, 1, 2, 2]
MC_PRED = [0, 1, 1, 1, 2, 0]


def test_glue_metrics_hand_worked():
    assert accuracy(BIN_PRED, BIN_GOLD) == 0.75
    assert f1_binary(BIN_PRED, BIN_GOLD, positive=1) == pytest.approx(0.75)  # 2*3 / (2*3 + 1 + 1)
    assert f1_binary(BIN_PRED, BIN_GOLD, positive=0) == pytest.approx(0.75)
    assert matthews_corrcoef(BIN_PRED, BIN_GOLD) == pytest.approx(0.5)  # (9 - 1) / sqrt(4*4*4*4)
    # Gorodkin: c = 4 correct, s = 6, gold counts t = (2, 2, 2), pred counts p = (2, 3, 1):
    # (c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) = (24 - 12) / sqrt(22 * 24)
    assert matthews_corrcoef(MC_PRED, MC_GOLD) == pytest.approx(12 / math.sqrt(528))
    labels = {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert matthews_corrcoef([labels[p] for p in MC_PRED], [labels[g] for g in MC_GOLD]) == pytest.approx(
        12 / math.sqrt(528)
    )
    assert accuracy(MC_PRED, MC_GOLD) == pytest.approx(4 / 6)
    assert matthews_corrcoef([1, 1, 1], [1, 1, 1]) == 0.0  # undefined
    assert f1_binary([0, 0], [0, 0], positive=1) == 0.0  # no positives anywhere
    with pytest.raises(ValueError, match="3 predictions but 2 gold"):
        accuracy([1, 2, 3], [1, 2])


def test_glue_metrics_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn is not installed; hand-worked test covers it")
    assert accuracy(MC_PRED, MC_GOLD) == pytest.approx(sk.accuracy_score(MC_GOLD, MC_PRED))
    assert f1_binary(BIN_PRED, BIN_GOLD, 1) == pytest.approx(sk.f1_score(BIN_GOLD, BIN_PRED, pos_label=1))
    assert matthews_corrcoef(BIN_PRED, BIN_GOLD) == pytest.approx(sk.matthews_corrcoef(BIN_GOLD, BIN_PRED))
    assert matthews_corrcoef(MC_PRED, MC_GOLD) == pytest.approx(sk.matthews_corrcoef(MC_GOLD, MC_PRED))


# ---- summarisation ROUGE -----------------------------------------------------------------------------------

PRED = "The cat sat on the mat"  # 6 tokens after lowercasing
REF = "a cat was sitting on the mat today"  # 8 tokens


def test_rouge_hand_worked():
    # Unigrams: cat, on, the (once in ref), mat -> 4 overlaps.
    assert rouge_n(PRED, REF, 1) == pytest.approx({"p": 4 / 6, "r": 4 / 8, "f": 4 / 7})
    # Bigrams: "on the", "the mat" -> 2 of 5 predicted, 2 of 7 reference; F = 2*(2/5)(2/7)/(2/5+2/7) = 1/3.
    assert rouge_n(PRED, REF, 2) == pytest.approx({"p": 2 / 5, "r": 2 / 7, "f": 1 / 3})
    # LCS "cat on the mat" = 4.
    assert rouge_l(PRED, REF) == pytest.approx({"p": 4 / 6, "r": 4 / 8, "f": 4 / 7})
    assert rouge_n("hello", "hello world", 2) == {"p": 0.0, "r": 0.0, "f": 0.0}
    scores = summarization_scores([PRED, "Hello world"], [REF, "hello world"])
    assert scores == pytest.approx({"ROUGE_1": 50 * (4 / 7 + 1), "ROUGE_2": 50 * (1 / 3 + 1),
                                    "ROUGE_L": 50 * (4 / 7 + 1)})
    with pytest.raises(ValueError, match="positive int"):
        rouge_n(PRED, REF, 0)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        summarization_scores([PRED, PRED], [REF])
