"""Importing the official OFA checkpoints (fairseq `.pt`, or the HF port's weights) and converting them into
bundles.

The files are read as untrusted input (`ofa_model.safe_load`), their names mapped and checked strictly against
the architecture (`ofa_model.weights`), and the result written as a bundle (`ofa_model.bundle`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ofa_model.architecture import OFAConfig, get_config
from ofa_model.bundle import (
    DICT_MAX_BYTES,
    check_bundle_target,
    check_preprocess_fits,
    save_bundle,
)
from ofa_model.model import OFAModel
from ofa_model.preprocess import PreprocessConfig
from ofa_model.safe_load import read_fairseq_state, read_state_file, regular_input
from ofa_model.vocab import Vocabulary
from ofa_model.weights import CheckpointError, load_weights, map_state_dict, strip_wrapper

__all__ = ["code_grid_side", "convert_checkpoint", "import_checkpoint"]

log = logging.getLogger(__name__)


def import_checkpoint(path: str | Path, config: OFAConfig, *, use_ema: bool = False, fmt: str = "auto") -> OFAModel:
    """Build `config` and load an official checkpoint (fairseq .pt or HF-port weights) into it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file() and path.suffix == ".pt":
        raw = read_fairseq_state(path, use_ema=use_ema)
    else:
        if use_ema:
            raise CheckpointError(f"{path}: EMA weights exist only in fairseq .pt checkpoints")
        raw = read_state_file(path)
    side = code_grid_side(strip_wrapper(raw), config.image_bucket_size)
    if side is not None and side * 8 != config.code_image_size:
        log.info("%s: decoder image-code grid is %dx%d: code_image_size %d", path, side, side, side * 8)
        config = dataclasses.replace(config, code_image_size=side * 8)
    model = OFAModel(config)
    load_weights(model, map_state_dict(raw, fmt), source=str(path))
    return model.eval()


def code_grid_side(sd: dict[str, torch.Tensor], bucket_size: int = 42) -> int | None:
    """Side of the image-code grid recorded in an official `decoder.image_position_idx` buffer.

    The buffer is [0, 1, 2, ..., side, bucket_size + 1, ...]: ids rise by one along the first grid
    row, then jump to the next row. None when the buffer is absent or does not look like that.
    """
    idx = sd.get("decoder.image_position_idx")
    if idx is None or idx.ndim != 1 or not 3 <= idx.numel() <= 65536 or idx.is_floating_point():
        return None
    ids = idx.tolist()
    if ids[0] != 0 or ids[1] != 1:
        return None
    side = 1
    while side + 1 < len(ids) and ids[side + 1] == ids[side] + 1:
        side += 1
    return side if side + 1 < len(ids) and ids[side + 1] == bucket_size + 1 and side <= bucket_size else None


def _read_dict_txt(path: str | Path) -> Vocabulary:
    path = regular_input(Path(path), "--dict file")
    if path.stat().st_size > DICT_MAX_BYTES:
        raise CheckpointError(f"--dict file {path} is over the {DICT_MAX_BYTES:,}-byte cap; is it OFA's dict.txt?")
    try:
        return Vocabulary.from_dict_txt(path)
    except ValueError as e:  # the vocabulary's error for a malformed dict.txt
        raise CheckpointError(f"--dict file {path}: {e}") from e


def convert_checkpoint(input_path: str | Path, arch: str, output: str | Path, *, preprocess: PreprocessConfig,
                       dict_path: str | Path | None = None, gpt2_vocab: bool = False, use_ema: bool = False,
                       fmt: str = "auto", overwrite: bool = False,
                       answer_sets: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Import an official checkpoint and write it as a bundle with `preprocess` (and `answer_sets`, task ->
    answers, e.g. OFA's VQA answers for its VQA checkpoint); returns a JSON-ready summary.

    Official checkpoints index text by OFA's dict.txt, so `dict_path` is required unless `gpt2_vocab` says the
    weights were trained with ofa-ray's GPT-2 id order. The preprocessing and the output are checked before the
    checkpoint is read.
    """
    if dict_path is None and not gpt2_vocab:
        raise CheckpointError("pass --dict (OFA's utils/BPE/dict.txt): official checkpoints index text tokens in its "
                              "order; use --gpt2-vocab only for weights trained with ofa-ray's GPT-2 layout")
    config = get_config(arch)
    check_preprocess_fits(preprocess, config)
    check_bundle_target(Path(output), overwrite)
    vocab = _read_dict_txt(dict_path) if dict_path else Vocabulary.gpt2()
    model = import_checkpoint(input_path, config, use_ema=use_ema, fmt=fmt)
    save_bundle(output, model, vocab, preprocess=preprocess, overwrite=overwrite, answer_sets=answer_sets,
                metadata={"source": str(input_path), "ema": use_ema, "arch": arch})
    return {"output": str(output), "arch": arch, "parameters": model.num_parameters(), "vocab": vocab.layout,
            "ema": use_ema, "preprocess": preprocess.to_dict()}
