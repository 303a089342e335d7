"""Importing OFA's released image tokenizer: taming-transformers' `GumbelVQ` as OFA ships it, a PyTorch Lightning
checkpoint (`vqgan/last.ckpt`) and its config (`vqgan/model.yaml`), into a tokenizer bundle (`ofa_model.vqgan`).

Both files are untrusted input. The checkpoint is read without running any of its code (`safe_torch_load`); its
`state_dict` holds the model under taming's names, which are ours (`KEY_PREFIXES`: the map is the identity on
them), beside the training loss's weights (`loss.*`: discriminator and LPIPS), which are dropped and counted.
Everything else Lightning stores (optimizer states, callbacks, loops, hyper-parameters) is never looked at.
Any key that is missing, unexpected or mis-shaped fails as one `CheckpointMismatchError` listing every one.

The YAML's `model.params` become a `VQGANConfig`: `ddconfig` field by field (`DDCONFIG_FIELDS`; an unknown key,
`double_z: true` or `resamp_with_conv: false` is a ConfigError naming it), `n_embed`, `embed_dim` and
`kl_weight`; the loss, the Gumbel temperature schedule and Lightning's bookkeeping only matter to training.
`dropout` is a training setting: inference ignores it (a log line says so when it is not 0).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from ofa_model.config_files import read_yaml
from ofa_model.errors import ConfigError
from ofa_model.safe_load import regular_input, safe_torch_load, tensor_dict
from ofa_model.vqgan import VQGAN, VQGAN_SIZES, VQGANConfig, save_tokenizer
from ofa_model.weights import CheckpointError, CheckpointMismatchError, dtype_mismatch, non_finite

__all__ = ["import_gumbelvq", "import_tokenizer", "map_gumbelvq_state", "read_gumbelvq_config"]

log = logging.getLogger(__name__)

CONFIG_MAX_BYTES = 1 << 20  # model.yaml is a page of text

# taming's state-dict names that are ours unchanged (the whole model: GumbelVQ's encoder, decoder, the two 1x1
# convolutions around the quantizer, the quantizer's logit projection and codebook)
KEY_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.proj.", "quantize.embed.weight")
TRAINING_PREFIX = "loss."  # VQLPIPSWithDiscriminator's discriminator and perceptual (LPIPS) weights

# taming ddconfig key -> VQGANConfig field (the keys with no field are checked in `_ddconfig`)
DDCONFIG_FIELDS = {"z_channels": "z_channels", "resolution": "resolution", "in_channels": "in_channels",
                   "out_ch": "out_ch", "ch": "ch", "ch_mult": "ch_mult", "num_res_blocks": "num_res_blocks",
                   "attn_resolutions": "attn_resolutions"}
DDCONFIG_CHECKED = ("double_z", "dropout", "resamp_with_conv")
PARAMS_FIELDS = ("n_embed", "embed_dim", "kl_weight")
# GumbelVQ arguments that only training (or Lightning) reads
TRAINING_PARAMS = ("lossconfig", "temperature_scheduler_config", "monitor", "ckpt_path", "ignore_keys", "image_key",
                   "colorize_nlabels")
MODEL_KEYS = ("target", "params", "base_learning_rate")
TRAINING_SECTIONS = ("data", "lightning")  # other top-level sections of a taming config: the training run's


# ----------------------------------------------------------------------------------------------
# model.yaml


def read_gumbelvq_config(path: str | Path, name: str | None = None) -> VQGANConfig:
    """The architecture in a taming `model.yaml` of a GumbelVQ; ConfigError naming the file and the key.

    `name` defaults to the matching size of `VQGAN_SIZES` (the official one is "vqgan_gumbel_f8"), else
    "taming-gumbelvq".
    """
    source = str(path)
    path = regular_input(Path(path), "tokenizer config")
    if path.stat().st_size > CONFIG_MAX_BYTES:
        raise ConfigError(f"{source} is {path.stat().st_size:,} bytes, over the {CONFIG_MAX_BYTES:,}-byte cap for "
                          "a model.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: cannot read it as UTF-8 text: {e}") from None
    raw = read_yaml(text, source)
    top = _mapping(raw, source, "the top level")
    _known(top, ("model", *TRAINING_SECTIONS), source, "")
    model = _mapping(top.get("model"), source, "model")
    _known(model, MODEL_KEYS, source, "model.")
    target = model.get("target")
    if not isinstance(target, str) or target.rsplit(".", 1)[-1] != "GumbelVQ":
        raise ConfigError(f"{source}: model.target is {target!r}; only taming's GumbelVQ (OFA's tokenizer) "
                          "is supported")
    params = _mapping(model.get("params"), source, "model.params")
    _known(params, ("ddconfig", *PARAMS_FIELDS, "remap", *TRAINING_PARAMS), source, "model.params.")
    if params.get("remap") is not None:
        raise ConfigError(f"{source}: model.params.remap is {params['remap']!r}: a remapped codebook is not "
                          "supported (OFA's tokenizer has none)")
    missing = [k for k in ("n_embed", "embed_dim") if k not in params]
    if missing:
        raise ConfigError(f"{source}: model.params lacks {missing}")
    fields = {k: params[k] for k in PARAMS_FIELDS if k in params}
    fields.update(_ddconfig(_mapping(params.get("ddconfig"), source, "model.params.ddconfig"), source))
    try:
        config = VQGANConfig(name=name or "taming-gumbelvq", **fields)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    same = [size for size, c in VQGAN_SIZES.items() if dataclasses.replace(config, name=size) == c]
    return dataclasses.replace(config, name=same[0]) if same and name is None else config


def _ddconfig(dd: Mapping, source: str) -> dict:
    """The VQGANConfig fields of a taming ddconfig; its other keys checked."""
    where = "model.params.ddconfig."
    _known(dd, (*DDCONFIG_FIELDS, *DDCONFIG_CHECKED), source, where)
    missing = [k for k in DDCONFIG_FIELDS if k not in dd]
    if missing:
        raise ConfigError(f"{source}: {where[:-1]} lacks {missing}")
    if dd.get("double_z", False) is not False:
        raise ConfigError(f"{source}: {where}double_z is {dd['double_z']!r}: a GumbelVQ encoder has double_z false "
                          "(true doubles its output channels, a KL autoencoder's layout)")
    if dd.get("resamp_with_conv", True) is not True:
        raise ConfigError(f"{source}: {where}resamp_with_conv is {dd['resamp_with_conv']!r}: only resampling "
                          "with convolutions (true, taming's default) is supported")
    dropout = dd.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError(f"{source}: {where}dropout must be a number in [0, 1), got {dropout!r}")
    if dropout:
        log.warning("%s: %sdropout is %s: a training setting, ignored at inference (the tokenizer has no dropout)",
                    source, where, dropout)
    return {field: tuple(dd[k]) if isinstance(dd[k], list) else dd[k] for k, field in DDCONFIG_FIELDS.items()}


def _mapping(value: object, source: str, where: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(value).__name__}")
    return value


def _known(d: Mapping, known: tuple[str, ...], source: str, where: str) -> None:
    unknown = sorted((k for k in d if k not in known), key=str)
    if unknown:
        raise ConfigError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(where + str(k) for k in unknown)}; known: {list(known)}")


# ----------------------------------------------------------------------------------------------
# last.ckpt


def read_lightning_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The `state_dict` of a PyTorch Lightning checkpoint, and its `epoch` / `global_step` where they are ints."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        top = sorted(map(str, ckpt))[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a PyTorch Lightning checkpoint (no 'state_dict' entry; top level: {top})")
    info = {k: ckpt[k] for k in ("epoch", "global_step") if type(ckpt.get(k)) is int}
    return tensor_dict(ckpt["state_dict"], path, "'state_dict'"), info


def map_gumbelvq_state(sd: Mapping[str, torch.Tensor], model: VQGAN,
                       source: str = "<state dict>") -> tuple[dict[str, torch.Tensor], int]:
    """taming's GumbelVQ state dict -> ours, and the number of training-only (`loss.*`) weights dropped.

    CheckpointMismatchError listing every missing, unexpected, mis-shaped or wrongly typed key; CheckpointError
    naming the weights that hold NaN or Inf.
    """
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    dropped = 0
    for key, value in sd.items():
        if key.startswith(TRAINING_PREFIX):
            dropped += 1
        elif key.startswith(KEY_PREFIXES) and key in expected:
            out[key] = value
        else:
            unexpected.append(key)
    missing = sorted(k for k in expected if k not in out)
    shapes = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                    for k, v in out.items() if v.shape != expected[k].shape)
    dtypes = sorted(filter(None, (dtype_mismatch(k, v.dtype, expected[k].dtype) for k, v in out.items())))
    if missing or unexpected or shapes or dtypes:
        raise CheckpointMismatchError(source, missing, sorted(unexpected), shapes, dtypes)
    bad = non_finite(out)
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} weights hold NaN or Inf: {', '.join(bad[:20])}")
    return out, dropped


def import_gumbelvq(checkpoint: str | Path, config: str | Path) -> tuple[VQGAN, dict]:
    """The tokenizer in a taming GumbelVQ checkpoint + model.yaml (eval mode, float32), and what the import saw:
    {"dropped_training_keys", "epoch", "global_step"} (the last two where the checkpoint records them)."""
    cfg = read_gumbelvq_config(config)
    sd, info = read_lightning_state(checkpoint)
    model = VQGAN(cfg)
    state, dropped = map_gumbelvq_state(sd, model, str(checkpoint))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    log.info("%s: imported %d weights of %s; dropped %d training-only weights (%s*: discriminator, perceptual loss)",
             checkpoint, len(state), cfg.name, dropped, TRAINING_PREFIX)
    return model.eval(), {"dropped_training_keys": dropped, **info}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def import_tokenizer(checkpoint: str | Path, config: str | Path, output: str | Path, *,
                     overwrite: bool = False) -> dict:
    """Write OFA's released tokenizer (taming's `last.ckpt` + `model.yaml`) as a tokenizer bundle at `output`;
    its metadata names the source files and their sha256. Returns a summary for the command line."""
    model, seen = import_gumbelvq(checkpoint, config)
    source = {"format": "taming GumbelVQ (PyTorch Lightning checkpoint)",
              "checkpoint": Path(checkpoint).name, "checkpoint_sha256": sha256_file(checkpoint),
              "config": Path(config).name, "config_sha256": sha256_file(config),
              **{k: v for k, v in seen.items() if k != "dropped_training_keys"}}
    path = save_tokenizer(output, model, metadata={"source": source}, overwrite=overwrite)
    cfg = model.config
    return {"output": str(path), "tokenizer": cfg.name, "resolution": cfg.resolution, "grid": cfg.grid,
            "n_embed": cfg.n_embed, "parameters": sum(p.numel() for p in model.parameters()),
            "dropped_training_keys": seen["dropped_training_keys"], "source": source}
