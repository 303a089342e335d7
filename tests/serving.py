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


def micro_image_bundle(path: Path, tokenizer: bool = True, n_embed: int = 512) -> Path:
    """An untrained (seed 0) ofa-micro bundle that generates 64 px images (code_image_size 64: 8 x 8 = 64 codes),
    carrying an untrained (seed 0) vqgan-micro tokenizer with `n_embed` codes unless `tokenizer` is False."""
    from ofa_model.vqgan import VQGAN, save_tokenizer, tokenizer_config

    image_tokenizer = None
    if tokenizer:
        torch.manual_seed(0)
        image_tokenizer = save_tokenizer(path.with_name(path.name + "-tokenizer"),
                                         VQGAN(tokenizer_config("vqgan-micro", n_embed=n_embed)))
    torch.manual_seed(0)
    return save_bundle(path, OFAModel(get_config("ofa-micro", code_image_size=64)), Vocabulary.gpt2(),
                       preprocess=PreprocessConfig(patch_image_size=64), image_tokenizer=image_tokenizer)
