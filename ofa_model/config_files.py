"""The one loader of every job, sweep and Serve config: YAML + `key=value` overrides -> a validated frozen
pydantic dataclass.

    cfg = load_config(TrainConfig, "configs/finetune/vqa.yaml", ["optim.lr=3e-5", "data.batch_size=16"])

* Config classes are declared with `@config_dataclass` (frozen pydantic dataclasses, `extra="forbid"`, strict
  types, no NaN or infinity). Ranges live on the fields (`lr: Annotated[float, Field(gt=0, le=10)]`, `Literal`
  options); only rules that relate several fields are code (`__post_init__`, after the fields validate).
  Construction in Python validates the same way, so `dataclasses.replace(cfg, ...)` cannot build a bad config.
* The YAML is read with YAML 1.2's scalar rules (`_Loader`), overrides are merged into it, then the whole mapping
  is validated as JSON data, strictly: booleans are never numbers, nor strings (`lr: "1e-5"` is an error,
  `lr: 1e-5` a float), lists become tuples, mappings nested dataclasses.
* Every problem is a `ConfigError` naming the file and the dotted key (`optim.lr: Input should be a valid
  number`, `optim.lrr: unknown key`).
* Overrides reach nested fields with dots; their values are parsed as YAML (`optim.lr=3e-5`,
  `data.tasks=[vqa,caption]`, `init=null`). An override may add a key the file omits, not one the class lacks.
  A mapping value merges into the mapping it overrides (`mixture={vqa: 3}` changes one weight and keeps the
  file's other tasks); to drop keys, use a config file.
* A value the user must supply (a bucket, a corpus, the checkpoint to start from) is written `<required>` in a
  shipped recipe (`REQUIRED`): loading it without an override fails at once, naming every such key and the
  override to pass (`data.uri is required: pass data.uri=...`), before any other check or any work.

`to_dict(cfg)` is the inverse (plain YAML-ready values); `flatten` gives MLflow-style dotted params. No ray,
mlflow or fastapi here: the jobs (`pipelines`, `tune`) and `serve_app` use it alike.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import pydantic.dataclasses
import yaml

from ofa_model.errors import ConfigError

T = TypeVar("T")

STRICT = pydantic.ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
config_dataclass = functools.partial(pydantic.dataclasses.dataclass, frozen=True, config=STRICT)
"""The decorator of every config class: a frozen pydantic dataclass with the checks of the module docstring."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's rules for plain scalars: 1e-5 is a float (1.1 makes it a string) and only
    true/false are booleans (1.1 also turns yes, no, on, off into booleans: answers like `yes` stay words)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


REQUIRED = "<required>"  # a recipe's value the user must supply (module docstring)


def required_keys(raw: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of `raw` whose value is still REQUIRED."""
    out: list[str] = []
    for key, value in raw.items():
        if isinstance(value, Mapping):
            out += required_keys(value, f"{prefix}{key}.")
        elif value == REQUIRED:
            out.append(f"{prefix}{key}")
    return out


def check_supplied(raw: Mapping[str, Any], source: str, override_prefix: str = "") -> None:
    """A ConfigError naming every REQUIRED value of `raw` and the override that supplies it
    (`override_prefix`: where the mapping sits in the user's config, e.g. a sweep's "train.")."""
    missing = required_keys(raw)
    if missing:
        raise ConfigError(f"{source}: " + "; ".join(f"{override_prefix}{k} is required: pass "
                                                    f"{override_prefix}{k}=..." for k in missing))


def read_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc


def read_config_file(path: str | Path | None, source: str) -> dict[str, Any]:
    """The top-level mapping of the YAML file at `path` ({} for None or an empty file); anything else is a
    ConfigError naming `source`."""
    if path is None:
        return {}
    try:
        raw = read_yaml(Path(path).read_text(), source)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return dict(raw)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`; values parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        value = read_yaml(raw, f"override {key}") if raw.strip() else None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part} is set to a value and also used as a section")
            node = nxt
        node[parts[-1]] = value
    return out


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` merged into `base`, section by section (a value replaces, a mapping merges into a mapping)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                *, data: Mapping[str, Any] | None = None, source: str | None = None) -> T:
    """`cls` from the YAML file at `path` merged with `data`, then `overrides` (see the module docstring).
    `source` names the config in errors (default: the path, or "<config>")."""
    source = source or (str(path) if path is not None else "<config>")
    return build(cls, read_config(path, overrides, data=data, source=source), source)


def read_config(path: str | Path | None = None, overrides: Sequence[str] = (), *,
                data: Mapping[str, Any] | None = None, source: str = "<config>") -> dict[str, Any]:
    """The plain mapping `load_config` validates: the file at `path`, `data` merged into it, then `overrides`."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    return merge(merge(read_config_file(path, source), data or {}), parse_overrides(overrides))


def build(cls: type[T], raw: Mapping[str, Any], source: str = "<config>", override_prefix: str = "") -> T:
    """`cls` (a `@config_dataclass`) from a plain mapping, validated strictly as JSON data, once no value is
    still REQUIRED (`check_supplied`)."""
    check_supplied(raw, source, override_prefix)
    try:
        text = json.dumps(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: values must be plain YAML/JSON data ({exc})") from None
    try:
        return pydantic.TypeAdapter(cls).validate_json(text, strict=True)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_problems(cls, exc))) from None


def _problems(cls: type, exc: pydantic.ValidationError) -> list[str]:
    """`dotted.key: message` for each of pydantic's errors."""
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            known = _keys_at(cls, err["loc"][:-1])
            msg = "unknown key" + (f" (known: {', '.join(known)})" if known else "")
        elif err["type"] in ("dataclass_type", "dict_type", "model_type"):
            msg = "expected a mapping of keys"
        elif err["type"] == "value_error":  # a cross-field rule of `__post_init__`: its message names the keys
            msg = str(err["ctx"]["error"])
            if not loc or msg.startswith(f"{loc}."):
                out.append(msg)
                continue
        else:
            msg = err["msg"]
        out.append(f"{loc or '(top level)'}: {msg}")
    return out


def _keys_at(cls: Any, path: Sequence[Any]) -> list[str]:
    """The keys of the config section at `path` (dotted parts of pydantic's location) under `cls`; [] when the
    path does not lead to a dataclass."""
    tp = cls
    for part in path:
        if dataclasses.is_dataclass(tp) and isinstance(part, str):
            tp = typing.get_type_hints(tp).get(part)
        elif typing.get_origin(tp) is dict:  # a mapping of sections: `part` is one of its keys
            tp = typing.get_args(tp)[1]
        else:
            return []
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
            tp = args[0]  # X | None
    return sorted(f.name for f in dataclasses.fields(tp)) if dataclasses.is_dataclass(tp) else []


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
