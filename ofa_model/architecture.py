"""Architecture configs: one frozen dataclass per size, saved beside the weights.

Only architecture lives here, with what every released OFA checkpoint really used baked in
(NormFormer layernorms and head scaling, attention scale factor 2, no position entangling).
Training knobs (dropout, drop-path, learning rate) live in `Regularization` / the training config.

A config is checked field by field when it is built: a bundle's config.json is untrusted input, so a
wrong type, a value out of range or an absurd size is a `ConfigError` naming the key, before any
tensor is allocated. The bounds are far above ofa-huge; they only stop nonsense.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from ofa_model.errors import ConfigError, check_keys, check_value

# Inclusive (low, high) bounds of the integer fields. ofa-huge: embed 1280, ffn 5120, 24/12 layers, 16 heads.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "embed_dim": (1, 16384),
    "ffn_dim": (1, 65536),
    "encoder_layers": (1, 256),
    "decoder_layers": (1, 256),
    "attention_heads": (1, 1024),
    "vocab_size": (1, 1_000_000),
    "pad_id": (0, 999_999),
    "max_source_positions": (2, 65536),
    "max_target_positions": (2, 65536),
    "token_bucket_size": (2, 65536),
    "image_bucket_size": (1, 256),
    "code_image_size": (8, 2048),
    "resnet_width": (8, 256),
    "resnet_out_channels": (128, 4096),  # the ResNet's stage 3 gives 16 * resnet_width channels
}
RESNET_MAX_BLOCKS = 256  # per stage; ResNet-152 has 36


@dataclass(frozen=True)
class OFAConfig:
    """Architecture of one OFA model size."""

    name: str
    embed_dim: int
    ffn_dim: int
    encoder_layers: int
    decoder_layers: int
    attention_heads: int
    resnet_layers: tuple[int, ...]  # Bottleneck blocks in ResNet stages 1..3 (stage 4 is never built)
    vocab_size: int = 59457  # 4 specials + 50,260 text + <mask> + 8,192 codes + 1,000 bins
    pad_id: int = 1  # the vocabulary's <pad>; checked against the vocabulary when a bundle loads
    max_source_positions: int = 1024
    max_target_positions: int = 1024
    token_bucket_size: int = 256
    image_bucket_size: int = 42  # largest image grid: 42 x 42 patches (672 px at stride 16)
    attn_scale_factor: float = 2.0  # attention scaling 1/sqrt(2 * head_dim)
    code_image_size: int = 128  # decoder image-code window is code_image_size // 8 on a side
    layer_norm_eps: float = 1e-5
    resnet_out_channels: int = 1024  # ResNet stage 3 output (stride 16): 16 * resnet_width
    # The ResNet's stem channels and stage-1 planes (stages 2 and 3 double them): OFA's 64 in every released size.
    # A narrower one is for models trained from scratch on small images, where the full-width ResNet dominates a
    # step (ofa-micro at 64 px on 2 CPU cores: bench/train.py)
    resnet_width: int = 64

    def __post_init__(self) -> None:
        owner = "OFAConfig"
        if not isinstance(self.name, str) or not 0 < len(self.name) <= 100:
            raise ConfigError(f"{owner}.name must be a non-empty string of at most 100 characters, got {self.name!r}")
        for key, (lo, hi) in INT_BOUNDS.items():
            check_value(f"{owner}.{key}", getattr(self, key), int, lo, hi)
        check_value(f"{owner}.attn_scale_factor", self.attn_scale_factor, float, 0.0, 1e3, low_open=True)
        check_value(f"{owner}.layer_norm_eps", self.layer_norm_eps, float, 0.0, 1.0, low_open=True)
        layers = self.resnet_layers
        if not isinstance(layers, tuple) or len(layers) != 3:
            raise ConfigError(f"{owner}.resnet_layers must list 3 stages (a tuple; a list in JSON), got {layers!r}")
        for i, blocks in enumerate(layers):
            check_value(f"{owner}.resnet_layers[{i}]", blocks, int, 1, RESNET_MAX_BLOCKS)
        if self.resnet_out_channels != 16 * self.resnet_width:
            raise ConfigError(f"{owner}.resnet_out_channels {self.resnet_out_channels} must be 16 * resnet_width "
                              f"({16 * self.resnet_width}): the ResNet's stage 3 gives that many channels")
        if self.embed_dim % self.attention_heads:
            raise ConfigError(f"{owner}.embed_dim {self.embed_dim} is not divisible by "
                              f"attention_heads {self.attention_heads}")
        if self.pad_id >= self.vocab_size:
            raise ConfigError(f"{owner}.pad_id {self.pad_id} must be below vocab_size {self.vocab_size}")
        if self.code_image_size % 8 or self.code_image_size // 8 > self.image_bucket_size:
            raise ConfigError(f"{owner}.code_image_size {self.code_image_size} must be a multiple of 8 whose grid "
                              f"side (code_image_size // 8) is at most image_bucket_size {self.image_bucket_size}")
        shortest = min(self.max_source_positions, self.max_target_positions)
        if self.token_bucket_size // 2 >= shortest - 1:  # the log buckets span (bucket // 2, positions - 1]
            raise ConfigError(f"{owner}.token_bucket_size {self.token_bucket_size}: token_bucket_size // 2 must be "
                              f"below min(max_source_positions, max_target_positions) - 1 = {shortest - 1}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["resnet_layers"] = list(self.resnet_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> OFAConfig:
        """Inverse of `to_dict`; unknown or missing keys and bad values raise ConfigError naming them."""
        check_keys(cls, d, "OFAConfig")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"missing OFAConfig keys: {missing}")
        d = dict(d)
        if isinstance(d["resnet_layers"], list):
            d["resnet_layers"] = tuple(d["resnet_layers"])
        return cls(**d)


@dataclass(frozen=True)
class Regularization:
    """Training-time regularisation; all zero (the default) for inference."""

    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_drop_path: float = 0.0  # max rate; layers get linspace(0, rate, n)
    decoder_drop_path: float = 0.0
    resnet_drop_path: float = 0.0


_SIZES: dict[str, dict] = {
    "ofa-micro": dict(embed_dim=64, ffn_dim=256, encoder_layers=2, decoder_layers=2, attention_heads=4,
                      resnet_layers=(1, 1, 1)),
    "ofa-tiny": dict(embed_dim=256, ffn_dim=1024, encoder_layers=4, decoder_layers=4, attention_heads=4,
                     resnet_layers=(3, 4, 6)),  # "resnet50" stages 1-3
    "ofa-medium": dict(embed_dim=512, ffn_dim=2048, encoder_layers=4, decoder_layers=4, attention_heads=8,
                       resnet_layers=(3, 4, 23)),  # "resnet101"
    "ofa-base": dict(embed_dim=768, ffn_dim=3072, encoder_layers=6, decoder_layers=6, attention_heads=12,
                     resnet_layers=(3, 4, 23)),  # "resnet101"
    "ofa-large": dict(embed_dim=1024, ffn_dim=4096, encoder_layers=12, decoder_layers=12, attention_heads=16,
                      resnet_layers=(3, 8, 36)),  # "resnet152"
    "ofa-huge": dict(embed_dim=1280, ffn_dim=5120, encoder_layers=24, decoder_layers=12, attention_heads=16,
                     resnet_layers=(3, 8, 36)),  # "resnet152", head_dim 80
}

ARCHITECTURES = tuple(_SIZES)


def get_config(name: str, **overrides) -> OFAConfig:
    """The architecture config of a named size; `overrides` replace fields (e.g. code_image_size=256). A
    resnet_width override sizes resnet_out_channels with it."""
    if name not in _SIZES:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {', '.join(_SIZES)}")
    check_keys(OFAConfig, overrides, "OFAConfig override")
    if "resnet_width" in overrides and "resnet_out_channels" not in overrides:
        width = overrides["resnet_width"]
        if isinstance(width, int) and not isinstance(width, bool):
            overrides = {**overrides, "resnet_out_channels": 16 * width}
    return OFAConfig(**{"name": name, **_SIZES[name], **overrides})
