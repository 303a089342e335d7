"""What the tests that start a Serve application share: a fresh ofa-micro bundle to serve."""

from __future__ import annotations

from pathlib import Path

import torch

from ofa_model.architecture import get_config
from ofa_model.bundle import save_bundle
from ofa_model.model import OFAModel
from ofa_model.preprocess import PreprocessConfig
from ofa_model.vocab import Vocabulary


def micro_bundle(path: Path, patch_image_size: int = 64) -> Path:
    """A randomly initialised (seed 0) ofa-micro bundle at `path`: the same weights, so the same answers, every time."""
    torch.manual_seed(0)
    return save_bundle(path, OFAModel(get_config("ofa-micro")), Vocabulary.gpt2(),
                       preprocess=PreprocessConfig(patch_image_size=patch_image_size))
