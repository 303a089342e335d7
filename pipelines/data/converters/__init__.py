"""Converters from public dataset layouts to the canonical corpus (`pipelines.data.schema`), and `prepare`.

Each converter is a generator function of keyword options plus `splits` and `limit`; it yields
canonical rows (dicts keyed by `pipelines.data.schema.FIELDS`) and `pipelines.data.readers.rows.BadRow` records for
broken input, and never stops at a broken record. `prepare` streams one converter into a
`pipelines.data.shards.ShardWriter` and returns a summary of what was written and what was rejected.

A converter's keyword-only parameters other than `splits` and `limit` are its options, typed by their
annotations (`converter_options`): `jobs.prepare_data` generates its flags from them, and `convert` checks
a caller's options against them.
"""

import inspect
import logging
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pipelines.data.converters.coco import convert_coco
from pipelines.data.converters.easyvqa import convert_easy_vqa
from pipelines.data.converters.fashion_mnist import convert_fashion_mnist
from pipelines.data.converters.gigaword import convert_gigaword
from pipelines.data.converters.glue import convert_glue
from pipelines.data.converters.imagefolder import convert_imagefolder
from pipelines.data.converters.refcoco import convert_refcoco
from pipelines.data.converters.snli_ve import convert_snli_ve
from pipelines.data.converters.vqav2 import convert_vqav2
from pipelines.data.readers.rows import BadRow
from pipelines.data.rowstats import RowStats
from pipelines.data.shards import ShardWriter
from pipelines.progress import Progress
from pipelines.storage import S3Options

logger = logging.getLogger(__name__)

SOURCES: dict[str, Callable[..., Iterator[dict | BadRow]]] = {
    "easy-vqa": convert_easy_vqa,
    "coco": convert_coco,
    "vqav2": convert_vqav2,
    "refcoco": convert_refcoco,
    "snli-ve": convert_snli_ve,
    "imagefolder": convert_imagefolder,
    "glue": convert_glue,
    "gigaword": convert_gigaword,
    "fashion-mnist": convert_fashion_mnist,
}

__all__ = ["SOURCES", "ConverterOption", "OutputError", "convert", "converter_options", "prepare"]

_COMMON = ("splits", "limit")  # every converter's keywords that are not its own options
_SPLIT_VALUE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)=(?P<value>.+)$")


class OutputError(RuntimeError):
    """The output corpus cannot be written (bad URI, not writable, already holds a corpus, I/O failure)."""


@dataclass(frozen=True)
class ConverterOption:
    """One keyword option of a converter, read from its signature.

    kind: "str", "int", "float", "bool", "choice" (a Literal: `choices`), "per_split" (Mapping[str, str]:
    SPLIT=PATH entries) or "path_or_per_split" (str | Mapping[str, str]: one path, or SPLIT=PATH entries).
    default: the converter's default (inspect.Parameter.empty when required).
    """

    name: str
    kind: str
    annotation: str
    default: Any
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def repeated(self) -> bool:
        """Given as several values (SPLIT=PATH entries)."""
        return self.kind in ("per_split", "path_or_per_split")

    def parse(self, values: Sequence[str]) -> Any:
        """The option's value from its command-line text(s); ValueError naming the option."""
        if not self.repeated:
            (text,) = values
            return self._scalar(text)
        if self.kind == "path_or_per_split" and len(values) == 1 and not _SPLIT_VALUE.match(values[0]):
            return values[0]
        out = {}
        for v in values:
            m = _SPLIT_VALUE.match(v)
            if not m:
                raise ValueError(f"option {self.name} takes SPLIT=PATH entries, got {v!r}")
            out[m["split"]] = m["value"]
        return out

    def _scalar(self, text: str) -> Any:
        try:
            if self.kind == "int":
                return int(text)
            if self.kind == "float":
                return float(text)
        except ValueError:
            raise ValueError(f"option {self.name} takes {self.annotation}, got {text!r}") from None
        if self.kind == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"option {self.name} takes true or false, got {text!r}")
            return text.lower() in ("true", "1", "yes")
        if self.kind == "choice" and text not in self.choices:
            raise ValueError(f"option {self.name} takes one of {', '.join(self.choices)}, got {text!r}")
        return text


def _option(param: inspect.Parameter, hint: Any) -> ConverterOption:
    """The ConverterOption of one keyword-only parameter; TypeError for an annotation the CLI cannot give."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:  # X | None: X
        rest = tuple(a for a in args if a is not type(None))
        hint = rest[0] if len(rest) == 1 else typing.Union[rest]  # noqa: UP007 -- built from a tuple
        args = typing.get_args(hint)
    text = inspect.formatannotation(param.annotation).replace("collections.abc.", "")
    mapping = typing.get_origin(hint) is Mapping
    if hint in (str, int, float, bool):
        return ConverterOption(param.name, hint.__name__, text, param.default)
    if typing.get_origin(hint) is Literal:
        return ConverterOption(param.name, "choice", text, param.default, tuple(args))
    if mapping and args == (str, str):
        return ConverterOption(param.name, "per_split", text, param.default)
    if set(args) == {str, Mapping[str, str]}:
        return ConverterOption(param.name, "path_or_per_split", text, param.default)
    raise TypeError(f"converter option {param.name!r}: annotation {text} has no command-line form")


def converter_options(source: str) -> dict[str, ConverterOption]:
    """The options of `source`'s converter (a key of SOURCES): its keyword-only parameters but splits and
    limit, in signature order."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: {sorted(SOURCES)}")
    converter = SOURCES[source]
    hints = typing.get_type_hints(converter)
    return {name: _option(p, hints[name]) for name, p in inspect.signature(converter).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _COMMON}


def convert(
    source: str, options: dict[str, Any], *, splits: Sequence[str] | None = None, limit: int | None = None
) -> Iterator[dict | BadRow]:
    """The rows of `source` (a key of SOURCES) with `options` checked against its converter's keywords."""
    accepted = converter_options(source)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}; accepted: {sorted(accepted)}")
    required = sorted(n for n, o in accepted.items() if o.required and n not in options)
    if required:
        raise ValueError(f"{source}: missing required option(s) {required}")
    return SOURCES[source](**options, splits=splits, limit=limit)


def prepare(
    source: str,
    options: dict[str, Any],
    output: str,
    *,
    splits: Sequence[str] | None = None,
    limit: int | None = None,
    shard_mb: float = 128,
    s3: S3Options | None = None,
    log_every_s: float = 10.0,
) -> dict[str, Any]:
    """Convert `source` with `options` into a canonical corpus at `output`; returns the summary.

    Summary: {source, output, rows_ok, rows_bad: {reason: n}, bad_examples: {reason: [≤5 ids]} (`RowStats`),
    counts: {split: {task: n}}, num_shards, fingerprint, seconds, rows_per_s}.
    Raises ValueError / FileNotFoundError for bad options or unreadable inputs, OutputError when the
    output cannot be written (nothing is left behind: the writer deletes its shards).
    """
    if shard_mb <= 0:
        raise ValueError(f"shard_mb must be positive, got {shard_mb}")
    rows = convert(source, options, splits=splits, limit=limit)
    try:
        writer = ShardWriter(output, shard_bytes=int(shard_mb * 2**20), s3=s3,
                             created_by=f"pipelines.data.converters.prepare({source})")
    except (OSError, ValueError) as e:
        raise OutputError(f"cannot write output {output!r}: {e}") from e
    logger.info("%s: converting into %s", source, output)
    stats, progress = RowStats(), Progress(source, None, log_every_s, unit="rows", logger=logger)
    with writer:
        for item in rows:
            if isinstance(item, BadRow):
                if item.reason not in stats.bad_by_reason:
                    logger.warning("%s: first bad row of reason %r: %s (%s; %s)", source, item.reason, item.id,
                                   item.detail, item.source)
                stats.add_bad(item.reason, item.id or item.source, None)
            else:
                try:
                    writer.write(item)
                except OSError as e:
                    raise OutputError(f"cannot write output {output!r}: {e}") from e
                stats.add_ok(item["task"])
            progress.update(stats.ok, extra={"bad": stats.bad})
        progress.update(stats.ok, extra={"bad": stats.bad}, force=True)
        try:
            manifest = writer.close()
        except OSError as e:
            raise OutputError(f"cannot write output {output!r}: {e}") from e
    seconds = progress.figures(stats.ok)["elapsed_s"]
    summary = {
        "source": source,
        "output": output,
        "rows_ok": stats.ok,
        "rows_bad": dict(sorted(stats.bad_by_reason.items())),
        "bad_examples": dict(sorted(stats.examples.items())),
        "counts": manifest.counts,
        "num_shards": len(manifest.shards),
        "fingerprint": manifest.fingerprint,
        "seconds": round(seconds, 3),
        "rows_per_s": round(stats.ok / seconds, 1),
    }
    logger.info("%s: done, %d rows ok, %d bad in %.1f s", source, stats.ok, stats.bad, seconds)
    return summary
