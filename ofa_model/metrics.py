"""Evaluation metrics for the OFA tasks: COCO captions, VQA, grounding, GLUE and Gigaword ROUGE.

Caption metrics go through pycocoevalcap (imported lazily: it is only needed when captions are scored),
with the Stanford PTB tokenizer and METEOR run as Java subprocesses. Everything else is plain Python/numpy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# COCO caption metrics (pycocoevalcap)
# --------------------------------------------------------------------------------------------------------------

BLEU_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4")
CAPTION_METRICS = ("CIDEr", *BLEU_KEYS, "METEOR", "ROUGE_L")
_PTB_TIMEOUT_S = 600.0


def caption_scores(
    predictions: dict[str, str],
    references: dict[str, list[str]],
    metrics: Sequence[str] = ("CIDEr", "BLEU_4", "METEOR", "ROUGE_L"),
    tokenize: bool = True,
    *,
    cider_by_image: dict | None = None,
) -> dict[str, float]:
    """Corpus-level COCO caption scores for one caption per image against its references.

    predictions: image id -> generated caption; references: image id -> non-empty list of reference captions.
    tokenize=True runs the Stanford PTB tokenizer (Java, lowercases, drops punctuation tokens) on both sides,
    as the COCO evaluation does; tokenize=False expects already tokenised text (whitespace is only collapsed).
    Returns the requested keys: "CIDEr" (CIDEr-D: sigma=6, clipped counts, x10), "BLEU_1".."BLEU_4" (all four
    whenever any BLEU is asked; corpus BLEU with the closest reference length), "METEOR" (1.5, Java), "ROUGE_L"
    (LCS F with beta=1.2, averaged over images). All scores are 0..1 except CIDEr (0..10).
    CIDEr-D takes its idf from the references of the images scored together, so score a whole split at once
    (a single image always gets CIDEr 0). `cider_by_image`, a dict, receives each image's CIDEr-D (the corpus
    score is their mean) when CIDEr is asked for.
    """
    wanted = _check_metric_names(metrics)
    ids = _check_caption_inputs(predictions, references)
    if tokenize:
        preds, refs = _ptb_tokenize_captions(ids, predictions, references)
    else:
        preds = {i: _collapse_whitespace(predictions[i]) for i in ids}
        refs = {i: [_collapse_whitespace(r) for r in references[i]] for i in ids}
    gts = refs
    res = {i: [preds[i]] for i in ids}

    scores: dict[str, float] = {}
    if "CIDEr" in wanted:
        from pycocoevalcap.cider.cider import Cider

        corpus, per_image = Cider().compute_score(gts, res)
        scores["CIDEr"] = float(corpus)
        if cider_by_image is not None:
            cider_by_image.update({i: float(v) for i, v in zip(ids, per_image, strict=True)})
    if any(k in wanted for k in BLEU_KEYS):
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({key: float(value) for key, value in zip(BLEU_KEYS, bleu, strict=True)})
    if "METEOR" in wanted:
        scores["METEOR"] = _meteor_score(gts, res)
    if "ROUGE_L" in wanted:
        from pycocoevalcap.rouge.rouge import Rouge

        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    return scores


def _check_metric_names(metrics: Sequence[str]) -> set[str]:
    if isinstance(metrics, str):
        raise TypeError(f"metrics must be a sequence of names such as ({metrics!r},), not a bare string")
    wanted = set(metrics)
    if not wanted:
        raise ValueError(f"metrics is empty; choose from {CAPTION_METRICS}")
    unknown = sorted(str(m) for m in wanted - set(CAPTION_METRICS))
    if unknown:
        hint = " (SPICE needs a CoreNLP download and is not available offline)" if "SPICE" in unknown else ""
        raise ValueError(f"unknown caption metric(s) {unknown}; choose from {CAPTION_METRICS}{hint}")
    return wanted


def _check_caption_inputs(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> list:
    """Validates the two dicts and returns the image ids in the order of `references`."""
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise TypeError(
            "predictions and references must be dicts keyed by image id, got "
            f"{type(predictions).__name__} and {type(references).__name__}"
        )
    if not references:
        raise ValueError("references is empty: nothing to score")
    missing = [i for i in references if i not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} image id(s) have references but no prediction, e.g. {missing[:5]!r}")
    extra = [i for i in predictions if i not in references]
    if extra:
        raise ValueError(f"{len(extra)} image id(s) have a prediction but no references, e.g. {extra[:5]!r}")
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"prediction for image id {image_id!r} must be a str, got {type(caption).__name__}")
    for image_id, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise TypeError(
                f"references for image id {image_id!r} must be a list of str, got {type(refs).__name__}"
            )
        if len(refs) == 0:
            raise ValueError(f"references for image id {image_id!r} are empty")
        for k, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise TypeError(f"reference {k} of image id {image_id!r} must be a str, got {type(ref).__name__}")
            if not ref.strip():
                raise ValueError(f"reference {k} of image id {image_id!r} is blank")
    return list(references)


def _collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("`java` is not on PATH; the PTB tokenizer and METEOR need a Java runtime (17 works)")
    return java


def _pycocoevalcap_dir() -> Path:
    import pycocoevalcap

    return Path(next(iter(pycocoevalcap.__path__)))


def _ptb_tokenize_captions(
    ids: list, predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]
) -> tuple[dict[Any, str], dict[Any, list[str]]]:
    """PTB-tokenises all captions in one Java call; returns (predictions, references) with the same ids."""
    texts = [predictions[i] for i in ids]
    for i in ids:
        texts.extend(references[i])
    tokens = iter(_ptb_tokenize(texts))
    preds = {i: next(tokens) for i in ids}
    refs = {i: [next(tokens) for _ in references[i]] for i in ids}
    return preds, refs


def _ptb_tokenize(texts: list[str]) -> list[str]:
    """Stanford PTBTokenizer as pycocoevalcap runs it (jar and punctuation list from pycocoevalcap).

    One line per text: lowercased, tokens joined by single spaces, punctuation tokens removed.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    jar = _pycocoevalcap_dir() / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR
    if not jar.is_file():
        raise RuntimeError(f"PTB tokenizer jar not found at {jar}; is pycocoevalcap 1.2 installed completely?")
    cmd = [_require_java(), "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer"]
    cmd += ["-preserveLines", "-lowerCase", "-encoding", "utf-8"]
    # One caption per line: line breaks inside a caption would shift every later caption.
    payload = "".join(" ".join(text.splitlines()) + "\n" for text in texts)
    start = time.perf_counter()
    proc = subprocess.run(cmd, input=payload.encode("utf-8"), capture_output=True, timeout=_PTB_TIMEOUT_S)
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace").strip()
        raise RuntimeError(f"PTB tokenizer failed (exit {proc.returncode}): {stderr[-2000:]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(texts):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(texts)} captions")
    logger.debug("PTB-tokenised %d captions in %.2f s", len(texts), time.perf_counter() - start)
    punctuation = set(PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in punctuation) for line in lines]


def _meteor_score(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> float:
    """Corpus METEOR 1.5 through pycocoevalcap's Java wrapper; the Java process is always shut down."""
    for image_id, captions in gts.items():
        if any("|||" in c for c in captions):
            raise ValueError(f"a reference of image id {image_id!r} contains '|||', METEOR's field separator")
    _require_java()
    from pycocoevalcap.meteor.meteor import Meteor

    start = time.perf_counter()
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    except (ValueError, OSError) as err:  # the Java side died or answered something that is not a number
        _stop_meteor(scorer)
        stderr = scorer.meteor_p.stderr.read().decode("utf-8", "replace").strip()
        raise RuntimeError(f"METEOR (Java) failed: {err}; stderr: {stderr[-2000:]}") from err
    finally:
        _stop_meteor(scorer)
    logger.debug("METEOR on %d images in %.2f s", len(gts), time.perf_counter() - start)
    return float(score)


def _stop_meteor(scorer: Any) -> None:
    """Ends the METEOR Java process; safe to call twice."""
    proc = scorer.meteor_p
    with contextlib.suppress(OSError):
        proc.stdin.close()
    proc.kill()
    proc.wait()
    if scorer.lock.locked():  # compute_score died mid-protocol; Meteor.__del__ would block on this lock
        scorer.lock.release()


# --------------------------------------------------------------------------------------------------------------
# VQA (official VQA v2 accuracy and OFA's confidence score)
# --------------------------------------------------------------------------------------------------------------

# Punctuation of the official evaluation; '.' and "'" are handled separately (periods) or kept (apostrophes).
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official regex `(?!<=\d)(\.)(?!\d)` only excludes periods followed by a digit ("3.5" keeps its period).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe-less spellings -> the forms used in the VQA v2 annotations (lowercase keys: answers are lowercased
# first). Ambiguous real words (well, hell, were, its, id, shed, wed) are deliberately absent.
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldnt've": "couldn't've", "couldn'tve": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebodyd": "somebody'd",
    "somebodys": "somebody's", "someoned": "someone'd", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def normalize_vqa_answer(ans: str) -> str:
    """VQA v2 answer normalisation (vqaEval.py semantics): punctuation, lowercase, number words, articles,
    contractions. E.g. "Two." -> "2", "the Dog" -> "dog", "dont" -> "don't", "1,000" -> "1000"."""
    if not isinstance(ans, str):
        raise TypeError(f"VQA answer must be a str, got {type(ans).__name__}")
    text = ans.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_vqa_punctuation(text)
    words = []
    for word in text.lower().split():
        word = _VQA_NUMBER_WORDS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(_VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _strip_vqa_punctuation(text: str) -> str:
    # Official rule: a mark is deleted when it touches a space or when the answer has a digit,digit comma
    # ("1,000"); otherwise it becomes a space ("t-shirt" -> "t shirt"). Both tests look at the input text.
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy: mean over the leave-one-out subsets of the human answers of
    min(1, #subset answers equal to the prediction / 3). Both sides are normalised first."""
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty list of human answers, got {answers!r}")
    pred = normalize_vqa_answer(prediction)
    hits = [normalize_vqa_answer(a) == pred for a in answers]
    total = sum(hits)
    return sum(min(1.0, (total - hit) / 3.0) for hit in hits) / len(hits)


def vqa_score_weighted(prediction: str, answers: Sequence[str], weights: Sequence[float]) -> float:
    """OFA's VQA score: the confidence (0..1) of the reference answer equal to the prediction, 0 if none.
    Answers that normalise to the same string keep their highest confidence."""
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"answers must be a non-empty list, got {answers!r}")
    if len(weights) != len(answers):
        raise ValueError(f"got {len(answers)} answers but {len(weights)} weights")
    best: dict[str, float] = {}
    for k, (answer, weight) in enumerate(zip(answers, weights, strict=True)):
        weight = float(weight)
        if not 0.0 <= weight <= 1.0:  # also rejects NaN
            raise ValueError(f"weight {k} (answer {answer!r}) must lie in [0, 1], got {weight}")
        key = normalize_vqa_answer(answer)
        best[key] = max(best.get(key, 0.0), weight)
    return best.get(normalize_vqa_answer(prediction), 0.0)


# --------------------------------------------------------------------------------------------------------------
# Visual grounding
# --------------------------------------------------------------------------------------------------------------


def _as_boxes(boxes: Any, name: str) -> np.ndarray:
    """(N, 4) float64 array of (x0, y0, x1, y1) with x0 <= x1, y0 <= y1 and finite values."""
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numbers of shape (N, 4): {err}") from err
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) as (x0, y0, x1, y1), got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] = {arr[bad[0]].tolist()} has a non-finite coordinate")
    bad = np.flatnonzero((arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1]))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] = {arr[bad[0]].tolist()} has x1 < x0 or y1 < y0")
    return arr


def _paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of a[i] with b[i]: (N, 4), (N, 4) -> (N,); 0 where the union has no area."""
    inter_w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0, None)
    inter_h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0, None)
    inter = inter_w * inter_h
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when they do not overlap."""
    boxes_a = _as_boxes([a], "box a")
    boxes_b = _as_boxes([b], "box b")
    return float(_paired_iou(boxes_a, boxes_b)[0])


def grounding_accuracy(pred_boxes: Any, gt_boxes: Any, threshold: float = 0.5) -> float:
    """Acc@threshold for referring expressions: fraction of pairs (N, 4), (N, 4) with IoU >= threshold."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    pred = _as_boxes(pred_boxes, "pred_boxes")
    gt = _as_boxes(gt_boxes, "gt_boxes")
    if len(pred) != len(gt):
        raise ValueError(f"got {len(pred)} predicted boxes but {len(gt)} ground-truth boxes")
    if len(pred) == 0:
        raise ValueError("no boxes to score")
    return float(np.mean(_paired_iou(pred, gt) >= threshold))


# --------------------------------------------------------------------------------------------------------------
# GLUE classification
# --------------------------------------------------------------------------------------------------------------


def _check_labels(pred: Sequence[Hashable], gold: Sequence[Hashable]) -> tuple[list, list]:
    pred, gold = list(pred), list(gold)
    if len(pred) != len(gold):
        raise ValueError(f"got {len(pred)} predictions but {len(gold)} gold labels")
    if not gold:
        raise ValueError("no labels to score")
    return pred, gold


def accuracy(pred: Sequence[Hashable], gold: Sequence[Hashable]) -> float:
    """Fraction of positions where pred equals gold."""
    pred, gold = _check_labels(pred, gold)
    return sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)


def f1_binary(pred: Sequence[Hashable], gold: Sequence[Hashable], positive: Hashable) -> float:
    """F1 of the `positive` class (every other label is negative); 0.0 when neither side has a positive."""
    pred, gold = _check_labels(pred, gold)
    tp = sum(p == positive and g == positive for p, g in zip(pred, gold, strict=True))
    fp = sum(p == positive and g != positive for p, g in zip(pred, gold, strict=True))
    fn = sum(p != positive and g == positive for p, g in zip(pred, gold, strict=True))
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def matthews_corrcoef(pred: Sequence[Hashable], gold: Sequence[Hashable]) -> float:
    """Matthews correlation; for K > 2 classes Gorodkin's R_K. 0.0 when undefined (a constant side)."""
    pred, gold = _check_labels(pred, gold)
    index: dict[Hashable, int] = {}
    for label in (*gold, *pred):
        index.setdefault(label, len(index))
    confusion = np.zeros((len(index), len(index)), dtype=np.float64)  # (K gold, K pred)
    np.add.at(confusion, ([index[g] for g in gold], [index[p] for p in pred]), 1.0)
    true_counts = confusion.sum(axis=1)
    pred_counts = confusion.sum(axis=0)
    n = float(len(gold))
    cov_gold_pred = np.trace(confusion) * n - true_counts @ pred_counts
    cov_pred = n * n - pred_counts @ pred_counts
    cov_gold = n * n - true_counts @ true_counts
    if cov_pred == 0.0 or cov_gold == 0.0:
        return 0.0
    return float(cov_gold_pred / math.sqrt(cov_pred * cov_gold))


# --------------------------------------------------------------------------------------------------------------
# Summarisation ROUGE (lowercase whitespace tokens, no stemming)
# --------------------------------------------------------------------------------------------------------------


def _rouge_tokens(text: str, name: str) -> list[str]:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    return text.lower().split()


def _prf(overlap: int, n_pred: int, n_ref: int) -> dict[str, float]:
    p = overlap / n_pred if n_pred else 0.0
    r = overlap / n_ref if n_ref else 0.0
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"p": p, "r": r, "f": f}


def rouge_n(prediction: str, reference: str, n: int) -> dict[str, float]:
    """ROUGE-N precision, recall and F1 of one prediction against one reference (clipped n-gram counts)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    pred = _rouge_tokens(prediction, "prediction")
    ref = _rouge_tokens(reference, "reference")
    pred_grams = Counter(tuple(pred[i : i + n]) for i in range(len(pred) - n + 1))
    ref_grams = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
    overlap = sum((pred_grams & ref_grams).values())
    return _prf(overlap, sum(pred_grams.values()), sum(ref_grams.values()))


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-L (longest common subsequence) precision, recall and F1 (beta=1)."""
    pred = _rouge_tokens(prediction, "prediction")
    ref = _rouge_tokens(reference, "reference")
    return _prf(_lcs_length(pred, ref), len(pred), len(ref))


def summarization_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over pairs, scaled to 0..100, as {"ROUGE_1", "ROUGE_2", "ROUGE_L"}."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists of str, not a single str")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("no summaries to score")
    totals = {"ROUGE_1": 0.0, "ROUGE_2": 0.0, "ROUGE_L": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        totals["ROUGE_1"] += rouge_n(pred, ref, 1)["f"]
        totals["ROUGE_2"] += rouge_n(pred, ref, 2)["f"]
        totals["ROUGE_L"] += rouge_l(pred, ref)["f"]
    return {key: 100.0 * value / len(predictions) for key, value in totals.items()}
