"""Architecture configs: one frozen dataclass per size, saved beside the weights.

Only architecture lives here, with what every released OFA checkpoint really used baked in
(NormFormer layernorms and head scaling, attention scale factor 2, no position entangling).
Training knobs (dropout, drop-path, learning rate) live in `Regularization` / the training config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def check_keys(cls, d, what: str | None = None) -> None:
    """Raise ValueError naming every key of mapping `d` that is not a field of dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what or cls.__name__} keys: {unknown}; known keys: {sorted(known)}")


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
    resnet_out_channels: int = 1024  # ResNet stage 3 output (stride 16)

    def __post_init__(self) -> None:
        if self.embed_dim % self.attention_heads:
            raise ValueError(f"{self.name}: embed_dim {self.embed_dim} not divisible by {self.attention_heads} heads")
        if len(self.resnet_layers) != 3:
            raise ValueError(f"{self.name}: resnet_layers must list 3 stages, got {self.resnet_layers}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["resnet_layers"] = list(self.resnet_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OFAConfig:
        check_keys(cls, d)
        d = dict(d)
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


_SIZES = {
    # name: (embed, ffn, enc layers, dec layers, heads, resnet blocks per stage)
    "ofa-micro": (64, 256, 2, 2, 4, (1, 1, 1)),
    "ofa-tiny": (256, 1024, 4, 4, 4, (3, 4, 6)),  # "resnet50" stages 1-3
    "ofa-medium": (512, 2048, 4, 4, 8, (3, 4, 23)),  # "resnet101"
    "ofa-base": (768, 3072, 6, 6, 12, (3, 4, 23)),  # "resnet101"
    "ofa-large": (1024, 4096, 12, 12, 16, (3, 8, 36)),  # "resnet152"
    "ofa-huge": (1280, 5120, 24, 12, 16, (3, 8, 36)),  # "resnet152", head_dim 80
}

ARCHITECTURES = tuple(_SIZES)


def get_config(name: str, **overrides) -> OFAConfig:
    """The architecture config of a named size; `overrides` replace fields (e.g. code_image_size=256)."""
    if name not in _SIZES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(_SIZES)}")
    d, f, e, dl, h, r = _SIZES[name]
    cfg = OFAConfig(name=name, embed_dim=d, ffn_dim=f, encoder_layers=e, decoder_layers=dl, attention_heads=h, resnet_layers=r)
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
