"""What an init bundle contributes to a fine-tune's config (`pipelines.train.setup.with_init_bundle`); no Ray."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from ofa_model.architecture import get_config
from ofa_model.bundle import save_bundle
from ofa_model.config_files import build
from ofa_model.model import OFAModel
from ofa_model.preprocess import PreprocessConfig
from ofa_model.vocab import Vocabulary
from pipelines.train.setup import merged_preprocess, task_specs, with_init_bundle
from pipelines.train.train_config import TrainConfig

# the bundle as a pretraining leaves it: 64 px, its own normalisation and text lengths, a custom task
PRETRAINED = PreprocessConfig(patch_image_size=64, mean=(0.4, 0.4, 0.4), std=(0.3, 0.3, 0.3), max_src_length=40,
                              max_tgt_length=16)
DESCRIBE = "[IMAGE:image] describe the picture -> [TEXT:caption]"
SUMMARISE = "[TEXT:text] summarise the text -> [TEXT:summary]"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("init") / "bundle"
    save_bundle(path, OFAModel(get_config("ofa-micro")).eval(), Vocabulary.gpt2(), preprocess=PRETRAINED,
                custom_tasks={"describe": DESCRIBE, "summarise": SUMMARISE})
    return path


def _config(tmp: Path, init: str | None, preprocess: dict, custom_tasks: dict | None = None) -> TrainConfig:
    return build(TrainConfig, {
        "task": "vqa", "custom_tasks": custom_tasks or {}, "model": {"arch": "ofa-micro", "init": init},
        "data": {"uri": str(tmp / "corpus"), "preprocess": preprocess},
        "run": {"name": "ft", "storage_path": str(tmp / "runs")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}})


def test_a_fine_tune_keeps_its_resolution_and_takes_the_rest_it_leaves_at_the_default_from_the_bundle(
        bundle, tmp_path, caplog):
    cfg = _config(tmp_path, str(bundle), {"patch_image_size": 32, "max_tgt_length": 8},
                  {"summarise": "[TEXT:text] shorten the text -> [TEXT:summary]"})
    with caplog.at_level(logging.INFO, logger="pipelines.train.setup"):
        got = with_init_bundle(cfg)
    p = got.data.preprocess
    assert p.patch_image_size == 32  # the fine-tune's resolution, never the bundle's
    assert p.max_tgt_length == 8  # set by the YAML
    assert (p.mean, p.std, p.max_src_length) == ((0.4, 0.4, 0.4), (0.3, 0.3, 0.3), 40)  # left at default: bundle's
    assert p.max_image_size == PreprocessConfig().max_image_size  # the same on both sides
    assert got.custom_tasks == {"describe": DESCRIBE, "summarise": "[TEXT:text] shorten the text -> [TEXT:summary]"}
    assert {"describe", "summarise"} <= set(task_specs(got))
    assert got.optim == cfg.optim and got.run == cfg.run and got.task == cfg.task  # nothing else changes
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert sorted(line.split(":")[0] for line in lines) == [
        "custom_tasks.describe", "custom_tasks.summarise", "data.preprocess.max_src_length",
        "data.preprocess.max_tgt_length", "data.preprocess.mean", "data.preprocess.patch_image_size",
        "data.preprocess.std"]
    assert f"data.preprocess.mean: (0.4, 0.4, 0.4) (the config has (0.5, 0.5, 0.5), the init bundle {bundle} " \
           "has (0.4, 0.4, 0.4))" in lines
    assert "custom_tasks.summarise: the config's instruction, not the init bundle's" in " ".join(lines)


def test_from_scratch_the_config_is_unchanged_and_the_rule_is_field_by_field(tmp_path):
    cfg = _config(tmp_path, None, {"patch_image_size": 32})
    assert with_init_bundle(cfg) is cfg
    mine = PreprocessConfig(patch_image_size=128, max_src_length=50)
    assert merged_preprocess(mine, PRETRAINED) == PreprocessConfig(
        patch_image_size=128, mean=PRETRAINED.mean, std=PRETRAINED.std, max_src_length=50, max_tgt_length=16)


def test_an_init_bundle_on_s3_is_fetched_where_it_is_used_with_the_configs_s3_settings(
        bundle, tmp_path, s3_server, monkeypatch):
    """model.init=s3://...: the driver's rule and the worker's model build each resolve it (into the node's
    cache), reaching S3 through data.s3 where it is set (here the environment's endpoint is wrong)."""
    from ofa_model.bundle import load_bundle
    from pipelines import storage
    from pipelines.tracking import registry
    from pipelines.train.setup import build_setup

    prefix = s3_server.uri("init/ofa-micro")
    for f in bundle.iterdir():
        storage.write_bytes(storage.join(prefix, f.name), f.read_bytes())
    monkeypatch.setattr(registry, "DEFAULT_CACHE", tmp_path / "cache")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    local = with_init_bundle(_config(tmp_path, str(bundle), {"patch_image_size": 32}))
    raw = {"task": "vqa", "model": {"init": prefix}, "run": {"name": "ft", "storage_path": str(tmp_path / "runs")},
           "data": {"uri": str(tmp_path / "corpus"), "preprocess": {"patch_image_size": 32},
                    "s3": {"endpoint_url": s3_server.endpoint}},
           "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    cfg = with_init_bundle(build(TrainConfig, raw))
    assert cfg.data.preprocess == local.data.preprocess and cfg.custom_tasks == local.custom_tasks
    setup = build_setup(cfg)
    assert setup.init == prefix and len(setup.vocab) == len(load_bundle(bundle).vocab)
    want = load_bundle(bundle).model.state_dict()
    got = setup.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    [entry] = (tmp_path / "cache" / "s3").iterdir()  # fetched once, reused by the later resolves
    assert entry.name.startswith("ofa-micro-")


def test_a_run_carries_its_image_tokenizer_into_every_bundle(tmp_path):
    """model.image_tokenizer is loaded and checked once in the setup; the training bundle carries it, and a
    fine-tune from that bundle keeps it without naming it again."""
    from ofa_model.bundle import BundleError, load_bundle
    from ofa_model.vqgan import VQGAN, save_tokenizer, tokenizer_config
    from pipelines.train.checkpointing import save_training_bundle
    from pipelines.train.setup import build_setup

    torch.manual_seed(0)
    tok = save_tokenizer(tmp_path / "tok", VQGAN(tokenizer_config("vqgan-micro")))
    raw = {"task": "text_to_image", "model": {"image_tokenizer": str(tok)},
           "run": {"name": "t2i", "storage_path": str(tmp_path / "runs")},
           "data": {"uri": str(tmp_path / "corpus"), "preprocess": {"patch_image_size": 32}},
           "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    cfg = build(TrainConfig, raw)
    setup = build_setup(cfg)
    assert setup.image_tokenizer.config == tokenizer_config("vqgan-micro")
    out = tmp_path / "bundle"
    save_training_bundle(cfg, setup, setup.model, None, out, epoch=0, step=0, metrics={}, fingerprint="fp")
    assert load_bundle(out).image_tokenizer.config.n_embed == 512
    again = build_setup(with_init_bundle(build(TrainConfig, {**raw, "model": {"init": str(out)}})))
    assert again.image_tokenizer.config.n_embed == 512  # kept from the init bundle

    big = save_tokenizer(tmp_path / "big", VQGAN(tokenizer_config("vqgan-micro", n_embed=9000)))
    with pytest.raises(BundleError, match="model.image_tokenizer .* 9000 codes"):
        build_setup(build(TrainConfig, {**raw, "model": {"image_tokenizer": str(big)}}))


def test_a_fine_tune_may_set_the_code_grid_of_its_init_bundle_and_nothing_else(bundle, tmp_path):
    """dims.code_image_size sizes no weight, so a fine-tune from model.init may set it (OFA pretrains at 128 and
    fine-tunes text-to-image at 256): the model gets the bundle's weights and the new grid, and code rows are
    checked against it; any other dim with model.init is refused, naming the rule."""
    from ofa_model.config_files import ConfigError
    from pipelines.train.setup import build_setup, run_code_image_size

    assert get_config("ofa-micro").code_image_size == 128
    raw = {"task": "text_to_image", "model": {"init": str(bundle), "dims": {"code_image_size": 64}},
           "run": {"name": "t2i", "storage_path": str(tmp_path / "runs")},
           "data": {"uri": str(tmp_path / "corpus")},
           "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    cfg = with_init_bundle(build(TrainConfig, raw))
    assert run_code_image_size(cfg) == 64
    setup = build_setup(cfg)
    assert setup.model.config.code_image_size == 64
    assert setup.specs["text_to_image"].code_count == 64  # (64 // 8) ** 2
    want = OFAModel(get_config("ofa-micro")).state_dict()
    got = setup.model.state_dict()
    assert set(got) == set(want)
    from ofa_model.bundle import load_bundle

    init = load_bundle(bundle).model.state_dict()
    assert all(torch.equal(got[k], init[k]) for k in init if "position_ids" not in k)
    for dims in ({"embed_dim": 64}, {"code_image_size": 64, "ffn_dim": 256}):
        with pytest.raises(ConfigError, match="only code_image_size"):
            build(TrainConfig, {**raw, "model": {"init": str(bundle), "dims": dims}})
