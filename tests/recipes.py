"""Shipped recipes with their `<required>` values supplied (`ofa_model.config_files.REQUIRED`): the tests that
load every recipe give each required key a test value, as a user gives theirs on the command line."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ofa_model.config_files import merge, read_config, read_config_file, required_keys


def supplied(path: str | Path, overrides: Sequence[str] = ()) -> list[str]:
    """`overrides` plus `key=s3://test-bucket/<key>` for every key of the recipe at `path` still required after
    them (`answers`: a real answer file, `answer_file()`); for a sweep also its base recipe's (with the sweep's
    `train` merged in), as `train.<key>=...`."""
    raw = read_config(path, overrides)
    out = [*overrides, *(f"{k}={_value(k)}" for k in required_keys(raw))]
    base = raw.get("base")
    if isinstance(base, str) and Path(base).is_file():
        train = merge(read_config_file(base, base), raw.get("train") or {})
        out += [f"train.{k}={_value(k)}" for k in required_keys(train)]
    return out


def _value(key: str) -> str:
    return str(answer_file()) if key == "answers" else f"s3://test-bucket/{key}"


@functools.cache
def answer_file() -> Path:
    """A small answer file (plain text, three answers), written once per test session."""
    path = Path(tempfile.mkdtemp(prefix="ofa-test-answers-")) / "answers.txt"
    path.write_text("yes\nno\nred\n")
    return path
