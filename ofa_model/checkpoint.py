"""Checkpoint I/O: our self-describing bundle, and importers for the official checkpoints.

Bundle = a directory with `config.json` (architecture, vocabulary reference, preprocessing,
metadata) and `model.safetensors`. Importers read the official fairseq `.pt` files (weights under
`model`, optional EMA weights under `extra_state.ema`) and the HF-port naming; names are mapped
explicitly, recomputed buffers are dropped, and any mismatch fails loudly with every missing,
unexpected and mis-shaped key. Nothing is ever unpickled beyond tensors and inert stand-ins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ofa_model.config import OFAConfig, get_config
from ofa_model.model import OFAModel
from ofa_model.preprocess import PreprocessConfig
from ofa_model.vocab import Vocabulary

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "ofa-ray-bundle"
BUNDLE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

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


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the architecture; lists every offending key."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], shapes: list[str]):
        self.missing, self.unexpected, self.shapes = missing, unexpected, shapes
        parts = [f"checkpoint {source} does not match the architecture:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"  {len(items)} {title}:")
                parts += [f"    {k}" for k in items]
        super().__init__("\n".join(parts))


# ----------------------------------------------------------------------------------------------
# Safe reading of pickled checkpoints


def _inert_class():
    class Inert:
        """Stand-in for a pickled non-tensor object (argparse.Namespace, omegaconf configs, ...)."""

        def __init__(self, *args, **kwargs):
            self.args, self.kwargs, self.state = args, kwargs, None

        def __setstate__(self, state):
            self.state = state

        def __setitem__(self, key, value):  # dict subclasses are rebuilt with SETITEMS
            self.__dict__.setdefault("items", {})[key] = value

    return Inert


def safe_torch_load(path: str | Path, max_stand_ins: int = 200):
    """torch.load with weights_only=True; any other pickled class becomes an inert stand-in.

    Checkpoints carry training configs (argparse/omegaconf objects). Instead of executing their
    code we substitute a class that only records its arguments, so tensors and plain containers
    load exactly and nothing else runs.
    """
    inert = _inert_class()
    names: list[str] = []
    while True:
        try:
            with torch.serialization.safe_globals([(inert, n) for n in names]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the weights-only unpickler names the first global it refused
            m = re.search(r"GLOBAL ([\w.]+)", str(e))
            name = m.group(1) if m else ""
            name = name if "." in name else f"builtins.{name}"  # torch names builtins without a module
            if not m or name in names or len(names) >= max_stand_ins:
                raise ValueError(f"{path}: refused to unpickle: the file holds objects that only code execution "
                                 f"could rebuild ({str(e).splitlines()[-3:]})") from e
            log.debug("checkpoint %s: replacing pickled global %s by an inert stand-in", path, name)
            names.append(name)


def read_fairseq_state(path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The official model (or its EMA) weights from a fairseq checkpoint file."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a fairseq checkpoint (no 'model' entry; top level: {keys})")
    if use_ema:
        ema = (ckpt.get("extra_state") or {}).get("ema")
        if not isinstance(ema, dict) or not ema:
            raise ValueError(f"{path}: --ema requested but the checkpoint has no extra_state['ema'] weights")
        return dict(ema)
    return dict(ckpt["model"])


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A bare state dict from .safetensors or a torch pickle (HF `pytorch_model.bin`)."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                return read_state_file(path / name)
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin inside")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return dict(obj["model"])
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return dict(obj)


# ----------------------------------------------------------------------------------------------
# Name mapping and strict loading


def _strip_wrapper(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """'hf' when HF-port layer names appear, else 'fairseq' (our own names are the official ones)."""
    return "hf" if any(marker in k for k in sd for marker in _HF_MARKERS) else "fairseq"


def map_state_dict(sd: dict[str, torch.Tensor], fmt: str = "auto") -> dict[str, torch.Tensor]:
    """Official-named state dict from fairseq / HF-port naming, recomputed buffers dropped."""
    sd = _strip_wrapper(sd)
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
            raise ValueError(f"two checkpoint keys map to {new!r}")
        out[new] = value
    return out


def load_weights(model: OFAModel, sd: dict[str, torch.Tensor], source: str = "<state dict>") -> None:
    """Load an official-named state dict into `model`; raise CheckpointMismatchError on any mismatch."""
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
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(source, missing, unexpected, shapes)
    model.load_state_dict(sd, strict=True)


def import_checkpoint(path: str | Path, config: OFAConfig, *, use_ema: bool = False, fmt: str = "auto") -> OFAModel:
    """Build `config` and load an official checkpoint (fairseq .pt or HF-port weights) into it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file() and path.suffix == ".pt":
        raw = read_fairseq_state(path, use_ema=use_ema)
    else:
        if use_ema:
            raise ValueError(f"{path}: EMA weights exist only in fairseq .pt checkpoints")
        raw = read_state_file(path)
    side = code_grid_side(_strip_wrapper(raw), config.image_bucket_size)
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
    if idx is None or idx.numel() < 3 or idx[0].item() != 0 or idx[1].item() != 1:
        return None
    ids = idx.tolist()
    side = 1
    while side + 1 < len(ids) and ids[side + 1] == ids[side] + 1:
        side += 1
    return side if side + 1 < len(ids) and ids[side + 1] == bucket_size + 1 else None


# ----------------------------------------------------------------------------------------------
# Our bundle


@dataclass
class Bundle:
    """What a bundle holds once loaded."""

    model: OFAModel
    vocab: Vocabulary
    config: OFAConfig
    preprocess: dict | None = None
    metadata: dict = field(default_factory=dict)


def save_bundle(path: str | Path, model: OFAModel, vocab, *, preprocess: dict | None = None,
                metadata: dict | None = None) -> Path:
    """Write `model` + vocabulary reference (+ preprocessing parameters) as a bundle directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if len(vocab) != model.config.vocab_size or vocab.pad_id != model.config.pad_id:
        raise ValueError(f"vocabulary (size {len(vocab)}, pad {vocab.pad_id}) does not fit the model "
                         f"(vocab_size {model.config.vocab_size}, pad {model.config.pad_id})")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in TIED_KEYS}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"format": BUNDLE_FORMAT})
    config = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "model": model.config.to_dict(),
        "vocab": vocab.to_reference(path),
        "preprocess": preprocess,
        "metadata": metadata or {},
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def read_bundle_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path} is not a model bundle: {CONFIG_FILE} missing")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("format") != BUNDLE_FORMAT or cfg.get("format_version") != BUNDLE_VERSION:
        raise ValueError(f"{cfg_file}: format {cfg.get('format')!r} v{cfg.get('format_version')} is not "
                         f"{BUNDLE_FORMAT} v{BUNDLE_VERSION}")
    return cfg


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild model (eval mode, on `device`), vocabulary and preprocessing parameters from a bundle."""
    path = Path(path)
    cfg = read_bundle_config(path)
    config = OFAConfig.from_dict(cfg["model"])
    vocab = Vocabulary.from_reference(cfg["vocab"], path)
    if len(vocab) != config.vocab_size:
        raise ValueError(f"{path}: vocabulary has {len(vocab)} tokens, model expects {config.vocab_size}")
    model = OFAModel(config)
    load_weights(model, load_file(str(path / WEIGHTS_FILE)), source=str(path / WEIGHTS_FILE))
    return Bundle(model.to(device).eval(), vocab, config, cfg.get("preprocess"), cfg.get("metadata") or {})


def convert_checkpoint(input_path: str | Path, arch: str, output: str | Path, *, dict_path: str | Path | None = None,
                       gpt2_vocab: bool = False, use_ema: bool = False, fmt: str = "auto") -> dict:
    """Import an official checkpoint and write it as a bundle; returns a JSON-ready summary.

    Official checkpoints index text by OFA's dict.txt, so `dict_path` is required unless
    `gpt2_vocab` says the weights were trained with ofa-ray's GPT-2 id order.
    """
    if dict_path is None and not gpt2_vocab:
        raise ValueError("pass --dict (OFA's utils/BPE/dict.txt): official checkpoints index text tokens in its "
                         "order; use --gpt2-vocab only for weights trained with ofa-ray's GPT-2 layout")
    config = get_config(arch)
    vocab = Vocabulary.from_dict_txt(dict_path) if dict_path else Vocabulary.gpt2()
    model = import_checkpoint(input_path, config, use_ema=use_ema, fmt=fmt)
    # OFA's finetuning resolution and normalisation (ofa.md §1.3, §3.1); override per task when serving.
    preprocess = PreprocessConfig(patch_image_size=480).to_dict()
    save_bundle(output, model, vocab, preprocess=preprocess,
                metadata={"source": str(input_path), "ema": use_ema, "arch": arch})
    return {"output": str(output), "arch": arch, "parameters": model.num_parameters(), "vocab": vocab.layout,
            "ema": use_ema}
