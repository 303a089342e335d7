"""Text configs shared by every entry point: YAML with YAML 1.2 scalars, dotted `key=value` overrides, section
merging, and the checks config dataclasses run on their values. No ray, mlflow or fastapi: `pipelines.job_config`
(training, sweeps) and `serve_app.config` build on it alike."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


def check(cond: bool, what: str) -> None:
    """A config value check: ValueError(`what`) unless `cond`."""
    if not cond:
        raise ValueError(what)


def check_finite(name: str, value: float, lo: float, hi: float) -> None:
    check(math.isfinite(value) and lo <= value <= hi, f"{name} must lie in [{lo}, {hi}], got {value}")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the file."""


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
