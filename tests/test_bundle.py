"""Bundles own their preprocessing and custom tasks, are written atomically, and are read as untrusted input."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ofa_model import bundle as bundle_module
from ofa_model.architecture import get_config
from ofa_model.bundle import BundleError, BundleLimits, load_bundle, save_bundle
from ofa_model.errors import ConfigError, InputError
from ofa_model.model import OFAModel
from ofa_model.predictor import OFAPredictor
from ofa_model.preprocess import PreprocessConfig
from ofa_model.tasks import TASKS
from ofa_model.vocab import Vocabulary
from ofa_model.weights import CheckpointError, CheckpointMismatchError

pytestmark = pytest.mark.timeout(120)  # a bundle read that blocks (a FIFO) must fail, not hang

PCFG = PreprocessConfig(patch_image_size=64, max_src_length=40, max_tgt_length=16)
DESCRIBE = "[IMAGE:image] describe the picture -> [TEXT:caption]"
# A small official dict.txt: GPT-2 ids of ".", " the", "Hello", " world", then two literals.
SMALL_DICT = "13 850314647\n262 800000000\n15496 500\n995 400\nmadeupword0000 0\nmadeupword0001 0\n"


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.gpt2()


@pytest.fixture(scope="module")
def micro() -> OFAModel:
    torch.manual_seed(0)
    return OFAModel(get_config("ofa-micro")).eval()


@pytest.fixture(scope="module")
def good(tmp_path_factory, micro, vocab) -> Path:
    path = tmp_path_factory.mktemp("good") / "bundle"
    save_bundle(path, micro, vocab, preprocess=PCFG, custom_tasks={"describe": DESCRIBE}, metadata={"run": "r1"})
    return path


@pytest.fixture(scope="module")
def good_official(tmp_path_factory) -> Path:
    """A bundle of the official layout, so it has a dict.txt."""
    src = tmp_path_factory.mktemp("dict") / "dict.txt"
    src.write_text(SMALL_DICT)
    small = Vocabulary.from_dict_txt(src)
    torch.manual_seed(0)
    model = OFAModel(get_config("ofa-micro", vocab_size=len(small)))
    path = tmp_path_factory.mktemp("official") / "bundle"
    save_bundle(path, model, small, preprocess=PCFG)
    return path


@pytest.fixture
def bundle(good, tmp_path) -> Path:
    """A fresh copy of the good bundle, to break."""
    return Path(shutil.copytree(good, tmp_path / "bundle"))


@pytest.fixture
def official(good_official, tmp_path) -> Path:
    return Path(shutil.copytree(good_official, tmp_path / "official"))


@pytest.fixture
def no_real_model(monkeypatch):
    """Fail the test if load_bundle builds a model anywhere but on the meta device."""
    real = bundle_module.OFAModel

    def build(config, *args, **kwargs):
        assert torch.empty(0).device.type == "meta", "a real model was allocated before the checks"
        return real(config, *args, **kwargs)

    monkeypatch.setattr(bundle_module, "OFAModel", build)


def edit_config(path: Path, change) -> None:
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    change(cfg)
    f.write_text(json.dumps(cfg))


def same_weights(a: OFAModel, b: OFAModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # the same bytes, reloaded


# ----------------------------------------------------------------------------------------------
# The bundle owns its preprocessing and its custom tasks


def test_preprocess_and_custom_tasks_round_trip_typed(good, micro):
    b = load_bundle(good)
    assert isinstance(b.preprocess, PreprocessConfig) and b.preprocess == PCFG
    assert b.custom_tasks == {"describe": DESCRIBE} and b.metadata == {"run": "r1"}
    assert b.tasks["describe"].prompt == " describe the picture" and b.tasks["caption"] == TASKS["caption"]
    assert same_weights(b.model, micro)
    cfg = json.loads((good / "config.json").read_text())
    assert cfg["custom_tasks"] == {"describe": DESCRIBE} and cfg["preprocess"] == PCFG.to_dict()


def test_predictor_takes_preprocessing_and_tasks_from_the_bundle(good):
    p = OFAPredictor.from_bundle(good)
    assert p.preprocess == PCFG  # not the 480 px default
    assert p.tasks["describe"].prompt == " describe the picture" and set(TASKS) < set(p.tasks)


def test_save_requires_a_typed_preprocess_config(micro, vocab, tmp_path):
    with pytest.raises(TypeError, match="preprocess"):
        save_bundle(tmp_path / "a", micro, vocab)  # the keyword is required
    with pytest.raises(TypeError, match="must be a PreprocessConfig, got dict"):
        save_bundle(tmp_path / "b", micro, vocab, preprocess=PCFG.to_dict())
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("change", [lambda c: c.pop("preprocess"), lambda c: c.update(preprocess=None)],
                         ids=["absent", "null"])
def test_a_bundle_without_preprocessing_names_the_fix(bundle, change):
    edit_config(bundle, change)
    with pytest.raises(BundleError, match="no preprocessing parameters") as err:
        load_bundle(bundle)
    assert "save_bundle(..., preprocess=PreprocessConfig(...))" in str(err.value)
    assert "--patch-image-size" in str(err.value) and str(bundle / "config.json") in str(err.value)


def test_an_incomplete_preprocess_is_refused(bundle):
    edit_config(bundle, lambda c: c["preprocess"].pop("max_tgt_length"))
    with pytest.raises(BundleError, match=r"preprocess: PreprocessConfig is incomplete: missing keys "
                                          r"\['max_tgt_length'\]; re-save the bundle"):
        load_bundle(bundle)


def test_an_invalid_preprocess_is_refused(bundle):
    edit_config(bundle, lambda c: c["preprocess"].update(patch_image_size="64"))
    with pytest.raises(BundleError, match=r"config\.json: preprocess: PreprocessConfig\.patch_image_size must be an "
                                          r"integer, got str '64'"):
        load_bundle(bundle)


@pytest.mark.parametrize("key, value, message", [
    ("patch_image_size", 673, r"patch_image_size 673 gives a 43x43 patch grid, larger than the model's "
                              r"image_bucket_size 42 \(at most 672 px\)"),
    ("max_src_length", 1023, r"max_src_length 1023 \(\+ <s> and </s>\) exceeds the model's max_source_positions 1024"),
    ("max_tgt_length", 1025, r"max_tgt_length 1025 exceeds the model's max_target_positions 1024"),
])
def test_preprocess_is_checked_against_the_model_at_load(bundle, no_real_model, key, value, message):
    edit_config(bundle, lambda c: c["preprocess"].update({key: value}))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_preprocess_at_the_model_limits_loads(bundle):
    edit_config(bundle, lambda c: c["preprocess"].update(patch_image_size=672, max_src_length=1022,
                                                         max_tgt_length=1024))
    assert load_bundle(bundle).preprocess.patch_image_size == 672


def test_preprocess_is_checked_against_the_model_at_save(micro, vocab, tmp_path):
    with pytest.raises(BundleError, match=r"patch_image_size 1024 gives a 64x64 patch grid"):
        save_bundle(tmp_path / "b", micro, vocab, preprocess=PreprocessConfig(patch_image_size=1024))
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def wide_buckets(tmp_path_factory, vocab) -> Path:
    """A bundle whose architecture has the largest bucket table the config allows (256: a 256x256 patch grid)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide") / "bundle"
    save_bundle(path, OFAModel(get_config("ofa-micro", image_bucket_size=256)), vocab, preprocess=PCFG)
    return path


def test_image_tokens_over_the_limit_are_refused_before_allocating(wide_buckets, tmp_path, no_real_model):
    """The grid fits the bucket table, but 65,536 patches would ask ~68 GB of attention for every input."""
    bundle = Path(shutil.copytree(wide_buckets, tmp_path / "bundle"))
    edit_config(bundle, lambda c: c["preprocess"].update(patch_image_size=4096))
    with pytest.raises(BundleError, match=r"config\.json: patch_image_size 4096 gives 65,536 image tokens "
                                          r"\(256x256 patches\), over BundleLimits\.max_image_tokens 1,764") as err:
        load_bundle(bundle)
    assert err.value.reason == "bad_bundle"


def test_the_token_limits_are_configurable(wide_buckets, tmp_path):
    bundle = Path(shutil.copytree(wide_buckets, tmp_path / "bundle"))
    edit_config(bundle, lambda c: c["preprocess"].update(patch_image_size=1024))  # 64x64 patches
    with pytest.raises(BundleError, match="over BundleLimits.max_image_tokens"):
        load_bundle(bundle)
    wide = BundleLimits(max_image_tokens=4096, max_encoder_tokens=4096 + 42)
    assert load_bundle(bundle, limits=wide).preprocess.patch_image_size == 1024
    p = OFAPredictor.from_bundle(bundle, bundle_limits=wide)
    assert p.preprocess.patch_image_size == 1024
    with pytest.raises(BundleError, match=r"patch_image_size 1024 and max_src_length 40 give 4,138 encoder tokens "
                                          r"\(4,096 image \+ 42 source\), over BundleLimits\.max_encoder_tokens "
                                          r"4,137"):
        load_bundle(bundle, limits=BundleLimits(max_image_tokens=4096, max_encoder_tokens=4137))
    for bad in (0, True, 2.5):
        with pytest.raises(ConfigError, match=r"BundleLimits\.max_image_tokens must"):
            BundleLimits(max_image_tokens=bad)


def test_the_token_limits_are_checked_at_save(wide_buckets, tmp_path, vocab):
    model = load_bundle(wide_buckets).model
    with pytest.raises(BundleError, match=r"cannot save a bundle to .*: preprocess: patch_image_size 4096 gives "
                                          r"65,536 image tokens"):
        save_bundle(tmp_path / "b", model, vocab, preprocess=PreprocessConfig(patch_image_size=4096))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("key, value, message", [
    ("std", [1e-300] * 3, r"PreprocessConfig\.std\[0\] 1e-300 is 0\.0 in float32"),
    ("mean", [1e308, 0.5, 0.5], r"PreprocessConfig\.mean\[0\] 1e\+308 is not finite in float32"),
], ids=["std", "mean"])
def test_normalisation_that_vanishes_in_float32_does_not_load(bundle, key, value, message):
    edit_config(bundle, lambda c: c["preprocess"].update({key: value}))
    with pytest.raises(BundleError, match=r"config\.json: preprocess: " + message):
        load_bundle(bundle)


def test_a_custom_task_over_the_slot_limit_is_a_bundle_error(bundle, micro, vocab, tmp_path):
    line = "[IMAGE:image] " + " ".join(f"[TEXT:c{i}]" for i in range(101)) + " -> [TEXT:t]"
    message = r"custom_tasks\.wide: instruction .*: 101 \[TEXT:column\] slots, over the limit of 100"
    edit_config(bundle, lambda c: c.update(custom_tasks={"wide": line}))
    with pytest.raises(BundleError, match=r"config\.json: " + message):
        load_bundle(bundle)
    with pytest.raises(BundleError, match=message):
        save_bundle(tmp_path / "b", micro, vocab, preprocess=PCFG, custom_tasks={"wide": line})


def test_braces_in_a_custom_task_are_literal(bundle, tmp_path):
    edit_config(bundle, lambda c: c.update(custom_tasks={"odd": "[IMAGE:image] {0} {__class__} [TEXT:q] -> [TEXT:a]"}))
    assert load_bundle(bundle).tasks["odd"].prompt == " {{0}} {{__class__}} {slot0}"


@pytest.mark.parametrize("kw, message", [
    (dict(custom_tasks=["x"]), r"custom_tasks must be a mapping \(a dict\) or None, got list"),
    (dict(metadata=[1, 2]), r"metadata must be a mapping \(a dict\) or None, got list"),
    (dict(metadata="run"), r"metadata must be a mapping \(a dict\) or None, got str"),
], ids=["custom_tasks-list", "metadata-list", "metadata-str"])
def test_save_names_custom_tasks_or_metadata_of_the_wrong_type(micro, vocab, tmp_path, kw, message):
    with pytest.raises(BundleError, match=message):
        save_bundle(tmp_path / "b", micro, vocab, preprocess=PCFG, **kw)
    assert not (tmp_path / "b").exists()

@pytest.mark.parametrize("tasks, message", [
    ({"caption": DESCRIBE}, r"custom task 'caption' has the name of a built-in task"),
    ({"vqa": DESCRIBE}, r"custom task 'vqa' has the name of a built-in task"),
    ({"mine": "describe the picture"}, r"custom_tasks\.mine: instruction"),
    ({"bad name!": DESCRIBE}, r"custom task name 'bad name!'"),
    ({"mine": 3}, r"custom_tasks\.mine must be an instruction line, got int"),
])
def test_custom_tasks_are_checked_at_save(micro, vocab, tmp_path, tasks, message):
    with pytest.raises(BundleError, match=message):
        save_bundle(tmp_path / "b", micro, vocab, preprocess=PCFG, custom_tasks=tasks)
    assert not (tmp_path / "b").exists()


def test_a_bundle_cannot_replace_a_built_in_task(bundle):
    edit_config(bundle, lambda c: c.update(custom_tasks={"grounding": DESCRIBE}))
    with pytest.raises(BundleError, match=r"config\.json: custom task 'grounding' has the name of a built-in task"):
        load_bundle(bundle)


# ----------------------------------------------------------------------------------------------
# config.json is validated before anything is allocated


@pytest.mark.parametrize("key, value, message", [
    ("embed_dim", "64", r"model: OFAConfig\.embed_dim must be an integer, got str '64'"),
    ("attention_heads", 0, r"OFAConfig\.attention_heads must lie in \[1, 1024\], got 0"),
    ("embed_dim", 10**9, r"OFAConfig\.embed_dim must lie in \[1, 16384\], got 1000000000"),
    ("layer_norm_eps", "1e-5", r"OFAConfig\.layer_norm_eps must be a number, got str '1e-5'"),
    ("layer_norm_eps", 0, r"OFAConfig\.layer_norm_eps must lie in \(0\.0, 1\.0\], got 0"),
    ("encoder_layers", True, r"OFAConfig\.encoder_layers must be an integer, got bool True"),
    ("attn_scale_factor", True, r"OFAConfig\.attn_scale_factor must be a number, got bool"),
    ("ffn_dim", -5, r"OFAConfig\.ffn_dim must lie in \[1, 65536\], got -5"),
    ("embed_dim", 66, r"OFAConfig\.embed_dim 66 is not divisible by attention_heads 4"),
    ("resnet_layers", [1, 1], r"OFAConfig\.resnet_layers must list 3 stages"),
    ("resnet_layers", [1, "1", 1], r"OFAConfig\.resnet_layers\[1\] must be an integer"),
    ("pad_id", 59457, r"OFAConfig\.pad_id 59457 must be below vocab_size 59457"),
    ("code_image_size", 1000, r"OFAConfig\.code_image_size 1000 must be a multiple of 8 whose grid side"),
    ("resnet_out_channels", 2048, r"OFAConfig\.resnet_out_channels 2048 must be 16 \* resnet_width \(1024\)"),
    ("resnet_out_channels", 64, r"OFAConfig\.resnet_out_channels must lie in \[128, 4096\]"),
    ("resnet_width", 4, r"OFAConfig\.resnet_width must lie in \[8, 256\]"),
    ("token_bucket_size", 4096, r"OFAConfig\.token_bucket_size 4096: token_bucket_size // 2 must be below"),
    ("name", "", r"OFAConfig\.name must be a non-empty string"),
    ("foo", 1, r"unknown OFAConfig keys: \['foo'\]"),
])
def test_bad_model_config_values_name_the_key(bundle, no_real_model, key, value, message):
    edit_config(bundle, lambda c: c["model"].update({key: value}))
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(bundle)
    assert str(bundle / "config.json") in str(err.value) and err.value.reason == "bad_bundle"


def test_a_missing_model_key_is_named(bundle, no_real_model):
    edit_config(bundle, lambda c: c["model"].pop("ffn_dim"))
    with pytest.raises(BundleError, match=r"missing OFAConfig keys: \['ffn_dim'\]"):
        load_bundle(bundle)


def test_nan_in_json_is_refused(bundle):
    f = bundle / "config.json"
    f.write_text(f.read_text().replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": NaN'))
    with pytest.raises(BundleError, match="NaN is not a valid JSON number"):
        load_bundle(bundle)


@pytest.mark.parametrize("text, message", [
    (b"\xff\xfe not utf-8", "is not UTF-8 text"),
    (b"{not json", "is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON"),  # nesting deep enough to exhaust the recursion limit
    (b"[1, 2]", "must hold a JSON object, got list"),
])
def test_config_json_that_is_not_an_object(bundle, text, message):
    (bundle / "config.json").write_bytes(text)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_a_huge_architecture_is_refused_before_allocation(bundle, no_real_model):
    edit_config(bundle, lambda c: c["model"].update(embed_dim=16384, ffn_dim=65536, attention_heads=16))
    with pytest.raises(BundleError, match=r"parameters, over the limit of 10,000,000,000"):
        load_bundle(bundle)


def test_weights_that_do_not_fit_the_config_cost_no_memory(bundle, no_real_model):
    edit_config(bundle, lambda c: c["model"].update(embed_dim=128, ffn_dim=512))  # valid, but not these weights
    with pytest.raises(CheckpointMismatchError, match="shape mismatches") as err:
        load_bundle(bundle)
    assert "encoder.embed_tokens.weight: checkpoint (59457, 64) vs model (59457, 128)" in err.value.shapes


def test_integer_weights_are_refused_from_the_header(bundle, no_real_model):
    state = load_file(str(bundle / "model.safetensors"))
    state["encoder.layer_norm.weight"] = torch.ones(64, dtype=torch.int64)
    save_file(state, str(bundle / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="dtype mismatches") as err:
        load_bundle(bundle)
    assert err.value.dtypes == ["encoder.layer_norm.weight: I64, the model needs a floating dtype (float32)"]


def test_nan_and_inf_weights_are_refused(bundle):
    state = load_file(str(bundle / "model.safetensors"))
    state["encoder.layer_norm.weight"][3] = float("nan")
    state["decoder.layers.1.fc1.bias"][0] = float("inf")
    save_file(state, str(bundle / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"2 weights hold NaN or Inf values: decoder\.layers\.1\.fc1\.bias, "
                                              r"encoder\.layer_norm\.weight"):
        load_bundle(bundle)


@pytest.mark.parametrize("data", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad", b"random bytes " * 100, None],
                         ids=["empty", "bad-header", "random", "truncated"])
def test_a_bad_safetensors_file_is_named(bundle, data):
    f = bundle / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2] if data is None else data)
    with pytest.raises(BundleError, match=r"model\.safetensors is not a valid safetensors file"):
        load_bundle(bundle)


@pytest.mark.parametrize("change, message", [
    (lambda v: v.update(size=10**9), r"vocab\.size 1000000000 does not match model\.vocab_size 59457"),
    (lambda v: v.update(num_codes=10**9), r"vocab\.num_codes must be an integer in \[1, 59457\), got 1000000000"),
    (lambda v: v.update(num_bins="1000"), r"vocab\.num_bins must be an integer"),
    (lambda v: v.update(num_codes=50000, num_bins=9457), r"must leave room for text tokens"),
])
def test_vocabulary_sizes_are_checked_before_building(bundle, change, message, monkeypatch):
    monkeypatch.setattr(Vocabulary, "from_reference", lambda *a: pytest.fail("the vocabulary was built"))
    edit_config(bundle, lambda c: change(c["vocab"]))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_official_bundle_round_trips(official):
    b = load_bundle(official)
    assert b.vocab.layout == "official" and (official / "dict.txt").read_text() == SMALL_DICT


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "", 7])
def test_dict_txt_must_name_a_file_inside_the_bundle(official, name):
    edit_config(official, lambda c: c["vocab"].update(dict_txt=name))
    with pytest.raises(BundleError, match="is not a file name inside the bundle"):
        load_bundle(official)


# ----------------------------------------------------------------------------------------------
# Only regular files inside the bundle are read, each under a cap


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["config.json", "dict.txt", "model.safetensors"])
def test_a_fifo_is_refused_not_waited_on(official, name):
    (official / name).unlink()
    os.mkfifo(official / name)
    with pytest.raises(BundleError, match=rf"{name} is not a regular file \(a FIFO\)"):
        load_bundle(official)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["config.json", "dict.txt", "model.safetensors"])
def test_a_symlink_to_dev_zero_is_refused(official, name):
    (official / name).unlink()
    os.symlink("/dev/zero", official / name)
    with pytest.raises(BundleError, match=rf"{name} links to /dev/zero, outside the bundle"):
        load_bundle(official)


@pytest.mark.parametrize("name", ["config.json", "dict.txt", "model.safetensors"])
def test_a_symlink_out_of_the_bundle_is_not_followed(official, tmp_path, name):
    outside = tmp_path / f"outside-{name}"
    shutil.move(official / name, outside)  # a perfectly good file, but not the bundle's
    os.symlink(outside, official / name)
    with pytest.raises(BundleError, match=rf"{name} links to .*outside-{name}, outside the bundle"):
        load_bundle(official)


def test_a_symlink_inside_the_bundle_is_followed(official):
    (official / "files").mkdir()
    shutil.move(official / "dict.txt", official / "files" / "dict.txt")
    os.symlink("files/dict.txt", official / "dict.txt")
    assert load_bundle(official).vocab.layout == "official"


def test_a_bundle_directory_reached_through_a_symlink_loads(good, tmp_path):
    os.symlink(good, tmp_path / "latest")
    assert load_bundle(tmp_path / "latest").preprocess == PCFG


@pytest.mark.parametrize("name, cap", [("config.json", "4,194,304"), ("dict.txt", "16,777,216")])
def test_files_over_their_cap_are_refused(official, name, cap):
    with open(official / name, "r+b") as f:
        f.truncate(20 * 2**20)  # sparse: costs no disk
    with pytest.raises(BundleError, match=rf"{name} is 20,971,520 bytes, over the {cap}-byte cap"):
        load_bundle(official)


def test_weights_over_their_cap_are_refused(bundle, monkeypatch):
    monkeypatch.setattr(bundle_module, "WEIGHTS_MAX_BYTES", 1000)
    with pytest.raises(BundleError, match=r"model\.safetensors is [\d,]+ bytes, over the 1,000-byte cap"):
        load_bundle(bundle)


def test_bundle_errors_are_input_errors(tmp_path):
    with pytest.raises(BundleError, match="is not a model bundle: it does not exist") as err:
        load_bundle(tmp_path / "nope")
    assert isinstance(err.value, InputError) and err.value.reason == "bad_bundle"
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="is not a model bundle: not a directory"):
        load_bundle(tmp_path / "file")


# ----------------------------------------------------------------------------------------------
# Atomic writes


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_non_empty_directory_is_refused_without_overwrite(bundle, micro, vocab):
    before = (bundle / "config.json").read_bytes()
    with pytest.raises(BundleError, match="is not empty; pass overwrite=True"):
        save_bundle(bundle, micro, vocab, preprocess=PCFG)
    assert (bundle / "config.json").read_bytes() == before and leftovers(bundle.parent) == []


def test_overwrite_replaces_the_bundle_and_leaves_no_temporaries(bundle, vocab):
    torch.manual_seed(1)
    other = OFAModel(get_config("ofa-micro")).eval()
    new = PreprocessConfig(patch_image_size=32, max_src_length=20, max_tgt_length=8)
    save_bundle(bundle, other, vocab, preprocess=new, overwrite=True)
    b = load_bundle(bundle)
    assert b.preprocess == new and b.custom_tasks == {} and same_weights(b.model, other)
    assert leftovers(bundle.parent) == []


def test_an_empty_directory_is_used(tmp_path, micro, vocab):
    (tmp_path / "empty").mkdir()
    save_bundle(tmp_path / "empty", micro, vocab, preprocess=PCFG)
    assert load_bundle(tmp_path / "empty").preprocess == PCFG


def test_overwrite_never_replaces_what_is_not_a_bundle(tmp_path, micro, vocab):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    with pytest.raises(BundleError, match="holds no readable ofa-ray-bundle; refusing to replace it"):
        save_bundle(tmp_path / "home", micro, vocab, preprocess=PCFG, overwrite=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="exists and is not a directory"):
        save_bundle(tmp_path / "file", micro, vocab, preprocess=PCFG, overwrite=True)



def test_overwrite_refuses_a_bundle_directory_holding_other_files(bundle, micro, vocab):
    (bundle / "notes.txt").write_text("precious")
    (bundle / "eval").mkdir()
    with pytest.raises(BundleError, match=r"holds files that are not part of its bundle: \['eval', 'notes\.txt'\]"):
        save_bundle(bundle, micro, vocab, preprocess=PCFG, overwrite=True)
    assert (bundle / "notes.txt").read_text() == "precious" and (bundle / "eval").is_dir()
    assert load_bundle(bundle).custom_tasks == {"describe": DESCRIBE}


def test_overwrite_replaces_a_bundle_with_its_dict_txt(official, vocab):
    torch.manual_seed(3)
    save_bundle(official, OFAModel(get_config("ofa-micro")), vocab, preprocess=PCFG, overwrite=True)
    assert load_bundle(official).vocab.layout == "gpt2" and not (official / "dict.txt").exists()


def test_a_full_disk_while_writing_weights_is_an_oserror(bundle, micro, vocab, monkeypatch):
    """safetensors reports a failed write as SafetensorError; ENOSPC is simulated by raising exactly what it
    raises (its message for a real failed write, seen with RLIMIT_FSIZE: "... I/O error: File too large (os error
    27)"), since no small full filesystem is available here."""
    def full(state, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(bundle_module, "save_file", full)
    with pytest.raises(OSError, match="No space left on device") as err:
        save_bundle(bundle, micro, vocab, preprocess=PCFG, overwrite=True)
    assert err.value.errno == errno.ENOSPC and err.value.filename.endswith("model.safetensors")
    assert load_bundle(bundle).custom_tasks == {"describe": DESCRIBE} and leftovers(bundle.parent) == []

def test_a_failed_write_leaves_the_old_bundle_intact(bundle, micro, vocab, monkeypatch):
    def fail_midway(state, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle_module, "save_file", fail_midway)
    torch.manual_seed(2)
    with pytest.raises(OSError, match="No space left"):
        save_bundle(bundle, OFAModel(get_config("ofa-micro")), vocab, preprocess=PCFG, overwrite=True)
    b = load_bundle(bundle)
    assert b.preprocess == PCFG and b.custom_tasks == {"describe": DESCRIBE} and same_weights(b.model, micro)
    assert leftovers(bundle.parent) == []


def test_nan_weights_are_refused_at_save(tmp_path, vocab):
    torch.manual_seed(0)
    model = OFAModel(get_config("ofa-micro"))
    with torch.no_grad():
        model.encoder.layer_norm.bias[0] = float("nan")
    with pytest.raises(BundleError, match=r"1 weights hold NaN or Inf values: encoder\.layer_norm\.bias"):
        save_bundle(tmp_path / "b", model, vocab, preprocess=PCFG)
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []
