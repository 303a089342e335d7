"""The image tokenizer: a VQGAN of OFA's kind (taming-transformers' `GumbelVQ`, downsampling factor 8).

An image of `resolution` pixels a side becomes a grid of (resolution / 8)^2 codes, each an index into a codebook
of `n_embed` entries; OFA's decoder writes those codes as `<code_*>` tokens (text-to-image, image infilling) and
`VQGAN.decode` turns them back into pixels. OFA uses taming's `vqgan_gumbel_f8` (8,192 codes, 256 px -> 32 x 32);
`VQGAN_SIZES["vqgan-micro"]` is a small tokenizer that trains on a CPU.

Module and parameter names follow taming's layout (`encoder.down.0.block.0.norm1.weight`,
`quantize.embed.weight`, ...), so the official weights load by name (`ofa_model.vqgan_weights`).

Preprocessing has one owner, the tokenizer: `tokenizer_pixels` resizes to `resolution` (Lanczos, as OFA's
`generate_code.py`) and maps [0, 255] to [-1, 1]; `to_uint8` / `png_bytes` go back. Encoding takes the argmax of the
quantizer's logits (deterministic; training samples Gumbel noise). A tokenizer is saved as its own bundle directory
(`save_tokenizer` / `load_tokenizer`: config.json + model.safetensors), read as untrusted input like a model bundle.

A tokenizer's identity is `weights_digest`, the sha256 of its tensors, which `save_tokenizer` writes into config.json
(`weights_sha256`): codes are only meaningful to the tokenizer that made them, so an image-codes corpus records the
digest of its tokenizer (`pipelines.data.image_codes`) and training compares it with the run's
(`pipelines.train.setup.check_code_corpora`), reading config.json alone (`tokenizer_digest`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ofa_model.errors import ConfigError, check_keys, check_value
from ofa_model.preprocess import centre_square

TOKENIZER_FORMAT = "ofa-ray-image-tokenizer"
TOKENIZER_VERSION = 1
DOWNSAMPLE = 8  # f = 8: every code covers 8 x 8 pixels (OFA: code_image_size // 8 is the grid side)
GROUPS = 32  # taming's GroupNorm groups (OFA's tokenizer); VQGANConfig.norm_groups may choose fewer


@dataclass(frozen=True)
class VQGANConfig:
    """A tokenizer's architecture (taming's ddconfig plus the quantizer), checked field by field when built."""

    name: str = "vqgan_gumbel_f8"
    resolution: int = 256  # image side in pixels = OFA's code_image_size; the grid is resolution // 8 a side
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 4)  # one level per entry; len - 1 halvings, so 4 levels give f = 8
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (32,)  # feature-map sides that get a self-attention block
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 8192  # codebook entries; at most the vocabulary's code tokens
    kl_weight: float = 1e-8  # weight of the quantizer's KL to a uniform prior (taming's GumbelVQ)
    # GroupNorm groups of every norm layer; taming's 32. A narrow tokenizer wants fewer: at 32 channels, 32 groups
    # normalise each channel alone over the image, which erases how strongly it responds, i.e. the colour
    norm_groups: int = GROUPS

    def __post_init__(self) -> None:
        owner = "VQGANConfig"
        if not isinstance(self.name, str) or not 0 < len(self.name) <= 100:
            raise ConfigError(f"{owner}.name must be a non-empty string of at most 100 characters, got {self.name!r}")
        for key, (lo, hi) in _INT_BOUNDS.items():
            check_value(f"{owner}.{key}", getattr(self, key), int, lo, hi)
        if isinstance(self.kl_weight, int) and not isinstance(self.kl_weight, bool):  # YAML/JSON write 0 for 0.0
            object.__setattr__(self, "kl_weight", float(self.kl_weight))
        check_value(f"{owner}.kl_weight", self.kl_weight, float, 0.0, 1e3)
        for key in ("ch_mult", "attn_resolutions"):
            value = getattr(self, key)
            if not isinstance(value, tuple) or len(value) > 8:
                raise ConfigError(f"{owner}.{key} must be a tuple (a list in JSON) of at most 8 ints, got {value!r}")
            for i, v in enumerate(value):
                check_value(f"{owner}.{key}[{i}]", v, int, 1, 4096)
        if 2 ** (len(self.ch_mult) - 1) != DOWNSAMPLE:
            raise ConfigError(f"{owner}.ch_mult {self.ch_mult} has {len(self.ch_mult)} levels; a factor-{DOWNSAMPLE} "
                              f"tokenizer has {int(math.log2(DOWNSAMPLE)) + 1}")
        if self.resolution % DOWNSAMPLE:
            raise ConfigError(f"{owner}.resolution {self.resolution} must be a multiple of {DOWNSAMPLE}")
        for what, c in (("ch", self.ch), ("z_channels", self.z_channels)):
            if c % self.norm_groups:
                raise ConfigError(f"{owner}.{what} {c} must be a multiple of norm_groups {self.norm_groups}")
        if self.embed_dim != self.z_channels:
            # GumbelVQ's quant_conv maps z_channels -> embed_dim and its quantizer's projection reads z_channels
            raise ConfigError(f"{owner}.embed_dim {self.embed_dim} must equal z_channels {self.z_channels} "
                              "(taming's GumbelVQ feeds quant_conv's output to the quantizer)")

    @property
    def grid(self) -> int:
        """Codes a side: resolution // 8."""
        return self.resolution // DOWNSAMPLE

    @property
    def num_codes(self) -> int:
        """Codes per image: grid ** 2."""
        return self.grid ** 2

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping, owner: str = "tokenizer config") -> VQGANConfig:
        check_keys(cls, d, owner)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


_INT_BOUNDS = {
    "resolution": (8, 2048),
    "in_channels": (3, 3),  # RGB: the pixel path (tokenizer_pixels, png_bytes) and OFA's tokenizer
    "out_ch": (3, 3),
    "ch": (1, 4096),
    "num_res_blocks": (1, 16),
    "z_channels": (1, 4096),
    "norm_groups": (1, 4096),
    "embed_dim": (1, 4096),
    "n_embed": (2, 65536),
}

VQGAN_SIZES: dict[str, VQGANConfig] = {
    # OFA's image generation release (taming's vqgan_gumbel_f8 ddconfig, 8192 codes), at text-to-image's 256 px
    "vqgan_gumbel_f8": VQGANConfig(),
    # a tokenizer that trains on a CPU in minutes: easy-VQA's 64 px images as 8 x 8 codes
    "vqgan-micro": VQGANConfig(name="vqgan-micro", resolution=64, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                               attn_resolutions=(), z_channels=64, embed_dim=64, n_embed=512),
}


def tokenizer_config(name: str, **overrides) -> VQGANConfig:
    """The named tokenizer architecture, with `overrides` replacing fields (e.g. resolution=128)."""
    if name not in VQGAN_SIZES:
        raise ConfigError(f"unknown tokenizer architecture {name!r}; known: {sorted(VQGAN_SIZES)}")
    return dataclasses.replace(VQGAN_SIZES[name], **overrides) if overrides else VQGAN_SIZES[name]


# ----------------------------------------------------------------------------------------------
# Modules (taming's names)


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6, affine=True)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, 1, 1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _Attn(nn.Module):
    """Single-head self-attention over the feature map's positions."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, c, h * w).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class _Resample(nn.Module):
    def __init__(self, c: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(c, c, 3, 2, 0) if down else nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:  # taming pads right and bottom only, then a stride-2 convolution
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module]):
        super().__init__()
        self.block, self.attn = nn.ModuleList(blocks), nn.ModuleList(attn)

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = _ResBlock(c, c, groups), _Attn(c, groups), _ResBlock(c, c, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        res, c_in, levels = cfg.resolution, cfg.ch, []
        for i, mult in enumerate(cfg.ch_mult):
            c_out = cfg.ch * mult
            blocks = [_ResBlock(c_in if j == 0 else c_out, c_out, g) for j in range(cfg.num_res_blocks)]
            attn = [_Attn(c_out, g) for _ in blocks] if res in cfg.attn_resolutions else []
            level = _Level(blocks, attn)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = _Resample(c_out, down=True)
                res //= 2
            levels.append(level)
            c_in = c_out
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(c_in, g)
        self.norm_out, self.conv_out = _norm(c_in, g), nn.Conv2d(c_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        g = cfg.norm_groups
        c_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, 1, 1)
        self.mid = _Mid(c_in, g)
        levels: list[_Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks = [_ResBlock(c_in if j == 0 else c_out, c_out, g) for j in range(cfg.num_res_blocks + 1)]
            attn = [_Attn(c_out, g) for _ in blocks] if res in cfg.attn_resolutions else []
            level = _Level(blocks, attn)
            if i != 0:
                level.upsample = _Resample(c_out, down=False)
                res *= 2
            levels.insert(0, level)
            c_in = c_out
        self.up = nn.ModuleList(levels)  # up[0] is the last (full-resolution) level, as taming stores it
        self.norm_out, self.conv_out = _norm(c_in, g), nn.Conv2d(c_in, cfg.out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class GumbelQuantizer(nn.Module):
    """Logits over the codebook per position; training mixes codebook entries by a Gumbel-softmax sample."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.z_channels, cfg.n_embed, 1)
        self.embed = nn.Embedding(cfg.n_embed, cfg.embed_dim)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices -> (B, embed_dim, h, w) codebook vectors."""
        return self.embed(codes).permute(0, 3, 1, 2)


@dataclass
class VQGANOutput:
    pixels: torch.Tensor  # (B, C, S, S) reconstruction in [-1, 1] (not clamped)
    kl: torch.Tensor  # scalar: the quantizer's KL to a uniform prior, times kl_weight
    logits: torch.Tensor  # (B, n_embed, h, w)
    codes: torch.Tensor  # (B, h, w): the code each position used


class VQGAN(nn.Module):
    """Encoder, Gumbel quantizer, decoder. Pixels are (B, 3, S, S) in [-1, 1]; codes are (B, grid * grid), row-major."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.quantize = GumbelQuantizer(config)

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        c = self.config.in_channels
        if pixels.dim() != 4 or pixels.shape[1] != c or pixels.shape[2] != pixels.shape[3] or pixels.shape[2] % DOWNSAMPLE:
            raise ValueError(f"VQGAN expects square pixels (B, {c}, S, S) with S a multiple of {DOWNSAMPLE} "
                             f"(S = {self.config.resolution} for text-to-image), got {tuple(pixels.shape)}")

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, n_embed, grid, grid) codebook logits."""
        self._check_pixels(pixels)
        return self.quantize.proj(self.quant_conv(self.encoder(pixels)))

    def forward(self, pixels: torch.Tensor, temperature: float = 1.0, hard: bool = False) -> VQGANOutput:
        """Reconstruct through a Gumbel-softmax sample of the codebook (straight-through one-hot when `hard`)."""
        logits = self.logits(pixels)
        weights = F.gumbel_softmax(logits, tau=temperature, hard=hard, dim=1)
        z = torch.einsum("bnhw,nd->bdhw", weights, self.quantize.embed.weight)
        q = F.softmax(logits, dim=1)
        kl = self.config.kl_weight * (q * torch.log(q * self.config.n_embed + 1e-10)).sum(1).mean()
        return VQGANOutput(self.decoder(self.post_quant_conv(z)), kl, logits, weights.argmax(1))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, grid * grid) codes: the argmax of each position's logits."""
        return self.logits(pixels).argmax(1).flatten(1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, g * g) codes in [0, n_embed), row-major on a g x g grid -> (B, out_ch, 8g, 8g) pixels in [-1, 1]."""
        g = math.isqrt(codes.shape[1]) if codes.dim() == 2 else 0
        if codes.dim() != 2 or g == 0 or g * g != codes.shape[1]:
            raise ValueError(f"VQGAN.decode expects codes of shape (B, g * g), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.n_embed):
            raise ValueError(f"VQGAN.decode: codes must lie in [0, {self.config.n_embed})")
        z = self.quantize.lookup(codes.reshape(-1, g, g).long())
        return self.decoder(self.post_quant_conv(z)).clamp(-1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Pixels


def tokenizer_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """RGB images -> (B, 3, size, size) in [-1, 1]: Lanczos resize to size x size, then 2x - 1 (OFA's preprocessing)."""
    return from_uint8(resized_uint8(images, size))


def resized_uint8(images: Sequence[Image.Image], size: int) -> np.ndarray:
    """RGB images -> (B, size, size, 3) uint8, Lanczos-resized: `tokenizer_pixels` before the scaling (what a
    training pipeline stores, a quarter of float32's bytes)."""
    arrays = [np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
              for img in images]
    return np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)


def from_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float in [-1, 1] (x / 127.5 - 1)."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def infill_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """(B, 3, size, size) in [-1, 1]: the centre size x size pixels of the images resized to 2 x size, the region
    image infilling blanks and predicts (OFA: the 128 px centre of a 256 px image). `size` is the model's
    code_image_size, a multiple of 8."""
    lo, hi = centre_square(2 * size)
    return tokenizer_pixels(images, 2 * size)[:, :, lo:hi, lo:hi]


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) in [-1, 1] -> (B, S, S, 3) uint8: clamp, then (x + 1) / 2 * 255 rounded."""
    x = ((pixels.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(image: np.ndarray) -> bytes:
    """One (S, S, 3) uint8 image as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two (B, C, S, S) batches in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


# ----------------------------------------------------------------------------------------------
# Tokenizer bundles


DIGEST_KEY = "weights_sha256"  # config.json's record of `weights_digest`; absent from bundles saved before it
_DIGEST = re.compile(r"[0-9a-f]{64}")


def is_digest(value: object) -> bool:
    """Whether `value` is written as `weights_digest` writes one: 64 lowercase hex digits."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A tokenizer's identity: sha256 (hex) over its tensors in name order, each as the line
    "<name>\t<dtype>\t<shape>\n" and then its values' bytes (C order, the host's byte order: little-endian on every
    machine this runs on). The tensors, not model.safetensors' bytes: the file's header depends on the safetensors
    version and on the metadata written beside the tensors, so the same weights re-saved (a tokenizer copied into a
    model bundle by `save_bundle`, a tokenizer saved by another version) keep their digest, and a loaded state dict
    is checked against it without re-reading the file. Measured: OFA's vqgan_gumbel_f8 holds 276 MB, hashed in 0.75 s
    at best (1.3 to 4 s while the shared 2-core development machine was busy), as fast as hashlib over the same bytes;
    `load_tokenizer` pays it once per load."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\t{str(t.dtype).removeprefix('torch.')}\t{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_tokenizer(path: str | Path, model: VQGAN, *, metadata: Mapping | None = None,
                   overwrite: bool = False) -> Path:
    """Write `model` as a tokenizer bundle (config.json + model.safetensors), atomically, like `save_bundle`;
    config.json records the weights' `weights_digest` (`DIGEST_KEY`)."""
    from ofa_model.bundle import CONFIG_FILE, WEIGHTS_FILE, BundleError, write_directory, write_weights
    from ofa_model.weights import non_finite

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = non_finite(state)
    if bad:
        raise BundleError(f"cannot save a tokenizer to {path}: {len(bad)} weights hold NaN or Inf: {', '.join(bad)}")
    body = {"format": TOKENIZER_FORMAT, "format_version": TOKENIZER_VERSION, "model": model.config.to_dict(),
            "metadata": dict(metadata or {}), DIGEST_KEY: weights_digest(state)}
    try:
        text = json.dumps(body, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BundleError(f"cannot save a tokenizer to {path}: metadata must be plain JSON ({e})") from e
    _check_target(path, overwrite)

    def write(tmp: Path) -> None:
        write_weights(state, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(text)

    return write_directory(path, write)


def _check_target(path: Path, overwrite: bool) -> None:
    """BundleError unless `path` is absent, empty, or (with `overwrite`) a tokenizer bundle holding only its files."""
    from ofa_model.bundle import CONFIG_FILE, WEIGHTS_FILE, BundleError

    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BundleError(f"{path} is a symbolic link or not a directory; write the tokenizer to a directory path")
    if not path.exists() or not any(path.iterdir()):
        return
    if not overwrite:
        raise BundleError(f"{path} is not empty; pass overwrite=True (--overwrite) to replace the tokenizer there")
    read_tokenizer_config(path)  # a BundleError unless it is a tokenizer
    foreign = sorted(p.name for p in path.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE))
    if foreign:
        raise BundleError(f"{path} holds files that are not part of its tokenizer bundle: {foreign}; refusing")


@dataclass(frozen=True)
class Tokenizer:
    model: VQGAN
    config: VQGANConfig
    metadata: dict
    digest: str | None = None  # config.json's weights_digest, checked against the weights (None: an older bundle)

    def encode_images(self, images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
        """(B, (size / 8)^2) codes of RGB images resized to `size` (default the tokenizer's resolution), as OFA."""
        device = next(self.model.parameters()).device
        return self.model.encode(tokenizer_pixels(images, self.config.resolution if size is None else size).to(device))

    def encode_centres(self, images: Sequence[Image.Image], size: int) -> torch.Tensor:
        """(B, (size / 8)^2) codes of the images' centres (`infill_pixels`): image infilling's targets."""
        device = next(self.model.parameters()).device
        return self.model.encode(infill_pixels(images, size).to(device))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> np.ndarray:
        """(B, grid * grid) codes -> (B, S, S, 3) uint8 images."""
        device = next(self.model.parameters()).device
        return to_uint8(self.model.decode(codes.to(device)))


def read_tokenizer_config(path: str | Path) -> tuple[Path, dict, VQGANConfig]:
    """A tokenizer bundle's root, its checked config.json and architecture, without building the model (or reading
    its weights). config.json's `DIGEST_KEY`, when there, is 64 lowercase hex digits."""
    from ofa_model.bundle import (
        CONFIG_FILE,
        CONFIG_MAX_BYTES,
        BundleError,
        bundle_root,
        parse_json,
        read_bundle_file,
    )

    root = bundle_root(path)
    where = root / CONFIG_FILE
    cfg = parse_json(read_bundle_file(root, CONFIG_FILE, CONFIG_MAX_BYTES), where)
    if cfg.get("format") != TOKENIZER_FORMAT:
        raise BundleError(f"{where}: format is {cfg.get('format')!r}, not an image tokenizer ({TOKENIZER_FORMAT!r})")
    if cfg.get("format_version") != TOKENIZER_VERSION:
        raise BundleError(f"{where}: format_version {cfg.get('format_version')!r} is not {TOKENIZER_VERSION}")
    if not isinstance(cfg.get("metadata", {}), dict):
        raise BundleError(f"{where}: metadata must be an object")
    digest = cfg.get(DIGEST_KEY)
    if DIGEST_KEY in cfg and not is_digest(digest):
        raise BundleError(f"{where}: {DIGEST_KEY} must be a sha256 in lowercase hex (64 digits), got {digest!r:.80}")
    try:
        return root, cfg, VQGANConfig.from_dict(cfg.get("model"), f"{where}: model")
    except ConfigError as e:
        raise BundleError(str(e)) from e


def tokenizer_digest(path: str | Path) -> str | None:
    """The identity (`weights_digest`) that the tokenizer bundle at `path` records, from its config.json alone; None
    for a bundle saved before tokenizers recorded it."""
    return read_tokenizer_config(path)[1].get(DIGEST_KEY)


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> Tokenizer:
    """Rebuild a tokenizer (eval mode) from its bundle; the weights' header is checked before any is allocated, and
    the weights against config.json's digest when it records one (BundleError: they were changed after saving)."""
    from ofa_model.bundle import BundleError, read_weights

    root, cfg, config = read_tokenizer_config(path)
    with torch.device("meta"):
        expected = {k: (tuple(v.shape), v.dtype) for k, v in VQGAN(config).state_dict().items()}
    state, weights = read_weights(root, expected)
    digest = weights_digest(state) if DIGEST_KEY in cfg else None
    if digest != cfg.get(DIGEST_KEY):
        raise BundleError(f"{weights}: the weights' sha256 {digest} is not the {DIGEST_KEY} "
                          f"{cfg[DIGEST_KEY]} of {root / 'config.json'}: the weights were replaced after the tokenizer "
                          "was saved; save it again (ofa_model.vqgan.save_tokenizer) so that its identity is its own")
    model = VQGAN(config)
    model.load_state_dict(state, strict=True)
    return Tokenizer(model.to(device).eval(), config, dict(cfg.get("metadata", {})), digest)
