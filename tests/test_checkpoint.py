"""Importing official checkpoints (fairseq and HF-port naming) and our bundle round trip."""

import argparse
import hashlib
import os
import pickle
import re
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from jobs.convert_checkpoint import main as convert_main
from ofa_model import bundle as bundle_module
from ofa_model.architecture import get_config
from ofa_model.bundle import BundleError, load_bundle, save_bundle
from ofa_model.checkpoint import import_checkpoint
from ofa_model.model import OFAModel
from ofa_model.preprocess import PreprocessConfig
from ofa_model.safe_load import safe_torch_load
from ofa_model.vocab import Vocabulary
from ofa_model.weights import HF_RENAMES, CheckpointMismatchError, UnsafeCheckpointError

KEYS_FILE = Path(__file__).parent / "data" / "ofa_tiny_keys.txt"
REFCOCO = ["--patch-image-size", "512", "--max-src-length", "80", "--max-tgt-length", "20"]  # OFA's RefCOCO run


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
    save_bundle(tmp_path / "b", model, Vocabulary.gpt2(), preprocess=PreprocessConfig(patch_image_size=64))
    bundle = load_bundle(tmp_path / "b")
    with torch.no_grad():
        after = bundle.model(*_inputs())
    assert torch.equal(before, after)  # identical weights, identical inputs, same process
    assert bundle.preprocess == PreprocessConfig(patch_image_size=64) and bundle.config == get_config("ofa-tiny")
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
    with pytest.raises(UnsafeCheckpointError, match="refused to unpickle"):
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
                         "--output", str(out), *REFCOCO]) == 0
    bundle = load_bundle(out)
    assert bundle.vocab.layout == "official" and bundle.vocab.mask_id == 50264
    assert bundle.vocab.encode(" the") == [4 + 50256 - 262]  # GPT-2 " the" = 262, dict line order reversed
    assert bundle.preprocess == PreprocessConfig(patch_image_size=512, max_src_length=80, max_tgt_length=20)
    bad = tmp_path / "bad.pt"
    sd = synthetic_official_state()
    del sd["decoder.layers.3.fc2.weight"]
    torch.save({"model": sd}, bad)
    rc, err = run_cli(capsys, "--input", bad, "--arch", "ofa-tiny", "--gpt2-vocab", "--output", tmp_path / "x",
                      *REFCOCO)
    assert_one_error_line(rc, err)
    assert "missing keys: decoder.layers.3.fc2.weight" in err
    rc, err = run_cli(capsys, "--input", fairseq_ckpt, "--arch", "ofa-tiny", "--output", tmp_path / "y", *REFCOCO)
    assert_one_error_line(rc, err)
    assert "pass --dict" in err


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
    with pytest.raises(BundleError, match="does not fit the model"):
        save_bundle(tmp_path / "b", model, small, preprocess=PreprocessConfig(patch_image_size=64))
    with pytest.raises(BundleError, match="not a model bundle: config.json missing"):
        load_bundle(tmp_path)


# ----------------------------------------------------------------------------------------------
# convert_checkpoint: every failure is one `error:` line and exit status 2


@pytest.fixture(scope="module")
def official_sd() -> dict[str, torch.Tensor]:
    return synthetic_official_state(seed=0)


def run_cli(capsys, *argv) -> tuple[int, str]:
    """(exit status, stderr) of the converter's main."""
    capsys.readouterr()
    try:
        rc = convert_main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_error_line(rc: int, err: str) -> None:
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("python -m jobs.convert_checkpoint: error: "), err


def _saved(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _saved_legacy(path: Path, obj) -> Path:
    """torch.save's pre-1.6 format (a sequence of pickles), which some old checkpoints still use."""
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _half_of(path: Path, target: Path) -> Path:
    return _bytes(target, path.read_bytes()[: path.stat().st_size // 2])


def _with(sd: dict[str, torch.Tensor], key: str, index: int, value: float) -> dict[str, torch.Tensor]:
    t = sd[key].clone()
    t.view(-1)[index] = value
    return {**sd, key: t}


# case -> (build the input file from (tmp_path, state dict), extra flags, expected message)
BAD_INPUTS = {
    "non_tensor_value": (lambda d, sd: _saved(d / "c.pt", {"model": {**sd, "encoder.layer_norm.weight": [1.0] * 256}}),
                         [], r"'model' holds 1 values that are not tensors: encoder\.layer_norm\.weight \(list\)"),
    "model_is_a_list": (lambda d, sd: _saved(d / "c.pt", {"model": [torch.ones(2)]}),
                        [], r"'model' is a list, expected a dict of named tensors"),
    "list_extra_state_with_ema": (lambda d, sd: _saved(d / "c.pt", {"model": sd, "extra_state": [1, 2]}), ["--ema"],
                                  r"--ema requested but extra_state is a list, not a dict holding 'ema' weights"),
    "bad_safetensors": (lambda d, sd: _bytes(d / "c.safetensors", b"\x00" * 64),
                        [], r"c\.safetensors is not a valid safetensors file"),
    "truncated": (lambda d, sd: _half_of(_saved(d / "ok.pt", {"model": sd}), d / "c.pt"),
                  [], r"c\.pt cannot be read: the file is truncated or corrupt \(RuntimeError: PytorchStreamReader"),
    "truncated_legacy_format": (lambda d, sd: _half_of(_saved_legacy(d / "ok.pt", {"model": sd}), d / "c.pt"),
                                [], r"c\.pt cannot be read: the file is truncated or corrupt"),
    "empty": (lambda d, sd: _bytes(d / "c.pt", b""), [], r"c\.pt is empty \(0 bytes\)"),
    "random_bytes": (lambda d, sd: _bytes(d / "c.pt", bytes(range(256)) * 16),
                     [], r"c\.pt is not a PyTorch checkpoint: neither a torch\.save zip archive"),
    "plain_pickle": (lambda d, sd: _bytes(d / "c.pt", pickle.dumps({"model": {}})),
                     [], r"c\.pt is not a PyTorch checkpoint"),
    "missing": (lambda d, sd: d / "nope.pt", [], r"checkpoint not found: .*nope\.pt"),
    "directory_without_weights": (lambda d, sd: d, [], r"no model\.safetensors or pytorch_model\.bin inside"),
    "nan_and_inf_weights": (
        lambda d, sd: _saved(d / "c.pt", {"model": _with(_with(sd, "encoder.layers.0.fc1.weight", 5, float("nan")),
                                                         "decoder.layer_norm.bias", 0, float("-inf"))}),
        [], r"2 weights hold NaN or Inf values: decoder\.layer_norm\.bias, encoder\.layers\.0\.fc1\.weight"),
    "integer_weights": (
        lambda d, sd: _saved(d / "c.pt", {"model": {**sd, "encoder.layer_norm.weight": torch.ones(256, dtype=torch.long)}}),
        [], r"dtype mismatches: encoder\.layer_norm\.weight: int64, the model needs a floating dtype \(float32\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_convert_reports_bad_inputs_in_one_line(case, official_sd, tmp_path, capsys):
    build, flags, message = BAD_INPUTS[case]
    (tmp_path / "in").mkdir()
    src = build(tmp_path / "in", official_sd)
    rc, err = run_cli(capsys, "--input", src, "--arch", "ofa-tiny", "--gpt2-vocab", "--output", tmp_path / "out",
                      *REFCOCO, *flags)
    assert_one_error_line(rc, err)
    assert re.search(message, err), err
    assert "code execution" not in err  # only a real pickle gadget is called unsafe
    assert not (tmp_path / "out").exists()


class SystemCall:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("gadget", [Exploit, SystemCall])
def test_convert_calls_only_real_code_gadgets_unsafe(gadget, tmp_path, capsys):
    target = tmp_path / "pwned"
    src = _saved(tmp_path / "evil.pt", {"model": {"w": torch.ones(2)}, "payload": gadget(target)})
    rc, err = run_cli(capsys, "--input", src, "--arch", "ofa-tiny", "--gpt2-vocab", "--output", tmp_path / "out",
                      *REFCOCO)
    assert_one_error_line(rc, err)
    assert "refused to unpickle: the file holds objects that only code execution could rebuild" in err
    assert not target.exists()


def test_convert_refuses_an_output_that_is_a_file(fairseq_ckpt, tmp_path, capsys):
    (tmp_path / "out").write_text("not a directory")
    rc, err = run_cli(capsys, "--input", fairseq_ckpt, "--arch", "ofa-tiny", "--gpt2-vocab", "--output",
                      tmp_path / "out", *REFCOCO)
    assert_one_error_line(rc, err)
    assert "exists and is not a directory" in err and (tmp_path / "out").read_text() == "not a directory"


@pytest.mark.parametrize("flags, message", [
    (["--patch-image-size", "1000", "--max-src-length", "80", "--max-tgt-length", "20"],
     r"patch_image_size 1000 gives a 63x63 patch grid, larger than the model's image_bucket_size 42"),
    (["--patch-image-size", "480", "--max-src-length", "1023", "--max-tgt-length", "20"],
     r"max_src_length 1023 \(\+ <s> and </s>\) exceeds the model's max_source_positions 1024"),
    (["--patch-image-size", "480", "--max-src-length", "0", "--max-tgt-length", "20"],
     r"PreprocessConfig\.max_src_length must lie in \[1, 65536\], got 0"),
])
def test_convert_checks_the_preprocessing_before_reading(flags, message, tmp_path, capsys):
    rc, err = run_cli(capsys, "--input", tmp_path / "never-read.pt", "--arch", "ofa-tiny", "--gpt2-vocab",
                      "--output", tmp_path / "out", *flags)
    assert_one_error_line(rc, err)
    assert re.search(message, err), err


def test_help_documents_ofa_published_preprocessing(capsys):
    with pytest.raises(SystemExit) as exit_:
        convert_main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for row in ("pretrained ofa-* (pretraining) 384 80 30", "caption (COCO fine-tune) 480 80 20",
                "VQA (VQAv2 fine-tune) 480 80 30", "SNLI-VE 480 80 20", "RefCOCO / RefCOCO+ / RefCOCOg 512 80 20",
                "ImageNet classification 480 128 30 + --imagenet-mean-std", "--max-image-size", "--overwrite"):
        assert row in text


def test_preprocessing_flags_are_required(capsys):
    rc, err = run_cli(capsys, "--input", "x.pt", "--arch", "ofa-tiny", "--gpt2-vocab", "--output", "out")
    assert_one_error_line(rc, err)
    assert "--patch-image-size, --max-src-length, --max-tgt-length" in err


def digest(bundle: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bundle.iterdir())}


def test_a_failed_conversion_leaves_the_old_bundle_intact(fairseq_ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bundle"
    base = ["--arch", "ofa-tiny", "--gpt2-vocab", "--output", out]
    rc, _ = run_cli(capsys, "--input", fairseq_ckpt, *base, *REFCOCO)
    assert rc == 0
    before = digest(out)

    rc, err = run_cli(capsys, "--input", fairseq_ckpt, *base, *REFCOCO)  # no --overwrite
    assert_one_error_line(rc, err)
    assert "is not empty; pass overwrite=True (--overwrite)" in err

    sd = synthetic_official_state()
    del sd["decoder.layers.3.fc2.weight"]
    bad = _saved(tmp_path / "bad.pt", {"model": sd})
    rc, err = run_cli(capsys, "--input", bad, *base, *REFCOCO, "--overwrite")
    assert_one_error_line(rc, err)
    assert "missing keys: decoder.layers.3.fc2.weight" in err

    def disk_full(state, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle_module, "save_file", disk_full)  # fails while writing the new bundle
    rc, err = run_cli(capsys, "--input", fairseq_ckpt, *base, "--patch-image-size", "480", "--max-src-length", "80",
                      "--max-tgt-length", "30", "--overwrite")
    assert_one_error_line(rc, err)
    assert "No space left on device" in err

    assert digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "bundle"]
    assert load_bundle(out).preprocess == PreprocessConfig(patch_image_size=512, max_src_length=80, max_tgt_length=20)


@pytest.fixture(scope="module")
def converted(fairseq_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "bundle"
    assert convert_main(["--input", str(fairseq_ckpt), "--arch", "ofa-tiny", "--gpt2-vocab", "--output", str(out),
                         *REFCOCO]) == 0
    return out


def test_a_full_disk_is_one_error_line_and_keeps_the_old_bundle(converted, fairseq_ckpt, tmp_path, capsys,
                                                                  monkeypatch):
    """ENOSPC simulated: save_file raises what safetensors raises for a failed write, a SafetensorError (not an
    OSError: the stub in the test above never saw the traceback and exit status 1 a real full disk gave). No small
    full filesystem is available here; the next test makes the kernel refuse a real write."""
    out = Path(shutil.copytree(converted, tmp_path / "bundle"))
    before = digest(out)

    def disk_full(state, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(bundle_module, "save_file", disk_full)
    rc, err = run_cli(capsys, "--input", fairseq_ckpt, "--arch", "ofa-tiny", "--gpt2-vocab", "--output", out,
                      *REFCOCO, "--overwrite")
    assert_one_error_line(rc, err)
    assert "[Errno 28] No space left on device" in err and "model.safetensors" in err
    assert digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_real_failed_write_is_one_error_line(converted, fairseq_ckpt, tmp_path, capsys):
    """A real write failure: with RLIMIT_FSIZE at 1 MiB (SIGXFSZ ignored) the kernel refuses the weights' write
    with EFBIG, as it refuses a write to a full disk with ENOSPC."""
    out = Path(shutil.copytree(converted, tmp_path / "bundle"))
    before = digest(out)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, limit[1]))
    try:
        rc, err = run_cli(capsys, "--input", fairseq_ckpt, "--arch", "ofa-tiny", "--gpt2-vocab", "--output", out,
                          *REFCOCO, "--overwrite")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert_one_error_line(rc, err)
    assert "[Errno 27] File too large" in err
    assert digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_overwrite_never_deletes_a_users_other_files(converted, fairseq_ckpt, tmp_path, capsys):
    out = Path(shutil.copytree(converted, tmp_path / "bundle"))
    (out / "notes.txt").write_text("precious")
    before = digest(out)
    rc, err = run_cli(capsys, "--input", fairseq_ckpt, "--arch", "ofa-tiny", "--gpt2-vocab", "--output", out,
                      *REFCOCO, "--overwrite")
    assert_one_error_line(rc, err)
    assert "holds files that are not part of its bundle: ['notes.txt']" in err
    assert digest(out) == before


def test_convert_and_register_once_then_jobs_name_the_alias(fairseq_ckpt, tmp_path, capsys):
    """--register logs the bundle to MLflow and points `official` at its version; the same conversion again
    moves the alias to that version instead of adding one; models:/NAME@official resolves to the same weights."""
    import json

    from mlflow import MlflowClient

    from pipelines.tracking.registry import resolve_model

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--input", str(fairseq_ckpt), "--arch", "ofa-tiny", "--gpt2-vocab", *REFCOCO, "--register", "ofa-tiny",
              "--tracking-uri", tracking]
    summaries = []
    for n in range(2):
        assert convert_main([*common, "--output", str(tmp_path / f"bundle-{n}")]) == 0
        summaries.append(json.loads(capsys.readouterr().out))
    first, second = (s["registered"] for s in summaries)
    assert summaries[0]["model_uri"] == "models:/ofa-tiny@official"
    assert (first["version"], first["reused"], second["version"], second["reused"]) == ("1", False, "1", True)
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    mv = client.get_model_version_by_alias("ofa-tiny", "official")
    sha = hashlib.sha256(fairseq_ckpt.read_bytes()).hexdigest()
    assert mv.tags["ofa.checkpoint_sha256"] == sha and mv.tags["ofa.arch"] == "ofa-tiny"
    run = client.get_run(first["run_id"])
    assert run.data.tags["ofa.checkpoint_sha256"] == sha and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "ofa-checkpoints"

    got = resolve_model("models:/ofa-tiny@official", tracking=tracking, cache_dir=tmp_path / "cache")
    assert got.version == "1"
    converted = load_bundle(tmp_path / "bundle-0").model.state_dict()
    registered = load_bundle(got.path).model.state_dict()
    assert converted.keys() == registered.keys()
    for k, v in converted.items():
        assert torch.equal(v, registered[k]), k

    # other preprocessing is another bundle: a new version, here under another alias (official stays)
    assert convert_main([*common[:-4], "--register", "ofa-tiny", "--tracking-uri", tracking, "--alias", "ref512",
                         "--patch-image-size", "480", "--output", str(tmp_path / "bundle-480")]) == 0
    third = json.loads(capsys.readouterr().out)
    assert third["registered"]["version"] == "2" and third["model_uri"] == "models:/ofa-tiny@ref512"
    assert str(client.get_model_version_by_alias("ofa-tiny", "official").version) == "1"
    rc, err = run_cli(capsys, *common[:-4], "--register", "bad name", "--output", tmp_path / "bundle-x")
    assert_one_error_line(rc, err)
    assert "model name 'bad name'" in err and not (tmp_path / "bundle-x").exists()
