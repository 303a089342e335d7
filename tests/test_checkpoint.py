"""Importing official checkpoints (fairseq and HF-port naming) and our bundle round trip."""

import argparse
import re
from pathlib import Path

import pytest
import torch

from jobs.convert_checkpoint import main as convert_main
from ofa_model.checkpoint import (
    HF_RENAMES,
    CheckpointMismatchError,
    import_checkpoint,
    load_bundle,
    safe_torch_load,
    save_bundle,
)
from ofa_model.config import get_config
from ofa_model.model import OFAModel
from ofa_model.vocab import Vocabulary

KEYS_FILE = Path(__file__).parent / "data" / "ofa_tiny_keys.txt"


def official_tiny_keys() -> dict[str, tuple[tuple[int, ...], bool]]:
    """name -> (shape, is_buffer) for every key of the released ofa_tiny checkpoint."""
    out = {}
    for line in KEYS_FILE.read_text().splitlines():
        m = re.match(r"(\S+) \[([\d, ]*)\]\s*(\w*)", line)
        shape = tuple(int(x) for x in m.group(2).split(",") if x.strip())
        out[m.group(1)] = (shape, m.group(3) == "buf")
    return out


class TrainingConfig:  # stands for the omegaconf/argparse objects real checkpoints carry
    def __init__(self, lr):
        self.lr = lr


def synthetic_official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (shape, is_buffer) in official_tiny_keys().items():
        if is_buffer:  # recomputed on import: deliberately junk values
            sd[name] = torch.zeros(shape, dtype=torch.long) if "bucket" in name or "idx" in name else torch.ones(shape)
            if "running_var" in name:
                sd[name] = torch.rand(shape, generator=g) + 0.5
            elif "running_mean" in name:
                sd[name] = torch.randn(shape, generator=g) * 0.1
            elif "num_batches" in name:
                sd[name] = torch.tensor(7)
        else:
            sd[name] = torch.randn(shape, generator=g) * 0.05
    emb = sd["encoder.embed_tokens.weight"]
    sd["decoder.embed_tokens.weight"] = emb
    sd["decoder.output_projection.weight"] = emb
    return sd


@pytest.fixture(scope="module")
def fairseq_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ofa_tiny.pt"
    ema = synthetic_official_state(seed=1)
    torch.save({"args": argparse.Namespace(arch="ofa_tiny", lr=1e-4), "cfg": TrainingConfig(1e-4),
                "model": synthetic_official_state(seed=0), "extra_state": {"ema": ema, "epoch": 3}}, path)
    return path


def _inputs():
    g = torch.Generator().manual_seed(5)
    src = torch.randint(4, 50000, (2, 9), generator=g)
    src[1, 6:] = 1
    return src, torch.randn(2, 3, 64, 64, generator=g), torch.tensor([True, True]), torch.randint(4, 50000, (2, 5),
                                                                                                 generator=g)


def test_official_tiny_keys_import_exactly(fairseq_ckpt, tmp_path):
    model = import_checkpoint(fairseq_ckpt, get_config("ofa-tiny"))
    sd = synthetic_official_state(seed=0)
    ours = model.state_dict()
    for name, value in sd.items():
        if name in ours and "bucket" not in name:
            assert torch.equal(ours[name], value), name
    assert model.decoder.output_projection.weight.data_ptr() == model.encoder.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        before = model(*_inputs())
    save_bundle(tmp_path / "b", model, Vocabulary.gpt2(), preprocess={"patch_image_size": 64})
    bundle = load_bundle(tmp_path / "b")
    with torch.no_grad():
        after = bundle.model(*_inputs())
    assert torch.equal(before, after)
    assert bundle.preprocess == {"patch_image_size": 64} and bundle.config == get_config("ofa-tiny")
    # tied weights are stored once
    from safetensors import safe_open

    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        assert "decoder.output_projection.weight" not in f.keys() and "encoder.embed_tokens.weight" in f.keys()


def test_ema_weights_are_selectable(fairseq_ckpt):
    ema = import_checkpoint(fairseq_ckpt, get_config("ofa-tiny"), use_ema=True)
    assert torch.equal(ema.state_dict()["encoder.image_proj.weight"],
                       synthetic_official_state(seed=1)["encoder.image_proj.weight"])


def test_hf_port_naming_gives_identical_model(fairseq_ckpt, tmp_path):
    sd = synthetic_official_state(seed=0)
    hf = {}
    inverse = {
        "attn_ln.": "self_attn_mid_layer_norm.", "self_attn_ln.": "self_attn_mid_layer_norm.",
        "ffn_layernorm.": "ffn_layer_norm.", "cross_attn_ln.": "cross_attn_mid_layer_norm.",
        "encoder_attn_layer_norm.": "cross_attn_layer_norm.", "encoder_attn.": "cross_attn.",
    }
    for k, v in sd.items():
        if k.endswith(".version"):
            continue
        parts = k.split(".")
        if parts[1] == "layers":
            head, rest = ".".join(parts[:3]) + ".", ".".join(parts[3:])
            for old, new in inverse.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            k = head + rest
        hf[k] = v
    hf["decoder.image_position_idx"] = torch.zeros(1025, dtype=torch.long)  # the port's shorter buffer
    assert any("cross_attn_mid_layer_norm" in k for k in hf) and len(HF_RENAMES) == 6
    torch.save(hf, tmp_path / "pytorch_model.bin")
    a = import_checkpoint(fairseq_ckpt, get_config("ofa-tiny"))
    b = import_checkpoint(tmp_path / "pytorch_model.bin", get_config("ofa-tiny"))
    with torch.no_grad():
        assert torch.equal(a(*_inputs()), b(*_inputs()))


def test_mismatch_lists_every_key(tmp_path):
    sd = synthetic_official_state()
    del sd["encoder.layers.2.fc1.bias"]
    sd["encoder.layers.0.extra.weight"] = torch.zeros(3)
    sd["decoder.layer_norm.weight"] = torch.zeros(7)
    torch.save({"model": sd}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        import_checkpoint(tmp_path / "bad.pt", get_config("ofa-tiny"))
    msg = str(err.value)
    assert "encoder.layers.2.fc1.bias" in msg and "encoder.layers.0.extra.weight" in msg
    assert "decoder.layer_norm.weight: checkpoint (7,) vs model (256,)" in msg
    assert err.value.missing == ["encoder.layers.2.fc1.bias"]
    # the wrong architecture fails as loudly
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        import_checkpoint(tmp_path / "bad.pt", get_config("ofa-micro"))


def test_untied_embeddings_are_rejected(tmp_path):
    sd = synthetic_official_state()
    sd["decoder.output_projection.weight"] = sd["encoder.embed_tokens.weight"] + 1
    torch.save({"model": sd}, tmp_path / "untied.pt")
    with pytest.raises(CheckpointMismatchError, match="embeddings must be tied"):
        import_checkpoint(tmp_path / "untied.pt", get_config("ofa-tiny"))


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_loading_never_runs_pickled_code(tmp_path):
    target = tmp_path / "pwned"
    torch.save({"model": {"w": torch.ones(2)}, "payload": Exploit(target)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused to unpickle"):
        safe_torch_load(tmp_path / "evil.pt")
    assert not target.exists()
    # plain config objects become inert stand-ins and the tensors load exactly
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "ok.pt")
    obj = safe_torch_load(tmp_path / "ok.pt")
    assert torch.equal(obj["model"]["w"], torch.ones(2)) and type(obj["args"]).__name__ == "Inert"


def test_convert_cli(fairseq_ckpt, tmp_path, capsys):
    dict_txt = tmp_path / "dict.txt"
    # a full-size official-style dict: every GPT-2 id once (reversed order) plus the 3 filler words
    lines = [f"{i} {100000 - i}" for i in reversed(range(50257))] + [f"madeupword000{i} 0" for i in range(3)]
    dict_txt.write_text("\n".join(lines) + "\n")
    out = tmp_path / "bundle"
    assert convert_main(["--input", str(fairseq_ckpt), "--arch", "ofa-tiny", "--dict", str(dict_txt),
                         "--output", str(out)]) == 0
    bundle = load_bundle(out)
    assert bundle.vocab.layout == "official" and bundle.vocab.mask_id == 50264
    assert bundle.vocab.encode(" the") == [4 + 50256 - 262]  # GPT-2 " the" = 262, dict line order reversed
    bad = tmp_path / "bad.pt"
    sd = synthetic_official_state()
    del sd["decoder.layers.3.fc2.weight"]
    torch.save({"model": sd}, bad)
    capsys.readouterr()
    assert convert_main(["--input", str(bad), "--arch", "ofa-tiny", "--gpt2-vocab", "--output", str(tmp_path / "x")]) == 2
    assert "decoder.layers.3.fc2.weight" in capsys.readouterr().err
    assert convert_main(["--input", str(tmp_path / "nope.pt"), "--arch", "ofa-tiny", "--gpt2-vocab",
                         "--output", str(tmp_path)]) == 1
    assert convert_main(["--input", str(fairseq_ckpt), "--arch", "ofa-tiny", "--output", str(tmp_path / "y")]) == 1
    assert "pass --dict" in capsys.readouterr().err


def test_code_grid_is_read_from_the_official_buffer(tmp_path):
    sd = synthetic_official_state()
    side = 32  # the text-to-image checkpoints: code_image_size 256 -> 32 x 32 codes
    grid = [c + r * 42 + 1 for r in range(side) for c in range(side)]
    sd["decoder.image_position_idx"] = torch.tensor([0] + grid + [1024] * (1026 - 1 - len(grid)))
    torch.save({"model": sd}, tmp_path / "t2i.pt")
    model = import_checkpoint(tmp_path / "t2i.pt", get_config("ofa-tiny"))
    assert model.config.code_image_size == 256
    assert model.decoder.image_position_idx[1 + side].item() == 43
    assert model.decoder.image_position_idx[side * side].item() == grid[-1]


def test_bundle_rejects_wrong_vocab_and_format(tmp_path):
    model = OFAModel(get_config("ofa-micro"))
    small = Vocabulary.gpt2(num_bins=10)
    with pytest.raises(ValueError, match="does not fit the model"):
        save_bundle(tmp_path / "b", model, small)
    with pytest.raises(FileNotFoundError, match="not a model bundle"):
        load_bundle(tmp_path)
