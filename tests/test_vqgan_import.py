"""Importing OFA's released tokenizer (taming GumbelVQ: a Lightning `last.ckpt` + `model.yaml`) through the
command line, on a synthetic checkpoint of taming's layout at a micro size; and every way such input is refused."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from jobs.convert_tokenizer import main as convert_main
from ofa_model.vqgan import VQGAN, VQGAN_SIZES, VQGANConfig, load_tokenizer
from ofa_model.vqgan_weights import read_gumbelvq_config

pytestmark = pytest.mark.timeout(120)

# taming's vqgan_gumbel_f8 model.yaml (OFA's vqgan/model.yaml), shrunk to a micro size: 32 px -> 4 x 4 codes,
# one attention resolution (8) so attention blocks are among the keys
MICRO_YAML = {
    "model": {
        "base_learning_rate": 4.5e-06,
        "target": "taming.models.vqgan.GumbelVQ",
        "params": {
            "kl_weight": 1.0e-08, "embed_dim": 32, "n_embed": 64, "monitor": "val/rec_loss",
            "temperature_scheduler_config": {
                "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
                "params": {"warm_up_steps": 0, "max_decay_steps": 1000001, "lr_start": 0.9, "lr_max": 0.9,
                           "lr_min": 1.0e-06}},
            "ddconfig": {"double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3, "out_ch": 3,
                         "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8],
                         "dropout": 0.0},
            "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                           "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 0,
                                      "disc_weight": 0.8, "codebook_weight": 1.0}},
        },
    },
}
MICRO = VQGANConfig(name="taming-gumbelvq", resolution=32, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                    attn_resolutions=(8,), z_channels=32, embed_dim=32, n_embed=64)

# names of taming's GumbelVQ at this size (ResnetBlock, AttnBlock, Downsample/Upsample, GumbelQuantize): the
# synthetic checkpoint must hold them, so the layout under test is taming's, not merely our own
TAMING_NAMES = ("encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.2.block.0.nin_shortcut.weight",
                "encoder.down.2.attn.0.q.weight", "encoder.down.2.attn.0.proj_out.bias",
                "encoder.down.0.downsample.conv.weight", "encoder.mid.block_1.conv2.bias", "encoder.mid.attn_1.norm.weight",
                "encoder.norm_out.bias", "encoder.conv_out.weight", "quant_conv.weight", "quantize.proj.weight",
                "quantize.embed.weight", "post_quant_conv.bias", "decoder.conv_in.weight", "decoder.mid.block_2.norm2.weight",
                "decoder.up.3.block.1.conv1.weight", "decoder.up.2.attn.1.k.bias", "decoder.up.1.block.0.nin_shortcut.bias",
                "decoder.up.1.upsample.conv.weight", "decoder.norm_out.weight", "decoder.conv_out.bias")

# the training loss's weights a taming checkpoint carries (VQLPIPSWithDiscriminator): dropped on import
LOSS_WEIGHTS = {"loss.discriminator.main.0.weight": (64, 3, 4, 4), "loss.discriminator.main.0.bias": (64,),
                "loss.perceptual_loss.net.slice1.0.weight": (64, 3, 3, 3),
                "loss.perceptual_loss.lin0.model.1.weight": (1, 64, 1, 1),
                "loss.perceptual_loss.scaling_layer.shift": (1, 3, 1, 1)}


def model_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The micro model's weights, every one drawn at random (norm scales around 1) so any mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VQGAN(MICRO).state_dict().items()}
    return {k: torch.randn(s, generator=g) * 0.1 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
            for k, s in shapes.items()}


def lightning_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """A dict of what PyTorch Lightning saves: bookkeeping, optimizer states, callbacks, an argparse namespace."""
    loss = {k: torch.randn(s) for k, s in LOSS_WEIGHTS.items()}
    some = next(iter(state.values()))
    return {"epoch": 7, "global_step": 123456, "pytorch-lightning_version": "1.0.8",
            "state_dict": {**state, **loss},
            "optimizer_states": [{"state": {0: {"step": 10, "exp_avg": torch.zeros_like(some),
                                                "exp_avg_sq": torch.zeros_like(some)}},
                                  "param_groups": [{"lr": 4.5e-06, "betas": (0.5, 0.9), "params": [0]}]}],
            "lr_schedulers": [],
            "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.25), "best_model_path": "x.ckpt"}},
            "hparams": argparse.Namespace(base_lr=4.5e-06, batch_size=8)}


def write_inputs(d: Path, state: dict | None = None, config: dict | None = None, ckpt: dict | None = None):
    state = model_weights() if state is None else state
    ckpt_path, yaml_path = d / "last.ckpt", d / "model.yaml"
    torch.save(lightning_checkpoint(state) if ckpt is None else ckpt, ckpt_path)
    yaml_path.write_text(yaml.safe_dump(MICRO_YAML if config is None else config, sort_keys=False))
    return ckpt_path, yaml_path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        rc = convert_main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_error_line(rc, err) -> None:
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("python -m jobs.convert_tokenizer: error: "), err


def test_the_synthetic_checkpoint_has_taming_names():
    names = set(model_weights())
    assert set(TAMING_NAMES) <= names
    assert not any("temb" in k for k in names)  # taming's encoder/decoder have no timestep embedding


def test_convert_through_the_cli_decodes_as_the_same_weights(tmp_path, capsys):
    state = model_weights()
    ckpt, cfg = write_inputs(tmp_path, state)
    rc, out, err = run_cli(capsys, "--checkpoint", ckpt, "--config", cfg, "--output", tmp_path / "tok")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["dropped_training_keys"] == len(LOSS_WEIGHTS)
    assert (summary["grid"], summary["n_embed"], summary["resolution"]) == (4, 64, 32)
    assert summary["parameters"] == sum(v.numel() for v in state.values())

    tok = load_tokenizer(tmp_path / "tok")
    assert tok.config == MICRO
    source = tok.metadata["source"]
    assert source["checkpoint"] == "last.ckpt" and source["config"] == "model.yaml"
    assert source["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert source["config_sha256"] == hashlib.sha256(cfg.read_bytes()).hexdigest()
    assert (source["epoch"], source["global_step"]) == (7, 123456)

    reference = VQGAN(MICRO).eval()
    reference.load_state_dict(state)
    codes = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tok.model.decode(codes), reference.decode(codes))
        assert torch.equal(tok.model.encode(pixels), reference.encode(pixels))
    for k, v in tok.model.state_dict().items():
        assert torch.equal(v, state[k]), k

    # the same conversion again: refused without --overwrite, done with it
    rc, _, err = run_cli(capsys, "--checkpoint", ckpt, "--config", cfg, "--output", tmp_path / "tok")
    assert_one_error_line(rc, err)
    assert "is not empty; pass overwrite=True (--overwrite)" in err
    rc, _, err = run_cli(capsys, "--checkpoint", ckpt, "--config", cfg, "--output", tmp_path / "tok", "--overwrite")
    assert rc == 0, err


def test_the_official_config_is_named_as_our_size(tmp_path):
    official = json.loads(json.dumps(MICRO_YAML))
    official["model"]["params"].update(embed_dim=256, n_embed=8192)
    official["model"]["params"]["ddconfig"].update(z_channels=256, resolution=256, ch=128, ch_mult=[1, 1, 2, 4],
                                                   num_res_blocks=2, attn_resolutions=[32])
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(official))
    assert read_gumbelvq_config(tmp_path / "model.yaml") == VQGAN_SIZES["vqgan_gumbel_f8"]


def test_a_nonzero_dropout_is_ignored_saying_so(tmp_path, caplog):
    config = json.loads(json.dumps(MICRO_YAML))
    config["model"]["params"]["ddconfig"]["dropout"] = 0.1
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config))
    with caplog.at_level("WARNING"):
        assert read_gumbelvq_config(tmp_path / "model.yaml") == MICRO
    assert "ddconfig.dropout is 0.1: a training setting, ignored at inference" in caplog.text


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


def _config_with(path: tuple[str, ...], value):
    config = json.loads(json.dumps(MICRO_YAML))
    d = config
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    return config


DD = ("model", "params", "ddconfig")

# case -> (state dict changes, config, message)
BAD = {
    "missing_key": (lambda s: _without(s, "decoder.up.2.attn.1.k.bias"), None,
                    r"missing keys: decoder\.up\.2\.attn\.1\.k\.bias"),
    "unexpected_key": (lambda s: {**s, "quantize.temperature": torch.ones(1), "encoder.down.9.block.0.conv1.weight":
                                  torch.ones(1)}, None,
                       r"unexpected keys: encoder\.down\.9\.block\.0\.conv1\.weight, quantize\.temperature"),
    "misshaped_key": (lambda s: {**s, "quantize.embed.weight": torch.zeros(128, 32)}, None,
                      r"shape mismatches: quantize\.embed\.weight: checkpoint \(128, 32\) vs model \(64, 32\)"),
    "integer_weights": (lambda s: {**s, "quant_conv.bias": torch.ones(32, dtype=torch.long)}, None,
                        r"dtype mismatches: quant_conv\.bias: int64, the model needs a floating dtype"),
    "nan_weight": (lambda s: {**s, "decoder.conv_out.bias": torch.tensor([0.0, float("nan"), 0.0])}, None,
                   r"1 weights hold NaN or Inf: decoder\.conv_out\.bias"),
    "unknown_ddconfig_key": (None, _config_with((*DD, "use_linear_attn"), True),
                             r"unknown key model\.params\.ddconfig\.use_linear_attn"),
    "unknown_params_key": (None, _config_with(("model", "params", "beta"), 0.25),
                           r"unknown key model\.params\.beta"),
    "double_z": (None, _config_with((*DD, "double_z"), True), r"ddconfig\.double_z is True"),
    "not_gumbel": (None, _config_with(("model", "target"), "taming.models.vqgan.VQModel"),
                   r"model\.target is 'taming\.models\.vqgan\.VQModel'; only taming's GumbelVQ"),
    "ddconfig_lacks_ch": (None, _config_with(DD, {k: v for k, v in MICRO_YAML["model"]["params"]["ddconfig"].items()
                                                  if k != "ch"}), r"model\.params\.ddconfig lacks \['ch'\]"),
    "bad_ch": (None, _config_with((*DD, "ch"), 48), r"model\.yaml: VQGANConfig\.ch 48 must be a multiple of norm_groups 32"),
    "config_not_yaml": (None, "model: [unclosed", r"model\.yaml: not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_checkpoint_or_config_is_one_error_line_naming_what(case, tmp_path, capsys):
    change, config, message = BAD[case]
    state = model_weights()
    ckpt, cfg = write_inputs(tmp_path, change(state) if change else state, config if isinstance(config, dict) else None)
    if isinstance(config, str):
        cfg.write_text(config)
    rc, out, err = run_cli(capsys, "--checkpoint", ckpt, "--config", cfg, "--output", tmp_path / "tok")
    assert_one_error_line(rc, err)
    assert re.search(message, err), err
    assert out == "" and not (tmp_path / "tok").exists()


class SystemCall:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path, capsys):
    target = tmp_path / "pwned"
    ckpt = lightning_checkpoint(model_weights())
    ckpt["callbacks"]["evil"] = SystemCall(target)
    ckpt_path, cfg = write_inputs(tmp_path, ckpt=ckpt)
    rc, _, err = run_cli(capsys, "--checkpoint", ckpt_path, "--config", cfg, "--output", tmp_path / "tok")
    assert_one_error_line(rc, err)
    assert "last.ckpt: refused to unpickle: the file holds objects that only code execution could rebuild" in err
    assert not target.exists() and not (tmp_path / "tok").exists()


@pytest.mark.parametrize("ckpt, message", [
    ({"model": {}}, r"not a PyTorch Lightning checkpoint \(no 'state_dict' entry; top level: \['model'\]\)"),
    ({"state_dict": {"encoder.conv_in.weight": [1.0]}}, r"'state_dict' holds 1 values that are not tensors"),
])
def test_a_checkpoint_that_is_not_lightnings_is_refused(ckpt, message, tmp_path, capsys):
    ckpt_path, cfg = write_inputs(tmp_path, ckpt=ckpt)
    rc, _, err = run_cli(capsys, "--checkpoint", ckpt_path, "--config", cfg, "--output", tmp_path / "tok")
    assert_one_error_line(rc, err)
    assert re.search(message, err), err


def test_missing_inputs_and_options(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--checkpoint", tmp_path / "none.ckpt", "--config", tmp_path / "none.yaml",
                         "--output", tmp_path / "tok")
    assert_one_error_line(rc, err)
    assert "not found" in err and "none.yaml" in err  # the config is read (and checked) first
    rc, _, err = run_cli(capsys, "--checkpoint", "x.ckpt", "--output", tmp_path / "tok")
    assert rc == 2 and "the following arguments are required: --config" in err
