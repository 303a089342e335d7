"""ofa_model.config_files: the one loader (YAML + overrides -> frozen pydantic dataclasses), with every error naming
its key and file; and the range and cross-field rules of each config family (train, data, serve, sweep)."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Literal

import pytest

from ofa_model.config_files import (
    config_dataclass,
    dump_yaml,
    flatten,
    load_config,
    parse_overrides,
    read_yaml,
    to_dict,
)
from ofa_model.errors import ConfigError
from tests.recipes import supplied

REPO = Path(__file__).resolve().parents[1]


@config_dataclass
class Optim:
    lr: float = 1e-4
    warmup_ratio: float = 0.06
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must lie in (0, 1), got {self.lr}")


@config_dataclass
class Job:
    name: str = "run"
    epochs: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    init: str | None = None
    freeze: bool = False
    optim: Optim = field(default_factory=Optim)
    tasks: tuple[str, ...] = ()


def test_file_overrides_and_nested_fields(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: ft\noptim:\n  lr: 5e-5\n  betas: [0.9, 0.98]\ntasks: [vqa]\n")
    cfg = load_config(Job, p, ["optim.warmup_ratio=0.1", "epochs=3", "init=null", "tasks=[vqa, caption]"])
    assert cfg == Job(name="ft", epochs=3, optim=Optim(lr=5e-5, warmup_ratio=0.1, betas=(0.9, 0.98)),
                      tasks=("vqa", "caption"))
    assert dataclasses.is_dataclass(cfg.optim) and isinstance(cfg.optim.betas, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 4  # type: ignore[misc]


def test_round_trip_through_yaml(tmp_path):
    cfg = Job(name="x", epochs=2, precision="bf16", optim=Optim(lr=3e-5), tasks=("a",))
    p = tmp_path / "out.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_config(Job, p) == cfg
    assert flatten(to_dict(cfg))["optim.lr"] == pytest.approx(3e-5)
    assert flatten(to_dict(cfg))["optim.betas"] == [0.9, 0.999]


@pytest.mark.parametrize("text,overrides,message", [
    ("epochs: 1\nepoch: 2\n", [], "epoch: unknown key"),
    ("optim: {lrr: 1}\n", [], "optim.lrr: unknown key"),
    ("", ["optim.nope=1"], "optim.nope: unknown key"),
    ("epochs: '3'\n", [], "epochs: Input should be a valid integer"),
    ("epochs: true\n", [], "epochs: Input should be a valid integer"),
    ("optim: {lr: '1e-5'}\n", [], "optim.lr: Input should be a valid number"),
    ("optim: {lr: .nan}\n", [], "optim.lr: Input should be a finite number"),
    ("optim: {betas: [0.9, true]}\n", [], "optim.betas.1: Input should be a valid number"),
    ("freeze: 1\n", [], "freeze: Input should be a valid boolean"),
    ("precision: fp16\n", [], "precision: Input should be 'fp32' or 'bf16'"),
    ("epochs: 2.5\n", [], "epochs: Input should be a valid integer"),
    ("optim: {lr: 2.0}\n", [], "lr must lie in (0, 1), got 2.0"),
    ("optim: 3\n", [], "optim: expected a mapping of keys"),
    ("- a\n- b\n", [], "top level must be a mapping"),
    ("a: [\n", [], "not valid YAML"),
])
def test_errors_name_the_key_and_the_file(tmp_path, text, overrides, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(Job, p, overrides)
    assert message in str(exc.value) and str(p) in str(exc.value)


@pytest.mark.parametrize("item", ["lr", "=3", "a..b=1", "a.b c=1", "1a=2"])
def test_malformed_overrides(item):
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_overrides([item])


def test_override_parsing_and_conflicts():
    assert parse_overrides(["a.b=1", "a.c=x y", "d=[1, 2]", "e=", "f=1e-5"]) == {
        "a": {"b": 1, "c": "x y"}, "d": [1, 2], "e": None, "f": 1e-5}
    with pytest.raises(ConfigError, match="also used as a section"):
        parse_overrides(["a=1", "a.b=2"])


def test_yaml_floats_follow_yaml_1_2():
    assert read_yaml("a: 1e-5\nb: 3.0E+2\nc: 1_000\nd: '1e-5'\n") == {"a": 1e-5, "b": 300.0, "c": 1000, "d": "1e-5"}
    assert read_yaml("a: [yes, no, on, off, true, False]") == {"a": ["yes", "no", "on", "off", True, False]}


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(Job, tmp_path / "nope.yaml")


def test_the_data_config_loads_through_the_same_loader():
    from pipelines.data.dataset import DataConfig

    cfg = load_config(DataConfig, "configs/data.yaml", ["preprocess.patch_image_size=256", "tasks=[vqa]", "uri=s3://b/c"])
    assert cfg.preprocess.patch_image_size == 256 and cfg.tasks == ("vqa",)
    with pytest.raises(ConfigError, match="preprocess.patch_image_sizee: unknown key"):
        load_config(DataConfig, "configs/data.yaml", ["uri=s3://b/c", "preprocess.patch_image_sizee=256"])


# ---------------------------------------------------------------------------------------------------------
# The config families: ranges on the fields, cross-field rules in code, all through the one loader


@pytest.mark.parametrize("override,message", [
    ("optim.lr=20.0", "optim.lr: Input should be less than or equal to 10"),
    ("optim.warmup_ratio=-0.1", "optim.warmup_ratio: Input should be greater than or equal to 0"),
    ("optim.betas=[0.9, 1.5]", "optim.betas.1: Input should be less than or equal to 0.999999"),
    ("scaling.num_workers=0", "scaling.num_workers: Input should be greater than or equal to 1"),
    ("scaling.min_workers=0", "scaling.min_workers: Input should be greater than or equal to 1"),
    ("scaling.resources_per_worker={slot: 0}", "scaling.resources_per_worker.slot: Input should be greater than 0"),
    ("run.max_start_failures=-2", "run.max_start_failures: Input should be greater than or equal to -1"),
    ("scst.samples=1", "scst.samples: Input should be greater than or equal to 2"),
    ("run.name=a/b", "run.name: String should match pattern"),
    ("epochs=true", "epochs: Input should be a valid integer"),
    ("mixture={vqa: -1}", "mixture.vqa: Input should be greater than or equal to"),
])
def test_train_config_ranges_name_the_key(override, message):
    from pipelines.train.train_config import TrainConfig

    path = REPO / "configs/finetune/vqa.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, path, supplied(path, [override]))
    assert f"{path}: {message}" in str(exc.value)


@pytest.mark.parametrize("override,message", [
    ("batch_size=0", "batch_size: Input should be greater than or equal to 1"),
    ("bad_row_threshold=1.5", "bad_row_threshold: Input should be less than or equal to 1"),
    ("actor_num_cpus=0", "actor_num_cpus: Input should be greater than 0"),
    ("image_dtype=int8", "image_dtype: Input should be 'uint8', 'float32' or 'float16'"),
    ("splits=[]", "splits: Tuple should have at least 1 item"),
    ("preprocess.patch_image_size=0", "preprocess: PreprocessConfig.patch_image_size must lie in [1, 8192], got 0"),
])
def test_data_config_ranges_name_the_key(override, message):
    from pipelines.data.data_config import DataConfig

    with pytest.raises(ConfigError, match="configs/data.yaml: ") as exc:
        load_config(DataConfig, REPO / "configs/data.yaml", ["uri=s3://b/c", override])
    assert message in str(exc.value)


@pytest.mark.parametrize("override,message", [
    ("port=0", "port: Input should be greater than or equal to 1"),
    ("max_body_bytes=10", "max_body_bytes: Input should be greater than or equal to 1024"),
    ("autoscaling.target_ongoing_requests=0", "autoscaling.target_ongoing_requests: Input should be greater than "
                                              "or equal to 0.01"),
    ("limits.max_items=0", "limits.max_items: Input should be greater than or equal to 1"),
    ("api_key_env=1BAD", "api_key_env: String should match pattern"),
    ("models={'a b': {source: x}}", "models.a b.[key]: String should match pattern"),
])
def test_serve_config_ranges_name_the_key(override, message):
    from serve_app.serve_config import serve_config

    with pytest.raises(ConfigError, match="configs/serve.yaml: ") as exc:
        serve_config(REPO / "configs/serve.yaml", [override])
    assert message in str(exc.value)


@pytest.mark.parametrize("override,message", [
    ("num_samples=0", "num_samples: Input should be greater than or equal to 1"),
    ("asha.reduction_factor=1.0", "asha.reduction_factor: Input should be greater than 1"),
    ("trial.driver_cpus=100", "trial.driver_cpus: Input should be less than or equal to 64"),
    ("name=a/b", "name: String should match pattern"),
])
def test_sweep_config_ranges_name_the_key(override, message):
    from tune.search import load_sweep_config

    path = REPO / "configs/tune/vqa.yaml"
    with pytest.raises(ConfigError) as exc:
        load_sweep_config(path, supplied(path, [override]))
    assert f"{path}: {message}" in str(exc.value)


def test_cross_field_rules_name_their_keys():
    from pipelines.data.data_config import DataConfig
    from pipelines.train.train_config import TrainConfig
    from serve_app.serve_config import serve_config

    with pytest.raises(ConfigError, match=r"optim.end_lr \(0.01\) must not exceed optim.lr \(5e-05\)"):
        load_config(TrainConfig, REPO / "configs/finetune/vqa.yaml", supplied(REPO / "configs/finetune/vqa.yaml", ["optim.end_lr=0.01"]))
    vqa = REPO / "configs/finetune/vqa.yaml"
    with pytest.raises(ConfigError, match=r"scaling.min_workers \(3\) must not exceed scaling.num_workers \(2\)"):
        load_config(TrainConfig, vqa, supplied(vqa, ["scaling.num_workers=2", "scaling.min_workers=3"]))
    with pytest.raises(ConfigError, match=r"scaling.resources_per_worker.CPU: CPUs and GPUs are cpus_per_worker"):
        load_config(TrainConfig, vqa, supplied(vqa, ["scaling.resources_per_worker={CPU: 1}"]))
    with pytest.raises(ConfigError, match=r"num_actors: \(min, max\) with min <= max, got \[3, 1\]"):
        load_config(DataConfig, REPO / "configs/data.yaml", ["uri=s3://b/c", "num_actors=[3, 1]"])
    with pytest.raises(ConfigError, match=r"autoscaling.min_replicas \(4\) must not exceed autoscaling.max_replicas"):
        serve_config(model="x", overrides=["autoscaling.min_replicas=4", "autoscaling.max_replicas=2"])
    with pytest.raises(ValueError, match=r"num_actors: \(min, max\)"):  # built in Python: the same rules
        DataConfig(uri="x", num_actors=(3, 1))


def test_every_shipped_config_loads():
    """Every YAML under configs/ and serve_config.yaml's args load through the one loader."""
    from pipelines.data.data_config import DataConfig
    from pipelines.train.tokenizer_config import TokenizerTrainConfig
    from pipelines.train.train_config import TrainConfig
    from serve_app.serve_config import config_from_args, serve_config
    from tune.search import load_sweep_config

    configs = REPO / "configs"
    loaded = [load_config(TrainConfig, p, supplied(p)) for p in sorted([*configs.glob("finetune/*.yaml"),
                                                                       *configs.glob("pretrain/*.yaml")])]
    loaded += [load_sweep_config(p, supplied(p)) for p in sorted(configs.glob("tune/*.yaml"))]
    loaded += [load_config(TokenizerTrainConfig, p, supplied(p)) for p in sorted(configs.glob("tokenizer/*.yaml"))]
    loaded += [load_config(DataConfig, configs / "data.yaml", supplied(configs / "data.yaml")),
               serve_config(configs / "serve.yaml")]
    [app] = read_yaml((REPO / "serve_config.yaml").read_text())["applications"]
    loaded.append(config_from_args(app["args"]))
    assert len(loaded) == len([*configs.rglob("*.yaml")]) + 1
    assert all(dataclasses.is_dataclass(c) for c in loaded)


def test_one_config_error_class():
    import ofa_model.architecture
    import ofa_model.config_files
    from ofa_model.errors import InputError

    assert ofa_model.architecture.ConfigError is ofa_model.config_files.ConfigError is ConfigError
    assert issubclass(ConfigError, InputError) and ConfigError("x").reason == "bad_config"


def test_the_image_dtype_options_are_the_shipped_dtypes():
    import typing

    from pipelines.data.data_config import IMAGE_DTYPES, ImageDtype

    assert typing.get_args(ImageDtype) == tuple(IMAGE_DTYPES)


def test_a_value_the_user_must_supply_is_named_with_its_override(monkeypatch):
    """No shipped recipe holds a real-looking bucket or checkpoint: those values are `<required>`, and loading
    without them fails at once, naming each key and the override that supplies it (a sweep's base with train.)."""
    from pipelines.train.train_config import TrainConfig
    from tune.search import load_sweep_config, plan_sweep

    shipped = "\n".join(p.read_text() for p in (REPO / "configs").rglob("*.yaml"))
    assert "my-bucket" not in shipped and "init: bundles/" not in shipped
    path = REPO / "configs/finetune/vqa.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(TrainConfig, path, ["data.uri=s3://corpora/vqav2"])
    assert str(exc.value) == (f"{path}: answers is required: pass answers=...; model.init is required: pass "
                              "model.init=...; run.storage_path is required: pass run.storage_path=...")
    cfg = load_config(TrainConfig, path, ["data.uri=s3://c/vqav2", "model.init=models:/ofa-base@official",
                                          "run.storage_path=s3://c/runs", "answers=s3://c/trainval_ans2label.pkl"])
    assert (cfg.data.uri, cfg.model.init, cfg.run.storage_path, cfg.answers) == (
        "s3://c/vqav2", "models:/ofa-base@official", "s3://c/runs", "s3://c/trainval_ans2label.pkl")
    monkeypatch.chdir(REPO)  # a sweep's base is relative to the working directory
    sweep = load_sweep_config("configs/tune/vqa.yaml", ["storage_path=s3://c/tune", "train.data.uri=s3://c/vqav2"])
    with pytest.raises(ConfigError) as exc:  # the trials' runs live under the sweep's storage_path
        plan_sweep(sweep)
    assert str(exc.value).endswith("train: train.answers is required: pass train.answers=...; train.model.init is "
                                   "required: pass train.model.init=...")
    with pytest.raises(ConfigError, match="storage_path is required: pass storage_path=..."):
        load_sweep_config("configs/tune/vqa.yaml")
