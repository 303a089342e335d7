"""pipelines.job_config: YAML + overrides -> frozen dataclasses, with every error naming its key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipelines.job_config import (
    ConfigError,
    dump_yaml,
    flatten,
    load_config,
    parse_overrides,
    read_yaml,
    to_dict,
)


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-4
    warmup_ratio: float = 0.06
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must lie in (0, 1), got {self.lr}")


@dataclass(frozen=True)
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
    ("epochs: '3'\n", [], "epochs: expected a number, got str"),
    ("epochs: true\n", [], "epochs: expected a number, got bool"),
    ("optim: {lr: '1e-5'}\n", [], "optim.lr: expected a number, got str"),
    ("freeze: 1\n", [], "freeze: expected true or false"),
    ("precision: fp16\n", [], "precision: Input should be 'fp32' or 'bf16'"),
    ("epochs: 2.5\n", [], "epochs: Input should be a valid integer"),
    ("optim: {lr: 2.0}\n", [], "lr must lie in (0, 1), got 2.0"),
    ("optim: 3\n", [], "optim: expected a mapping"),
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

    cfg = load_config(DataConfig, "configs/data.yaml", ["preprocess.patch_image_size=256", "tasks=[vqa]"])
    assert cfg.preprocess.patch_image_size == 256 and cfg.tasks == ("vqa",)
    with pytest.raises(ConfigError, match="preprocess.patch_image_sizee: unknown key"):
        load_config(DataConfig, "configs/data.yaml", ["preprocess.patch_image_sizee=256"])
