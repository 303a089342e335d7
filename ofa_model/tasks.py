"""Every OFA task as data: prompt, how a row becomes model inputs, how output becomes an answer.

`TASKS` is a plain dict of frozen `TaskSpec`s. A row is a plain dict with the canonical fields of
`pipelines/data/schema.py` (`image`, `text`, `text2`, `target`, `targets`, `target_weights`, `box`,
`object_boxes`, `object_labels`, `codes`) or, for custom tasks, any column names.

`build_example(spec, row, ...)` gives one training/evaluation sample (the input of
`preprocess.collate`); `inference_request(...)` gives what the predictor decodes, and
`parse_output(...)` turns generated tokens into a JSON-ready answer. Prompts are OFA's exact
wording, leading space included.

Text from a row or a request is user text: it is encoded as plain BPE (`Vocabulary.encode`) and never
becomes a location, image-code or mask token; only text infilling reads `<mask>` in its input. What a
target kind decides (its tokens, its answer, its decoding constraint) lives in `TARGETS`.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import reprlib
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Literal, get_args

import numpy as np
import torch

from ofa_model.architecture import OFAConfig
from ofa_model.errors import (
    BAD_BOX,
    BAD_TYPE,
    DUPLICATE_CANDIDATE,
    EMPTY_TEXT,
    MISSING_FIELD,
    NO_HYPOTHESIS,
    UNKNOWN_LABEL,
    WRONG_CODE_COUNT,
    ConfigError,
    InputError,
    check_choice,
    error_dict,
)
from ofa_model.generation import Constraint, GenerationConfig, PrefixTrie
from ofa_model.preprocess import (
    PreprocessConfig,
    check_box,
    decode_image,
    grounding_train_augment,
    model_pixels,
    normalize_caption,
    normalize_question,
    normalize_text,
    resize_pixels,
)
from ofa_model.vqgan import DOWNSAMPLE

PIXEL_KINDS = ("float", "uint8")

TargetKind = Literal["text", "label", "box", "codes", "objects", "infill_text"]
# decoder input: "none" <s> target, "prev_output" <s> source target, "src" the whole source
PromptType = Literal["none", "prev_output", "src"]
# "generate": decode an answer; "candidates": score each candidate answer; "last_token": classify from the
# decoder's last position over single-token labels (GLUE)
InferenceKind = Literal["generate", "candidates", "last_token"]
TARGET_KINDS: tuple[str, ...] = get_args(TargetKind)
PROMPT_TYPES: tuple[str, ...] = get_args(PromptType)
INFERENCE_KINDS: tuple[str, ...] = get_args(InferenceKind)
_INFILL_TOKENS = 256  # text infilling keeps the last 256 tokens of its text, as OFA
_RESULT_KEYS = ("score", "scores", "alternatives", "error")  # keys predict adds beside the answer
NORMALIZERS = {
    "caption": normalize_caption,
    "question": normalize_question,
    "text": normalize_text,
    "lower": lambda s, max_words=None: " ".join(s.lower().split()[:max_words] if max_words else s.lower().split()),
    "none": lambda s, max_words=None: s,
    # Gigaword: OFA's pre_caption plus its "<unk>" -> "unk" replacement
    "summary": lambda s, max_words=None: normalize_text(s.replace("<unk>", "unk"), max_words=max_words),
}


class TaskInputError(InputError):
    """A row or request does not fit its task; the message says which field and why, `reason` is a code."""


class NoAnswerError(InputError):
    """Decoding gave no answer of the task's form for this input (no hypothesis, a box without 4 location
    tokens), typically under the request's own decoding settings; reported per input like an input error."""

    reason = NO_HYPOTHESIS


def _placeholders(task: str, prompt: str) -> set[str]:
    """Names of the `{name}` fields of a prompt. Any other replacement field (`{0}`, `{a.b}`, `{a!r}`, `{a:>9}`)
    or a lone brace is a ConfigError: a prompt is filled with `str.format`, so it may only name its slots."""
    if not isinstance(prompt, str):
        raise ConfigError(f"task {task}: prompt must be a string, got {type(prompt).__name__}")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(prompt) if name is not None]
    except ValueError as e:  # str.format's error for a lone brace
        raise ConfigError(f"task {task}: prompt {reprlib.repr(prompt)}: {e}; write a literal brace as '{{{{' "
                          "or '}}}}'") from None
    for name, spec, conv in fields:
        if not re.fullmatch(r"[A-Za-z_]\w*", name) or spec or conv:
            raise ConfigError(f"task {task}: prompt field {{{name}{'!' + conv if conv else ''}"
                              f"{':' + spec if spec else ''}}} must be a slot name such as {{text}}, without "
                              "index, attribute, conversion or format")
    return {name for name, _, _ in fields}


@dataclass(frozen=True)
class TaskSpec:
    """One task: prompt, inputs, target, decoding defaults and metric."""

    name: str
    prompt: str  # OFA wording with "{slot}" placeholders
    slots: tuple[tuple[str, str], ...] = ()  # (placeholder, row field)
    slot_norm: str = "text"  # normaliser of slot text (see NORMALIZERS)
    image_field: str | None = "image"  # None: text-only task
    target_kind: TargetKind = "text"
    target_field: str = "target"
    target_norm: str = "caption"
    target_space: bool = True  # " {target}" (all but summarisation)
    labels: tuple[str, ...] = ()  # closed label set, as words without the leading space
    prompt_type: PromptType = "none"
    inference: InferenceKind = "generate"
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(beam_size=5, max_len_b=16,
                                                                                  no_repeat_ngram_size=3))
    metric: str = "caption"  # how predictions are scored (the metric kinds of `ofa_model.evaluation.METRICS`)
    primary: str | None = None  # the metric models are compared by; None: the metric kind's first
    region_field: str | None = None  # grounded captioning: a box rendered as 4 bins after the prompt
    prev_noise: float = 0.0  # fraction of decoder-input tokens replaced at random in training (summarisation)
    image_infill: bool = False  # zero the centre of the image (image infilling)
    code_target: bool = False  # decoder emits image codes (code positions / layernorm)
    output_key: str | None = None  # key of the answer in predict's output; None: the target kind's (`answer_key`)
    clean_caption: bool = False  # generated text gets OFA's caption clean-up (`normalize_caption`)
    # codes a row's target must hold, (code_image_size // 8)^2 of the model trained (`for_code_image_size`);
    # None: not checked
    code_count: int | None = None
    # images the task generates are ranked by this candidate task's probability of its first label ("itm": yes),
    # asked of each image with the input's slot fields; None: ranked by their log-probability
    rerank_task: str | None = None

    def __post_init__(self) -> None:
        for attr, allowed in (("target_kind", TARGET_KINDS), ("prompt_type", PROMPT_TYPES),
                              ("inference", INFERENCE_KINDS), ("slot_norm", tuple(NORMALIZERS)),
                              ("target_norm", tuple(NORMALIZERS))):
            check_choice(f"task {self.name}: {attr}", getattr(self, attr), allowed)
        names = _placeholders(self.name, self.prompt)
        if names != {p for p, _ in self.slots}:
            raise ConfigError(f"task {self.name}: prompt placeholders {sorted(names)} != slots {self.slots}")
        if self.inference == "candidates" and self.target_kind not in ("label", "text"):
            raise ConfigError(f"task {self.name}: candidate scoring needs text or label targets")
        if self.code_count is not None and (self.target_kind != "codes" or isinstance(self.code_count, bool)
                                            or not isinstance(self.code_count, int) or self.code_count < 1):
            raise ConfigError(f"task {self.name}: code_count is for image-code targets and must be a positive int, "
                              f"got {self.code_count!r} (target_kind {self.target_kind!r})")
        if self.output_key is not None and (not isinstance(self.output_key, str) or not self.output_key
                                            or self.output_key in _RESULT_KEYS):
            raise ConfigError(f"task {self.name}: output_key must be a non-empty str other than {_RESULT_KEYS}, "
                              f"got {self.output_key!r}")

    @property
    def answer_key(self) -> str:
        """Key of the answer in predict's output: `output_key`, else the target kind's ("text", "label", "box"...)."""
        return self.output_key or TARGETS[self.target_kind].output_key

    def replace(self, **changes) -> TaskSpec:
        return dataclasses.replace(self, **changes)


def _gen(**kw) -> GenerationConfig:
    return GenerationConfig(**kw)


_YES_NO = ("yes", "no")
_LABEL_GEN = _gen(beam_size=1, max_len_b=8)  # unused by candidate scoring, kept for open generation
# OFA's sampling of image codes; the length is never a setting: exactly the model's code grid (`codes_per_image`)
_CODE_GEN = _gen(sampling=True, top_k=256, temperature=1.0, num_return_sequences=1)
_GLUE = dict(image_field=None, slot_norm="text", target_kind="label", prompt_type="src", inference="last_token",
             generation=_LABEL_GEN, metric="classification")

TASKS: dict[str, TaskSpec] = {
    "caption": TaskSpec("caption", " what does the image describe?", clean_caption=True),
    "vqa": TaskSpec("vqa", " {question}", slots=(("question", "text"),), slot_norm="question",
                    target_norm="lower", prompt_type="prev_output", metric="vqa", output_key="answer",
                    generation=_gen(beam_size=5, max_len_b=10, normalize_scores=False)),
    "grounding": TaskSpec("grounding", ' which region does the text " {text} " describe?', slots=(("text", "text"),),
                          target_kind="box", target_field="box", metric="grounding",
                          generation=_gen(beam_size=5, min_len=4, max_len_b=4, no_repeat_ngram_size=3)),
    "visual_entailment": TaskSpec("visual_entailment", ' does the image describe " {text} "?', slots=(("text", "text"),),
                                  target_kind="label", labels=("no", "yes", "maybe"), prompt_type="prev_output",
                                  inference="candidates", generation=_LABEL_GEN, metric="classification"),
    "image_classification": TaskSpec("image_classification", " what does the image describe?", target_norm="lower",
                                     inference="candidates", generation=_LABEL_GEN, metric="classification",
                                     output_key="label"),
    "itm": TaskSpec("itm", ' does the image describe " {text} "?', slots=(("text", "text"),), target_kind="label",
                    labels=_YES_NO, inference="candidates", generation=_LABEL_GEN, metric="classification"),
    "qa_matching": TaskSpec("qa_matching", ' what is the answer to question " {question} ". is " {answer} "?',
                            slots=(("question", "text"), ("answer", "text2")), target_kind="label", labels=_YES_NO,
                            inference="candidates", generation=_LABEL_GEN, metric="classification"),
    "grounded_caption": TaskSpec("grounded_caption", "  what does the region describe? region:",
                                 region_field="box", target_norm="text", clean_caption=True),
    "glue_cola": TaskSpec("glue_cola", ' is the text " {text} " grammatically correct?', slots=(("text", "text"),),
                          labels=_YES_NO, primary="mcc", **_GLUE),
    "glue_sst2": TaskSpec("glue_sst2", ' is the sentiment of text " {text} " positive or negative?',
                          slots=(("text", "text"),), labels=("positive", "negative"), **_GLUE),
    "glue_mnli": TaskSpec("glue_mnli", ' can text1 " {text1} " imply text2 " {text2} "?',
                          slots=(("text1", "text"), ("text2", "text2")), labels=("yes", "maybe", "no"), **_GLUE),
    "glue_rte": TaskSpec("glue_rte", ' can text1 " {text1} " imply text2 " {text2} "?',
                         slots=(("text1", "text"), ("text2", "text2")), labels=_YES_NO, **_GLUE),
    "glue_mrpc": TaskSpec("glue_mrpc", ' does text1 " {text1} " and text2 " {text2} " have the same semantics?',
                          slots=(("text1", "text"), ("text2", "text2")), labels=_YES_NO, primary="f1", **_GLUE),
    "glue_qqp": TaskSpec("glue_qqp", ' is question " {q1} " and question " {q2} " equivalent?',
                         slots=(("q1", "text"), ("q2", "text2")), labels=_YES_NO, primary="f1", **_GLUE),
    "glue_qnli": TaskSpec("glue_qnli", ' does " {sentence} " contain the answer to question " {question} "?',
                          slots=(("sentence", "text2"), ("question", "text")), labels=_YES_NO, **_GLUE),
    "summarization": TaskSpec("summarization", ' what is the summary of article " {text} "?', slots=(("text", "text"),),
                              image_field=None, slot_norm="summary", target_norm="summary", target_space=False,
                              prev_noise=0.2, metric="summarization",
                              generation=_gen(beam_size=6, length_penalty=0.7, max_len_b=32, no_repeat_ngram_size=3)),
    "text_to_image": TaskSpec("text_to_image", " what is the complete image? caption: {text}", slots=(("text", "text"),),
                              image_field=None, slot_norm="lower", target_kind="codes", target_field="codes",
                              code_target=True, metric="none", generation=_CODE_GEN, rerank_task="itm"),
    "image_infilling": TaskSpec("image_infilling", " what is the image in the middle part?", target_kind="codes",
                                target_field="codes", image_infill=True, code_target=True, metric="none",
                                generation=_CODE_GEN),
    "text_infilling": TaskSpec("text_infilling", ' what is the complete text of " "?', image_field=None,
                               target_kind="infill_text", target_field="text", target_norm="lower", metric="none"),
    "detection": TaskSpec("detection", " what are the objects in the image?", target_kind="objects",
                          target_field="object_boxes", metric="none",
                          generation=_gen(beam_size=5, max_len_b=100)),
}
# Tasks whose correct answer is one of their fixed labels; the rest take candidates per request.
# The pretraining mixtures of OFA also use `itm`, `qa_matching`, `grounded_caption` and the infilling tasks.


def codes_per_image(code_image_size: int) -> int:
    """Image codes of one target or generated image of a model whose `OFAConfig.code_image_size` is
    `code_image_size`: the (code_image_size // 8)^2 codes of text-to-image's whole image and of image infilling's
    centre alike (OFA: 1024 at text-to-image's 256 px, 256 for pretraining's 128 px centres)."""
    return (code_image_size // DOWNSAMPLE) ** 2


# OFA's image-infilling data: the 16 x 16 VQGAN codes of a 256 x 256 image's 128 x 128 centre, made for the
# code_image_size its models pretrain at (the architectures' default)
INFILL_CODES = codes_per_image(OFAConfig.code_image_size)


def for_code_image_size(specs: Mapping[str, TaskSpec], code_image_size: int) -> dict[str, TaskSpec]:
    """`specs` with every image-code task's `code_count` set for a model of `code_image_size`, so that
    `build_example` refuses a row whose codes were made at another size (a bad row, `wrong_code_count`)."""
    n = codes_per_image(code_image_size)
    return {name: spec.replace(code_count=n) if spec.target_kind == "codes" else spec
            for name, spec in specs.items()}


# ----------------------------------------------------------------------------------------------
# Rows -> samples


def _field(row: Mapping[str, Any], name: str, task: str) -> Any:
    if name not in row:
        raise TaskInputError(f"task {task}: field {name!r} is missing (row has {sorted(row)})", MISSING_FIELD)
    value = row[name]
    if value is None:
        raise TaskInputError(f"task {task}: field {name!r} is missing (null)", MISSING_FIELD)
    if isinstance(value, str) and not value.strip():
        raise TaskInputError(f"task {task}: field {name!r} is empty", EMPTY_TEXT)
    return value


def _box(value: Any, task: str, name: str) -> np.ndarray:
    """(4,) float64 x0, y0, x1, y1 of a row's box field (`preprocess.check_box`)."""
    try:
        return np.array(check_box(value, f"field {name!r}"))
    except InputError as e:
        raise TaskInputError(f"task {task}: {e}", BAD_BOX) from e


def _truncate(ids: list[int], n: int) -> list[int]:
    return ids[:n]


def source_text(spec: TaskSpec, row: Mapping[str, Any], pcfg: PreprocessConfig) -> str:
    """The filled prompt for `row`."""
    norm = NORMALIZERS[spec.slot_norm]
    values = {}
    for ph, col in spec.slots:
        value = _field(row, col, spec.name)
        if not isinstance(value, str):
            raise TaskInputError(f"task {spec.name}: field {col!r} must be text, got {type(value).__name__}",
                                 BAD_TYPE)
        try:
            values[ph] = norm(value, max_words=pcfg.max_src_length) if spec.slot_norm != "none" else value
        except ValueError as e:  # e.g. a question with nothing left after normalisation
            raise TaskInputError(f"task {spec.name}: field {col!r}: {e}", EMPTY_TEXT) from e
        if not values[ph]:
            raise TaskInputError(f"task {spec.name}: field {col!r} is empty after normalisation", EMPTY_TEXT)
    return spec.prompt.format(**values)


def _load_image(spec, row, pcfg, train, rng, box=None, pixels="float"):
    """(tensor, original (w, h), box in resized pixels or None). pixels "float": the normalised float32 image,
    its centre blanked for image infilling; "uint8": the resized pixels, not normalised and not blanked."""
    data = _field(row, spec.image_field, spec.name)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TaskInputError(f"task {spec.name}: field {spec.image_field!r} must be image bytes, "
                             f"got {type(data).__name__}", BAD_TYPE)
    img = decode_image(bytes(data), pcfg, source=str(row.get("id")) if row.get("id") is not None else None)
    size = img.size
    s = pcfg.patch_image_size
    if box is not None:
        if box[0] < -1 or box[1] < -1 or box[2] > size[0] + 1 or box[3] > size[1] + 1:
            raise TaskInputError(f"task {spec.name}: box {box.tolist()} lies outside the {size[0]}x{size[1]} image",
                                 BAD_BOX)
        if train and rng is not None:
            img, box = grounding_train_augment(img, box, pcfg, rng)
            size_after = img.size
        else:
            size_after = size
        box = box * np.array([s / size_after[0], s / size_after[1]] * 2)
    tensor = resize_pixels(img, pcfg)
    if pixels == "float":
        tensor = model_pixels(tensor, pcfg, blank=spec.image_infill)
    return tensor, size, box


def _bins(vocab, box: np.ndarray, pcfg: PreprocessConfig) -> list[int]:
    """4 location tokens of a box in resized (S x S) pixels, normalised by max_image_size as OFA."""
    side = pcfg.patch_image_size
    return vocab.encode_box(tuple(float(v) for v in box), (side, side), scale=pcfg.box_scale)


def text_target_tokens(spec: TaskSpec, text: str, vocab, pcfg: PreprocessConfig) -> list[int]:
    """BPE ids of a text target (leading space as OFA), normalised and truncated (no EOS); plain text only."""
    norm = NORMALIZERS[spec.target_norm]
    text = norm(text, max_words=pcfg.max_tgt_length) if spec.target_norm != "none" else text
    if not text:
        raise TaskInputError(f"task {spec.name}: target is empty after normalisation", EMPTY_TEXT)
    return _truncate(vocab.encode((" " if spec.target_space else "") + text), pcfg.max_tgt_length)


def _source_tokens(spec: TaskSpec, row: Mapping[str, Any], vocab, pcfg: PreprocessConfig,
                   region_box: np.ndarray | None) -> list[int]:
    """<s> prompt [region bins] </s>, the prompt truncated to max_src_length tokens."""
    ids = vocab.encode(source_text(spec, row, pcfg))  # the filled prompt holds user text: plain BPE
    if spec.region_field is not None:
        ids = ids + _bins(vocab, region_box, pcfg)
    return [vocab.bos_id] + _truncate(ids, pcfg.max_src_length) + [vocab.eos_id]


def _infill_tokens(spec: TaskSpec, row: Mapping[str, Any], vocab, *, masked: bool) -> list[int]:
    """BPE ids of the (normalised) text to infill: its last 256 tokens, as OFA keeps them. `masked`: the text is
    an inference input where a literal <mask> marks missing words; else a training target, plain text only."""
    text = _field(row, spec.target_field, spec.name)
    if not isinstance(text, str):
        raise TaskInputError(f"task {spec.name}: field {spec.target_field!r} must be text", BAD_TYPE)
    encode = vocab.encode_masked if masked else vocab.encode
    return encode(" " + NORMALIZERS[spec.target_norm](text))[-_INFILL_TOKENS:]


def max_source_length(spec: TaskSpec, vocab, pcfg: PreprocessConfig) -> int:
    """The longest source (BOS and EOS included) `build_example` or `inference_request` can give for `spec`."""
    if spec.target_kind == "infill_text":
        return len(vocab.encode(spec.prompt)) + _INFILL_TOKENS + 2
    return pcfg.max_src_length + 2


def _infill_source(spec: TaskSpec, masked: list[int], vocab) -> list[int]:
    """OFA's framing: prompt up to its opening quote, the masked text, then the closing '"?' tokens."""
    prompt = vocab.encode(spec.prompt)  # ... ' of' ' "' ' "' '?'
    return [vocab.bos_id] + prompt[:-2] + masked + prompt[-2:] + [vocab.eos_id]


def span_mask(tokens: list[int], word_start: list[bool], mask_id: int, rng: np.random.Generator,
              ratio: float = 0.3, poisson_lambda: float = 3.0) -> list[int]:
    """BART text infilling: whole-word spans with Poisson(λ) lengths (>= 1) cover ~ratio of the words;
    each span becomes one <mask>."""
    starts = [i for i, s in enumerate(word_start) if s] or [0]
    if starts[0] != 0:
        starts = [0] + starts
    words = [tokens[a:b] for a, b in zip(starts, starts[1:] + [len(tokens)], strict=True)]
    n_mask = int(math.ceil(len(words) * ratio))
    masked = np.zeros(len(words), dtype=bool)
    while masked.sum() < n_mask:
        length = max(1, int(rng.poisson(poisson_lambda)))
        start = int(rng.integers(0, len(words)))
        masked[start:start + length] = True
    out: list[int] = []
    for w, m in zip(words, masked, strict=True):
        if m:
            if not out or out[-1] != mask_id:
                out.append(mask_id)
        else:
            out.extend(w)
    return out


def build_example(spec: TaskSpec, row: Mapping[str, Any], vocab, pcfg: PreprocessConfig, *, train: bool = False,
                  rng: np.random.Generator | None = None, pixels: str = "float") -> dict:
    """One sample for `preprocess.collate`: source, image, prev_output, target, target_weight, code_mask.

    pixels "float" (default): image is the (3, S, S) float32 model input. "uint8": image is the (3, S, S) uint8
    resized pixels and the sample also has image_blank (bool); the model input is then
    `model_pixels(image, pcfg, blank=image_blank)`, bit for bit the "float" image.
    """
    if pixels not in PIXEL_KINDS:
        raise ValueError(f"build_example: pixels must be one of {PIXEL_KINDS}, got {pixels!r}")
    bos, eos, pad = vocab.bos_id, vocab.eos_id, vocab.pad_id
    image, size, box = None, None, None
    region = None
    target_box = _box(_field(row, spec.target_field, spec.name), spec.name, spec.target_field) \
        if spec.target_kind == "box" else None
    if spec.region_field is not None:
        region = _box(_field(row, spec.region_field, spec.name), spec.name, spec.region_field)
    if spec.image_field is not None:
        image, size, box = _load_image(spec, row, pcfg, train, rng, target_box if target_box is not None else region,
                                       pixels)

    if spec.target_kind == "infill_text":  # the source is the target with whole-word spans masked, as OFA
        tgt = TARGETS[spec.target_kind].tokens(spec, row, vocab, pcfg, box, size)
        starts = [vocab.id_to_token(t).startswith("\u0120") for t in tgt]  # "Ġ" marks a word start
        masked = span_mask(tgt, starts, vocab.mask_id, rng if rng is not None else np.random.default_rng(0))
        src = _infill_source(spec, masked, vocab)
    else:
        src = _source_tokens(spec, row, vocab, pcfg, box)
        tgt = TARGETS[spec.target_kind].tokens(spec, row, vocab, pcfg, box, size)

    weight = 1.0
    if spec.target_kind in ("text", "label") and row.get("target_weights") is not None and row.get("targets"):
        # VQA: the chosen answer's confidence weights the loss
        answers, weights = list(row["targets"]), list(row["target_weights"])
        if len(answers) != len(weights):
            raise TaskInputError(f"task {spec.name}: {len(answers)} targets but {len(weights)} target_weights",
                                 BAD_TYPE)
        tgt_text = row.get(spec.target_field)
        if tgt_text in answers:
            w = weights[answers.index(tgt_text)]
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                raise TaskInputError(f"task {spec.name}: target_weights must be finite numbers >= 0, got {w!r}",
                                     BAD_TYPE)
            weight = float(w)

    if spec.prompt_type == "src":  # GLUE: decoder reads the whole source, predicts the label at the end
        prev = list(src)
        target = [pad] * (len(src) - 1) + tgt[:1]
    elif spec.prompt_type == "prev_output":  # VQA/SNLI-VE: decoder reads source (no EOS) then the answer
        prev = src[:-1] + tgt
        target = [pad] * (len(src) - 2) + tgt + [eos]
    else:
        prev = [bos] + tgt
        target = tgt + [eos]
    if train and spec.prev_noise > 0 and rng is not None:
        noise = rng.random(len(prev)) < spec.prev_noise
        noise[0] = False
        rand = rng.integers(4, vocab.mask_id, len(prev))
        prev = [int(r) if n else p for p, n, r in zip(prev, noise, rand, strict=True)]
    sample = {"id": row.get("id"), "source": src, "image": image, "prev_output": prev, "target": target,
              "target_weight": weight, "code_mask": spec.code_target, "image_size": size}
    if pixels == "uint8":
        sample["image_blank"] = image is not None and spec.image_infill
    return sample


# ----------------------------------------------------------------------------------------------
# Target kinds: one home each (training target tokens, answer from generated tokens, decoding constraint)


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _target_text(spec: TaskSpec, row: Mapping[str, Any]) -> str:
    text = _field(row, spec.target_field, spec.name)
    if not isinstance(text, str):
        raise TaskInputError(f"task {spec.name}: field {spec.target_field!r} must be text", BAD_TYPE)
    return text


def _text_tokens(spec, row, vocab, pcfg, box, image_size) -> list[int]:
    return text_target_tokens(spec, _target_text(spec, row), vocab, pcfg)


def _label_tokens(spec, row, vocab, pcfg, box, image_size) -> list[int]:
    label = _target_text(spec, row)
    if spec.labels and label not in spec.labels:
        raise TaskInputError(f"task {spec.name}: label {label!r} is not one of {list(spec.labels)}", UNKNOWN_LABEL)
    return text_target_tokens(spec, label, vocab, pcfg)


def _box_tokens(spec, row, vocab, pcfg, box, image_size) -> list[int]:
    return _bins(vocab, box, pcfg)  # `box` is the target box, already in resized pixels


def _code_tokens(spec, row, vocab, pcfg, box, image_size) -> list[int]:
    codes = _field(row, spec.target_field, spec.name)
    if _is_list(codes) and spec.code_count is not None and len(codes) != spec.code_count:
        raise TaskInputError(f"task {spec.name}: field {spec.target_field!r} holds {len(codes)} image codes, the "
                             f"model trains on {spec.code_count} ((code_image_size // 8)^2): make them at its "
                             "code_image_size (python -m jobs.prepare_data image-codes --code-image-size)",
                             WRONG_CODE_COUNT)
    if not _is_list(codes) or not all(isinstance(c, Integral) and not isinstance(c, bool) for c in codes):
        raise TaskInputError(f"task {spec.name}: field {spec.target_field!r} must be a list of integer codes",
                             BAD_TYPE)
    codes = [operator.index(c) for c in codes]
    if any(not 0 <= c < vocab.num_codes for c in codes):
        raise TaskInputError(f"task {spec.name}: codes must lie in [0, {vocab.num_codes})", BAD_TYPE)
    return [vocab.code_id(c) for c in codes]


def _object_tokens(spec, row, vocab, pcfg, box, image_size) -> list[int]:
    """Detection: repeated (4 location tokens of the box in the original image, label words)."""
    boxes = _field(row, "object_boxes", spec.name)
    labels = _field(row, "object_labels", spec.name)
    if not _is_list(boxes) or not _is_list(labels):
        raise TaskInputError(f"task {spec.name}: object_boxes and object_labels must be lists", BAD_TYPE)
    if len(boxes) != len(labels):
        raise TaskInputError(f"task {spec.name}: {len(boxes)} object_boxes but {len(labels)} object_labels")
    if image_size is None:
        raise TaskInputError(f"task {spec.name}: detection needs an image")
    out: list[int] = []
    for b, label in list(zip(boxes, labels, strict=True))[: pcfg.max_object_length]:
        bb = _box(b, spec.name, "object_boxes")
        if not isinstance(label, str):
            raise TaskInputError(f"task {spec.name}: object_labels must be text, got {type(label).__name__}",
                                 BAD_TYPE)
        out += vocab.encode_box(tuple(bb), image_size, scale=pcfg.box_scale)
        out += vocab.encode(" " + normalize_text(label))
    return _truncate(out, pcfg.max_tgt_length * 4)


def _infill_target_tokens(spec, row, vocab, pcfg, box, image_size) -> list[int]:
    return _infill_tokens(spec, row, vocab, masked=False)  # the whole text, as OFA


def _text_answer(spec, tokens, vocab, req, pcfg) -> str:
    text = vocab.decode(tokens).strip()
    return normalize_caption(text) if spec.clean_caption and text else text


def _box_answer(spec, tokens, vocab, req, pcfg) -> list[float]:
    bins = [t for t in tokens if vocab.is_bin(t)][:4]
    if len(bins) != 4:
        raise NoAnswerError(f"task {spec.name}: the model produced {len(bins)} location tokens, expected 4")
    # bins are relative to the (resized) image, so they decode straight into original pixels
    x0, y0, x1, y1 = vocab.decode_box(bins, req.image_size, pcfg.box_scale)
    w, h = req.image_size
    xs = sorted(min(max(v, 0.0), w) for v in (x0, x1))  # clipped to the image; corners in order
    ys = sorted(min(max(v, 0.0), h) for v in (y0, y1))
    return [xs[0], ys[0], xs[1], ys[1]]


def _code_answer(spec, tokens, vocab, req, pcfg) -> list[int]:
    return [t - vocab.code_offset for t in tokens if vocab.is_code(t)]


def _object_answer(spec, tokens, vocab, req, pcfg) -> list[dict]:
    """Repeated (4 location tokens, label words) -> [{"box", "label"}]."""
    objects, i = [], 0
    while i + 4 <= len(tokens):
        if not all(vocab.is_bin(t) for t in tokens[i:i + 4]):
            i += 1
            continue
        j = i + 4
        while j < len(tokens) and not vocab.is_bin(tokens[j]):
            j += 1
        label = vocab.decode(tokens[i + 4:j]).strip()
        if label:
            box = vocab.decode_box(tokens[i:i + 4], req.image_size, pcfg.box_scale)
            objects.append({"box": list(box), "label": label})
        i = j
    return objects


def _no_constraint(vocab, pcfg: PreprocessConfig) -> Constraint | None:
    return None


def _bin_constraint(vocab, pcfg: PreprocessConfig) -> Constraint:
    """Only bins that fall inside the image (all of them when S == max_image_size), in a box's order: x1 > x0,
    y1 > y0. OFA's RefCOCO scripts decode without a constraint (a fine-tuned model emits ordered bins on its
    own); a model still learning does not, and its box without area scores IoU 0 whatever the reference."""
    last = min(vocab.num_bins - 1, math.ceil((vocab.num_bins - 1) * pcfg.box_scale))
    return Constraint(allowed_ranges=((vocab.bin_offset, vocab.bin_offset + last + 1),), ordered_box=True)


def code_constraint(vocab, n_codes: int | None = None) -> Constraint:
    """Only the first `n_codes` code tokens (an image tokenizer's codebook; default all of the vocabulary's)."""
    lo, hi = vocab.code_range
    return Constraint(allowed_ranges=((lo, hi if n_codes is None else min(hi, lo + n_codes)),))


def _code_constraint(vocab, pcfg: PreprocessConfig) -> Constraint:
    return code_constraint(vocab)


@dataclass(frozen=True)
class TargetRules:
    """What one target kind decides."""

    output_key: str  # default key of the answer in predict's output
    tokens: Callable[..., list[int]]  # (spec, row, vocab, pcfg, target box, image size) -> target ids, no EOS
    answer: Callable[..., Any]  # (spec, generated ids, vocab, request, pcfg) -> answer; NoAnswerError if none
    constraint: Callable[..., Constraint | None] = _no_constraint  # (vocab, pcfg) -> what decoding may emit


TARGETS: dict[str, TargetRules] = {
    "text": TargetRules("text", _text_tokens, _text_answer),
    "label": TargetRules("label", _label_tokens, _text_answer),
    "box": TargetRules("box", _box_tokens, _box_answer, _bin_constraint),
    "codes": TargetRules("codes", _code_tokens, _code_answer, _code_constraint),
    "objects": TargetRules("objects", _object_tokens, _object_answer),
    "infill_text": TargetRules("text", _infill_target_tokens, _text_answer),
}
assert set(TARGETS) == set(TARGET_KINDS)


# ----------------------------------------------------------------------------------------------
# Inference


@dataclass
class InferenceRequest:
    """What the predictor decodes for one input."""

    source: list[int]
    image: torch.Tensor | None
    image_size: tuple[int, int] | None
    prefix: list[int]  # forced decoder prefix after <s>
    constraint: Constraint | None
    candidates: list[str]  # label words (candidate scoring / last-token classification)
    candidate_tokens: list[list[int]]


def inference_request(spec: TaskSpec, item: Mapping[str, Any], vocab, pcfg: PreprocessConfig,
                      mode: str | None = None, default_candidates: Sequence[str] = ()) -> InferenceRequest:
    """Source, image, prefix, constraint and candidates for one predictor input; every text is plain text
    (text infilling's input may hold <mask>). An input without 'candidates' takes `default_candidates` (a
    bundle's answer set for the task), else the task's labels."""
    image = size = None
    region = _box(_field(item, spec.region_field, spec.name), spec.name, spec.region_field) \
        if spec.region_field else None
    box = None
    if spec.image_field is not None:
        image, size, box = _load_image(spec, item, pcfg, False, None, region)
    if spec.target_kind == "infill_text":  # the text already holds <mask> where words are missing
        src = _infill_source(spec, _infill_tokens(spec, item, vocab, masked=True), vocab)
    else:
        src = _source_tokens(spec, item, vocab, pcfg, box)
    prefix = src[1:-1] if spec.prompt_type == "prev_output" else []
    cands = item.get("candidates")
    if cands is None:
        cands = list(default_candidates or spec.labels)
    elif not isinstance(cands, (list, tuple)) or not all(isinstance(c, str) and c.strip() for c in cands):
        raise TaskInputError(f"task {spec.name}: 'candidates' must be a list of non-empty strings", BAD_TYPE)
    else:  # answers are keyed by candidate in "scores": a repeated one would collapse there
        seen: set[str] = set()
        for c in cands:
            if c in seen:
                raise TaskInputError(f"task {spec.name}: 'candidates' lists {reprlib.repr(c)} more than once; "
                                     "each candidate must be unique", DUPLICATE_CANDIDATE)
            seen.add(c)
    cand_tokens = [text_target_tokens(spec.replace(target_kind="text"), c, vocab, pcfg) for c in cands]
    constraint = TARGETS[spec.target_kind].constraint(vocab, pcfg)
    if constraint is None and mode == "trie":  # beam search restricted to the candidate answers
        if not cand_tokens:
            raise TaskInputError(f"task {spec.name}: mode 'trie' needs 'candidates' (a list of answers)",
                                 MISSING_FIELD)
        constraint = Constraint(trie=PrefixTrie(cand_tokens, vocab.eos_id))
    if (spec.inference == "candidates" or mode == "allcand") and not cand_tokens:
        raise TaskInputError(f"task {spec.name}: needs 'candidates' (a list of answers or labels)", MISSING_FIELD)
    if spec.inference == "last_token" and any(len(t) != 1 for t in cand_tokens):
        bad = [c for c, t in zip(cands, cand_tokens, strict=True) if len(t) != 1]
        raise TaskInputError(f"task {spec.name}: labels must be single tokens for last-token classification: {bad}")
    return InferenceRequest(src, image, size, prefix, constraint, list(cands), cand_tokens)


def parse_output(spec: TaskSpec, tokens: list[int], vocab, req: InferenceRequest, pcfg: PreprocessConfig) -> dict:
    """`{spec.answer_key: answer}` from generated tokens (EOS and prefix already removed); an output with no
    answer of the task's form gives `{spec.answer_key: None, "error": {"type", "reason", "message"}}`."""
    try:
        return {spec.answer_key: TARGETS[spec.target_kind].answer(spec, tokens, vocab, req, pcfg)}
    except NoAnswerError as e:
        return {spec.answer_key: None, **error_dict(e)}
