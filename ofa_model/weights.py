"""State dicts in the official naming: the errors of imported weights, the mapping from fairseq / HF-port names,
and the strict load.

Our parameter names are the official ones, so importing is a checked identity mapping: the HF port's names are
renamed explicitly, the official model's recomputed buffers are dropped, and any mismatch fails loudly with one
`CheckpointMismatchError` listing every missing, unexpected, mis-shaped and wrongly typed key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ofa_model import errors
from ofa_model.errors import InputError
from ofa_model.model import OFAModel

# Weights shared with encoder.embed_tokens.weight (one matrix for encoder, decoder and output).
TIED_KEYS = ("decoder.embed_tokens.weight", "decoder.output_projection.weight")
# Buffers of the official model that we recompute (never load) and their reason.
RECOMPUTED_BUFFERS = re.compile(r"^(encoder|decoder)\.(version|token_rp_bucket|image_rp_bucket|image_position_idx)$")

# HF port name -> official name, applied in order; anchored so nothing is renamed by accident.
HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^encoder\.layers\.(\d+)\.self_attn_mid_layer_norm\.", r"encoder.layers.\1.attn_ln."),
    (r"^decoder\.layers\.(\d+)\.self_attn_mid_layer_norm\.", r"decoder.layers.\1.self_attn_ln."),
    (r"^(encoder|decoder)\.layers\.(\d+)\.ffn_layer_norm\.", r"\1.layers.\2.ffn_layernorm."),
    (r"^decoder\.layers\.(\d+)\.cross_attn_mid_layer_norm\.", r"decoder.layers.\1.cross_attn_ln."),
    (r"^decoder\.layers\.(\d+)\.cross_attn_layer_norm\.", r"decoder.layers.\1.encoder_attn_layer_norm."),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.", r"decoder.layers.\1.encoder_attn."),
)
_HF_MARKERS = ("self_attn_mid_layer_norm", "ffn_layer_norm", "cross_attn.", "cross_attn_mid_layer_norm")


# ----------------------------------------------------------------------------------------------
# Errors


class CheckpointError(InputError):
    """A checkpoint or weights file that cannot be imported; the message names the file and what is wrong."""

    reason = errors.BAD_CHECKPOINT


class UnsafeCheckpointError(CheckpointError):
    """A pickle holding objects that only code execution could rebuild; it is refused, never executed."""

    reason = errors.UNSAFE_CHECKPOINT


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the architecture; lists every offending key."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], shapes: list[str],
                 dtypes: list[str] | None = None):
        self.source, self.missing, self.unexpected, self.shapes = source, missing, unexpected, shapes
        self.dtypes = dtypes or []
        parts = [f"checkpoint {source} does not match the architecture:"]
        for title, items in self.problems():
            parts.append(f"  {len(items)} {title}:")
            parts += [f"    {k}" for k in items]
        super().__init__("\n".join(parts))

    def problems(self) -> list[tuple[str, list[str]]]:
        """(title, keys) of each non-empty category."""
        return [(title, items) for title, items in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                                                     ("shape mismatches", self.shapes),
                                                     ("dtype mismatches", self.dtypes)) if items]


# ----------------------------------------------------------------------------------------------
# Name mapping and strict loading


def strip_wrapper(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` without the `module.` (DDP) or `model.` prefix that every one of its keys carries, if any."""
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """'hf' when HF-port layer names appear, else 'fairseq' (our own names are the official ones)."""
    return "hf" if any(marker in k for k in sd for marker in _HF_MARKERS) else "fairseq"


def map_state_dict(sd: dict[str, torch.Tensor], fmt: str = "auto") -> dict[str, torch.Tensor]:
    """Official-named state dict from fairseq / HF-port naming, recomputed buffers dropped."""
    sd = strip_wrapper(sd)
    fmt = detect_format(sd) if fmt == "auto" else fmt
    if fmt not in ("fairseq", "hf"):
        raise ValueError(f"unknown checkpoint format {fmt!r} (fairseq, hf or auto)")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if RECOMPUTED_BUFFERS.match(key):
            continue
        new = key
        if fmt == "hf":
            for pattern, repl in HF_RENAMES:
                new = re.sub(pattern, repl, new)
        if new in out:
            raise CheckpointError(f"two checkpoint keys map to {new!r}")
        out[new] = value
    return out


def dtype_mismatch(key: str, have: torch.dtype | str, want: torch.dtype) -> str | None:
    """'key: ...' when a floating weight is stored as a non-float (or an integer buffer as a float), else None."""
    have_float = have.is_floating_point if isinstance(have, torch.dtype) else _is_float_name(have)
    if have_float == want.is_floating_point:
        return None
    kind = "a floating" if want.is_floating_point else "an integer"
    return f"{key}: {str(have).removeprefix('torch.')}, the model needs {kind} dtype ({str(want).removeprefix('torch.')})"


def _is_float_name(dtype: str) -> bool:
    """Whether a safetensors dtype name (F32, BF16, F8_E4M3, I64, BOOL, ...) is a floating type."""
    return dtype.startswith("F") or dtype == "BF16"


def non_finite(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors that hold NaN or Inf."""
    # A finite sum proves every element finite (NaN and Inf propagate); only when it is not (an overflow, or a
    # real NaN/Inf) is the elementwise test run. The sum is several times cheaper.
    return sorted(k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v.sum()))
                  and not bool(torch.isfinite(v).all()))


def load_weights(model: OFAModel, sd: dict[str, torch.Tensor], source: str = "<state dict>") -> None:
    """Load an official-named state dict into `model`; raise CheckpointMismatchError on any missing, unexpected,
    mis-shaped or wrongly typed key, and CheckpointError on NaN or Inf weights."""
    sd = dict(sd)
    embed = sd.get("encoder.embed_tokens.weight")
    for key in TIED_KEYS:  # tied copies: may be absent; when present they must equal the shared matrix
        if key in sd and embed is not None:
            if sd[key].shape != embed.shape or not torch.equal(sd[key], embed):
                raise CheckpointMismatchError(source, [], [], [f"{key}: differs from encoder.embed_tokens.weight "
                                                               "(embeddings must be tied)"])
        sd[key] = embed if embed is not None else sd.get(key)
        if sd[key] is None:
            del sd[key]
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape))
    dtypes = sorted(filter(None, (dtype_mismatch(k, sd[k].dtype, v.dtype) for k, v in expected.items() if k in sd)))
    if missing or unexpected or shapes or dtypes:
        raise CheckpointMismatchError(source, missing, unexpected, shapes, dtypes)
    bad = non_finite(sd)
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} weights hold NaN or Inf values: {', '.join(bad)}")
    model.load_state_dict(sd, strict=True)
