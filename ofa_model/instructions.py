"""Custom tasks from one declarative line: `[IMAGE:image] what does the image describe? -> [TEXT:caption]`
becomes a `TaskSpec` (a bundle's `custom_tasks`, a training config's `tasks`)."""

from __future__ import annotations

import re
import reprlib

from ofa_model.errors import ConfigError
from ofa_model.tasks import TASKS, TaskSpec

_SLOT = re.compile(r"\[(\w*):([^\]]*)\]")
_SOURCE_KINDS = ("IMAGE", "TEXT", "BOX")
_TARGET_KINDS = {"TEXT": "text", "BOX": "box", "LABEL": "label"}
MAX_INSTRUCTION_SLOTS = 100  # [TEXT:column] slots of one instruction line (OFA's prompts have at most 2)


def parse_instruction(line: str, name: str = "custom") -> TaskSpec:
    """A TaskSpec from one line such as
    `[IMAGE:image] what does the image describe? -> [TEXT:caption]` or
    `[IMAGE:img] which region does the text " [TEXT:phrase] " describe? -> [BOX:box]`.

    Source slots: [IMAGE:col] (at most one), [TEXT:col] (text filled into the prompt; at most
    MAX_INSTRUCTION_SLOTS), [BOX:col] (a region rendered as 4 location tokens). Target: exactly one [TEXT:col],
    [BOX:col] or [LABEL:col] (a class word, scored against candidates). Braces in the prompt are literal text.
    A malformed line is a ConfigError naming the instruction and the slot or limit.
    """
    if not isinstance(line, str):
        raise ConfigError(f"custom task {name}: the instruction must be a line of text, got {type(line).__name__}")

    def bad(message: str) -> ConfigError:
        return ConfigError(f"instruction {reprlib.repr(line) if len(line) > 200 else repr(line)}: {message}")

    if line.count("->") != 1:
        raise bad("needs exactly one '->' between source and target")
    left, right = (s.strip() for s in line.split("->"))
    for kind, col in _SLOT.findall(line):
        if not col.strip() or not re.fullmatch(r"[A-Za-z_][\w.]*", col.strip()):
            raise bad(f"slot [{kind}:{col}] needs a column name (letters, digits, _)")
    image_cols = [c for k, c in _SLOT.findall(left) if k == "IMAGE"]
    for kind, col in _SLOT.findall(left):
        if kind not in _SOURCE_KINDS:
            raise bad(f"unknown source slot [{kind}:{col}]; use one of "
                      f"{', '.join(f'[{k}:column]' for k in _SOURCE_KINDS)}")
    if len(image_cols) > 1:
        raise bad(f"at most one [IMAGE:column] slot, got {image_cols}")
    targets = _SLOT.findall(right)
    if len(targets) != 1 or _SLOT.sub("", right).strip():
        raise bad(f"the target side must be exactly one slot such as [TEXT:column], got {reprlib.repr(right)}")
    t_kind, t_col = targets[0]
    if t_kind not in _TARGET_KINDS:
        raise bad(f"unknown target slot [{t_kind}:{t_col}]; use [TEXT:column], [BOX:column] or [LABEL:column]")
    if t_kind == "BOX" and not image_cols:
        raise bad(f"target [BOX:{t_col}] needs an [IMAGE:column] slot to locate it in")
    boxes = [c for k, c in _SLOT.findall(left) if k == "BOX"]
    if len(boxes) > 1:
        raise bad(f"at most one [BOX:column] source slot, got {boxes}")
    if boxes and not image_cols:
        raise bad(f"source [BOX:{boxes[0]}] needs an [IMAGE:column] slot")
    text = re.sub(r"\[IMAGE:[^\]]*\]", "", left)
    text = re.sub(r"\[BOX:[^\]]*\]", "", text)
    n_text = len(_SLOT.findall(text))
    if n_text > MAX_INSTRUCTION_SLOTS:
        raise bad(f"{n_text} [TEXT:column] slots, over the limit of {MAX_INSTRUCTION_SLOTS} (MAX_INSTRUCTION_SLOTS)")
    slots: list[tuple[str, str]] = []

    def repl(m: re.Match) -> str:
        ph = f"slot{len(slots)}"
        slots.append((ph, m.group(2).strip()))
        return "{" + ph + "}"

    text = _SLOT.sub(repl, text.replace("{", "{{").replace("}", "}}"))  # the line's own braces stay literal
    prompt = " " + " ".join(text.split())
    if not prompt.strip() and not slots:
        raise bad("the source has no prompt text")
    kind = _TARGET_KINDS[t_kind]
    spec = TaskSpec(
        name=name, prompt=prompt, slots=tuple(slots), image_field=image_cols[0].strip() if image_cols else None,
        target_kind=kind, target_field=t_col.strip(), region_field=boxes[0].strip() if boxes else None,
        inference="candidates" if kind == "label" else "generate",
        metric={"text": "caption", "box": "grounding", "label": "classification"}[kind], clean_caption=kind == "text",
        generation=TASKS["grounding"].generation if kind == "box" else TaskSpec("x", "").generation,
    )
    return spec
