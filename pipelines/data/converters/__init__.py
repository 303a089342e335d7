"""Converters from public dataset layouts to the canonical corpus (`pipelines.data.schema`), and `prepare`.

Each converter is a generator function of keyword options plus `splits` and `limit`; it yields
canonical rows (dicts keyed by `pipelines.data.schema.FIELDS`) and `pipelines.data.readers.BadRow` records for
broken input, and never stops at a broken record. `prepare` streams one converter into a
`pipelines.data.shards.ShardWriter` and returns a summary of what was written and what was rejected.
"""

import inspect
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pipelines.data.converters.coco import convert_coco
from pipelines.data.converters.easyvqa import convert_easy_vqa
from pipelines.data.converters.fashion_mnist import convert_fashion_mnist
from pipelines.data.converters.gigaword import convert_gigaword
from pipelines.data.converters.glue import convert_glue
from pipelines.data.converters.imagefolder import convert_imagefolder
from pipelines.data.converters.refcoco import convert_refcoco
from pipelines.data.converters.snli_ve import convert_snli_ve
from pipelines.data.converters.vqav2 import convert_vqav2
from pipelines.data.readers import BadRow
from pipelines.data.shards import ShardWriter
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

MAX_BAD_EXAMPLES = 5  # ids kept per bad-row reason in the summary

__all__ = ["SOURCES", "OutputError", "convert", "prepare"]


class OutputError(RuntimeError):
    """The output corpus cannot be written (bad URI, not writable, already holds a corpus, I/O failure)."""


def convert(
    source: str, options: dict[str, Any], *, splits: Sequence[str] | None = None, limit: int | None = None
) -> Iterator[dict | BadRow]:
    """The rows of `source` (a key of SOURCES) with `options` checked against its converter's keywords."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; known: {sorted(SOURCES)}")
    converter = SOURCES[source]
    params = inspect.signature(converter).parameters
    accepted = set(params) - {"splits", "limit"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}; accepted: {sorted(accepted)}")
    required = sorted(n for n in accepted if params[n].default is inspect.Parameter.empty and n not in options)
    if required:
        raise ValueError(f"{source}: missing required option(s) {required}")
    return converter(**options, splits=splits, limit=limit)


class _Tally:
    """Running counts of good rows by (split, task) and bad rows by reason, with progress logging."""

    def __init__(self, source: str, log_every_s: float):
        self.source, self.log_every_s = source, log_every_s
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.rows_ok = 0
        self.bad: Counter = Counter()
        self.bad_examples: dict[str, list[str]] = defaultdict(list)
        self.start = self.last_log = time.monotonic()

    def ok(self, row: dict) -> None:
        self.rows_ok += 1
        self.counts[row["split"]][row["task"]] += 1
        self._maybe_log()

    def reject(self, bad: BadRow) -> None:
        if not self.bad[bad.reason]:
            logger.warning("%s: first bad row of reason %r: %s (%s; %s)", self.source, bad.reason, bad.id,
                           bad.detail, bad.source)
        self.bad[bad.reason] += 1
        if len(self.bad_examples[bad.reason]) < MAX_BAD_EXAMPLES:
            self.bad_examples[bad.reason].append(bad.id)
        self._maybe_log()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self.last_log >= self.log_every_s:
            self.last_log = now
            logger.info("%s: %d rows written, %d bad, %.1f rows/s", self.source, self.rows_ok,
                        sum(self.bad.values()), self.rows_ok / max(self.elapsed(), 1e-9))


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

    Summary: {source, output, rows_ok, rows_bad: {reason: n}, bad_examples: {reason: [≤5 ids]},
    counts: {split: {task: n}}, num_shards, fingerprint, seconds, rows_per_s}.
    Raises ValueError / FileNotFoundError for bad options or unreadable inputs, OutputError when the
    output cannot be written (nothing is left behind: the writer deletes its shards).
    """
    if shard_mb <= 0:
        raise ValueError(f"shard_mb must be positive, got {shard_mb}")
    rows = convert(source, options, splits=splits, limit=limit)
    tally = _Tally(source, log_every_s)
    try:
        writer = ShardWriter(output, shard_bytes=int(shard_mb * 2**20), s3=s3,
                             created_by=f"pipelines.data.converters.prepare({source})")
    except (OSError, ValueError) as e:
        raise OutputError(f"cannot write output {output!r}: {e}") from e
    logger.info("%s: converting into %s", source, output)
    with writer:
        for item in rows:
            if isinstance(item, BadRow):
                tally.reject(item)
                continue
            try:
                writer.write(item)
            except OSError as e:
                raise OutputError(f"cannot write output {output!r}: {e}") from e
            tally.ok(item)
        try:
            manifest = writer.close()
        except OSError as e:
            raise OutputError(f"cannot write output {output!r}: {e}") from e
    seconds = tally.elapsed()
    summary = {
        "source": source,
        "output": output,
        "rows_ok": tally.rows_ok,
        "rows_bad": dict(sorted(tally.bad.items())),
        "bad_examples": {reason: ids for reason, ids in sorted(tally.bad_examples.items())},
        "counts": {split: dict(sorted(c.items())) for split, c in sorted(tally.counts.items())},
        "num_shards": len(manifest.shards),
        "fingerprint": manifest.fingerprint,
        "seconds": round(seconds, 3),
        "rows_per_s": round(tally.rows_ok / max(seconds, 1e-9), 1),
    }
    logger.info("%s: done, %d rows ok, %d bad in %.1f s", source, tally.rows_ok, sum(tally.bad.values()), seconds)
    return summary
