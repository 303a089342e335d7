"""One loader for every job's configuration: YAML + `key=value` overrides -> a frozen dataclass.

    cfg = load_config(TrainConfig, "configs/finetune/vqa.yaml", ["optim.lr=3e-5", "data.batch_size=16"])

* The target is a (nested) frozen dataclass; pydantic validates and converts the values (lists to tuples,
  nested mappings to nested dataclasses, `Literal` options, numeric ranges checked by `__post_init__`).
* An unknown key, a value of the wrong type, or a failed check is a `ConfigError` naming the dotted key
  (`optim.lr: Input should be a valid number`) and the file. Booleans are never taken for numbers, nor
  strings for numbers: `lr: "1e-5"` is an error, `lr: 1e-5` is a float (YAML 1.2 float syntax is accepted).
* Overrides reach nested fields with dots; their values are parsed as YAML (`optim.lr=3e-5`,
  `data.tasks=[vqa,caption]`, `init=null`). An override may add a key the file omits, not one the
  dataclass lacks. A mapping value merges into the mapping it overrides (`mixture={vqa: 3}` changes one
  weight and keeps the file's other tasks); to drop keys, use a config file.

`to_dict(cfg)` is the inverse (plain YAML-ready values); `flatten` gives MLflow-style dotted params.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from ofa_model.config_text import (  # noqa: F401 (re-exported)
    ConfigError,
    merge,
    parse_overrides,
    read_config_file,
    read_yaml,
)

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                *, data: Mapping[str, Any] | None = None) -> T:
    """`cls` from the YAML file at `path` (or `data`), with `overrides` applied."""
    source = str(path) if path is not None else "<config>"
    raw: Any = read_config_file(path, source)
    if path is None and data is not None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
        raw = data
    raw = merge(raw, parse_overrides(overrides))
    return build(cls, raw, source)


def build(cls: type[T], raw: Mapping[str, Any], source: str = "<config>") -> T:
    """`cls` from a plain mapping, with the checks of the module docstring."""
    problems = list(_check(cls, raw, ""))
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    try:
        return pydantic.TypeAdapter(cls).validate_python(raw)
    except pydantic.ValidationError as exc:
        msgs = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
            msg = err["msg"]
            ctx = err.get("ctx", {}).get("error")
            msgs.append(f"{loc or '(top level)'}: {ctx if ctx is not None else msg}")
        raise ConfigError(f"{source}: " + "; ".join(msgs)) from None


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _check(cls: type, raw: Any, prefix: str):
    """Unknown keys, and booleans or strings given for numbers, anywhere in the nested dataclasses."""
    if not isinstance(raw, Mapping):
        yield f"{prefix.rstrip('.') or '(top level)'}: expected a mapping of keys, got {type(raw).__name__}"
        return
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in names:
            yield f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})"
    for name in names & set(raw):
        value, (tp, _) = raw[name], _strip_optional(hints[name])
        where = f"{prefix}{name}"
        if value is None:
            continue
        if dataclasses.is_dataclass(tp):
            yield from _check(tp, value, where + ".")
        elif tp in (int, float) and isinstance(value, bool | str):
            yield f"{where}: expected a number, got {type(value).__name__} {value!r}"
        elif tp is bool and not isinstance(value, bool):
            yield f"{where}: expected true or false, got {value!r}"


def to_dict(cfg: Any) -> Any:
    """Plain YAML-ready values (tuples as lists) of a config dataclass."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    return cfg


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 1}}` -> `{"optim.lr": 1}`."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
