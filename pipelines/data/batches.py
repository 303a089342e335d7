"""Stage 3 of the ingest, the one batch consumer: preprocessed rows (`pipelines.data.ingest.build_dataset`) ->
training batches, for a single corpus and for a weighted mixture of corpora alike.

    it = iter_train_batches(ds, vocab, 32, info=plan.info)                     # one corpus
    it = iter_mixture_batches({"caption": ds_cap, "vqa": ds_vqa}, {"caption": 3, "vqa": 1}, vocab, 32,
                              infos={"caption": plan_cap.info, "vqa": plan_vqa.info})   # a mixture
    for batch in it: ...     # exactly what ofa_model.preprocess.collate returns
    it.stats                 # RowStats so far (a mixture: summed; it.stats_by_source per source)
    it.resume_state()        # save with a checkpoint; pass back as resume= to the same function

How it is built: a mixture composes single-corpus streams, and a single corpus is the mixture of one source.
`CorpusStream` holds everything one corpus needs: it reads a Ray DataIterator (or Dataset), takes the marker
rows out of the stream and counts them (`RowStats`, by reason and task, with example ids, logged), checks the
one bad-row rule (`pipelines.data.rowstats.BadRowRule`) after each, skips rows consumed before a resume (a marker
counts only its rows not consumed yet) and yields the good rows; it knows its epoch (`EpochInfo`) and gives its
`ResumeState`. `BatchIterator` draws rows from its streams slot by slot, collates them into batches
(`collate_rows`, where uint8 images become model inputs: `model_pixels`, once per batch), logs progress (rows,
rate, ETA) and, when the batches end, applies the rule's end-of-epoch check to every stream that was read to
its end. With one
stream every slot draws from it; with several a `weighted_schedule` decides.

Mixtures: in every block of `block` slots each source gets its weight's share (largest remainder, the rounding
carried to the next block, so any prefix of the stream is within one block of the exact proportions) and the
block is shuffled with a generator seeded by (seed, block number). Bad rows are counted per source and never
take a slot. A mixture ends after `num_rows` good rows, or when the first source runs out; a source that was
not read to its end gets the early check only.

Resume within an epoch: every consumed row's `seq` (good rows delivered in a batch, bad rows counted) is kept
per corpus in a `SeqSet` of intervals. Pass a single corpus's `ResumeState` back to
`build_dataset(resume=...)` (the source skips those rows) and/or to `iter_train_batches` (it skips them too,
so a dataset built before the state was known also works). The row numbering does not depend on execution
order, so this is exact with parallel reads, `preserve_order=False`, local shuffling and several workers each
reading its part of the epoch alike; states of several workers combine with `ResumeState.merge`. A mixture's
`MixtureState` holds the slots used and each source's ResumeState.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ofa_model.preprocess import PreprocessConfig, blank_centre, collate, model_pixels
from pipelines.data.data_config import DataConfig
from pipelines.data.rowstats import BadRowRule, MixtureState, ResumeState, RowStats
from pipelines.data.source import EpochInfo, SeqSet
from pipelines.progress import Progress

__all__ = [
    "BatchIterator", "ConsumerOptions", "CorpusStream", "iter_mixture_batches", "iter_train_batches",
    "weighted_schedule",
]  # fmt: skip

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsumerOptions:
    """How the consumer reads every corpus of an epoch: the bad-row rule, the local shuffle (buffer rows, seed:
    plus the epoch), blocks fetched ahead, bad rows logged at WARNING per reason, seconds between progress
    lines. `of(cfg)` takes them from a DataConfig."""

    rule: BadRowRule = BadRowRule()
    local_shuffle_buffer: int = 0
    seed: int = 0
    prefetch_batches: int = 1
    log_bad_rows: int = 20
    progress_every_s: float = 30.0

    @classmethod
    def of(cls, cfg: DataConfig) -> ConsumerOptions:
        return cls(BadRowRule(cfg.bad_row_threshold, cfg.early_check_rows, cfg.early_factor),
                   cfg.local_shuffle_buffer, cfg.seed, cfg.prefetch_batches, cfg.log_bad_rows, cfg.progress_every_s)

    def without_rule(self) -> ConsumerOptions:
        """These options with a rule that never fails (the caller applies the rule itself, e.g. across workers)."""
        return dataclasses.replace(self, rule=BadRowRule(None, self.rule.early_check_rows, self.rule.early_factor))


@dataclass
class StreamRow:
    """A good row of a corpus: its position in the epoch, id, task and the sample `collate` takes."""

    seq: int
    id: str
    task: str
    sample: dict


class CorpusStream:
    """The good rows of one corpus's DataIterator (or Dataset), in stream order, with its bad-row accounting.

    `stats` and `consumed` start from `resume` (rows counted before are skipped, not counted twice). Rows
    become consumed when counted (bad) or when the batch consumer `take`s them (good). `finished`: the stream
    was read to its end.
    """

    def __init__(self, data: Any, *, name: str = "", info: EpochInfo | None = None, resume: ResumeState | None = None,
                 options: ConsumerOptions | None = None, fetch_rows: int = 32) -> None:
        if resume is not None and info is not None:
            resume.check(info)
        options = options if options is not None else ConsumerOptions()
        self.data = data
        self.name = name
        self.info = info
        self.epoch = info.epoch if info is not None else (resume.epoch if resume is not None else 0)
        self.rule = options.rule
        self.fetch_rows = fetch_rows
        self.local_shuffle_buffer = options.local_shuffle_buffer
        self.local_shuffle_seed = options.seed + self.epoch if options.local_shuffle_buffer else None
        self.prefetch_batches = options.prefetch_batches
        self.log_bad_rows = options.log_bad_rows
        self.skip = resume.seqs() if resume is not None else SeqSet()
        self.consumed = resume.seqs() if resume is not None else SeqSet()
        self.stats = resume.row_stats() if resume is not None else RowStats()
        self.finished = False
        self._logged: dict[str, int] = {}

    @property
    def label(self) -> str:
        return f"epoch {self.epoch}" + (f" of {self.name}" if self.name else "")

    @property
    def total_rows(self) -> int | None:
        return self.info.total_rows if self.info is not None else None

    def __iter__(self) -> Iterator[StreamRow]:
        kwargs = {"batch_size": self.fetch_rows, "batch_format": "pyarrow", "prefetch_batches": self.prefetch_batches}
        if self.local_shuffle_buffer:
            kwargs.update(local_shuffle_buffer_size=self.local_shuffle_buffer,
                          local_shuffle_seed=self.local_shuffle_seed)
        for table in self.data.iter_batches(**kwargs):
            yield from self._rows(table)
        self.finished = True

    def take(self, row: StreamRow) -> None:
        """Record a good row as delivered in a batch."""
        self.consumed.add(row.seq, row.seq + 1)
        self.stats.add_ok(row.task)

    def finish(self) -> None:
        """After the last batch: the end-of-epoch check when the stream was read to its end, else the early one."""
        self.rule.check(self.stats, self.total_rows, finished=self.finished)
        if self.stats.bad:
            logger.info("%s: %d good rows, %d bad rows: %s", self.label, self.stats.ok, self.stats.bad,
                        self.stats.describe())

    def resume_state(self) -> ResumeState:
        """Rows consumed so far (good rows delivered in batches, bad rows counted) and the counts."""
        return ResumeState(self.epoch, self.info.key if self.info is not None else None,
                           tuple(self.consumed.intervals()), self.stats.to_dict())

    def _rows(self, table: pa.Table) -> Iterator[StreamRow]:
        cols = {n: table.column(n).to_pylist() for n in ("id", "task", "seq", "span", "ok", "reason", "detail")}
        images = _images(table.column("image"))
        lists = {n: table.column(n).to_pylist() for n in ("source", "prev_output", "target", "target_weight",
                                                          "code_mask", "image_width", "image_height",
                                                          "image_blank", "image_norm")}
        for i in range(table.num_rows):
            seq, span = cols["seq"][i], cols["span"][i]
            if not cols["ok"][i]:  # a marker may stand for many rows: count only those not consumed before
                for a, b in self.skip.gaps(seq, seq + span):
                    self._bad(cols["reason"][i], cols["id"][i], cols["task"][i], cols["detail"][i], b - a)
                    self.consumed.add(a, b)
                    self.rule.check(self.stats, self.total_rows, finished=False)
                continue
            if seq in self.skip:
                continue
            width, height = lists["image_width"][i], lists["image_height"][i]
            image, norm = images[i], None
            if image is not None and image.dtype == torch.uint8:  # normalised per batch, in collate_rows
                norm = _norm_key(lists["image_norm"][i], cols["id"][i])
            sample = {"id": cols["id"][i], "source": lists["source"][i], "prev_output": lists["prev_output"][i],
                      "target": lists["target"][i], "image": image, "image_norm": norm,
                      "image_blank": bool(norm is not None and lists["image_blank"][i]),
                      "target_weight": lists["target_weight"][i], "code_mask": lists["code_mask"][i],
                      "image_size": None if width is None else (width, height)}
            yield StreamRow(seq, cols["id"][i], cols["task"][i], sample)

    def _bad(self, reason: str, row_id: str | None, task: str | None, detail: str | None, span: int) -> None:
        example = row_id if row_id is not None else (detail or "").split(": ", 1)[0]
        self.stats.add_bad(reason, example, task, span)
        n = self._logged.get(reason, 0)
        self._logged[reason] = n + 1
        level = logging.WARNING if n < self.log_bad_rows else logging.DEBUG
        logger.log(level, "bad row %s (%s, %d row%s): %s", row_id or "-", reason, span, "s" * (span != 1), detail)


def _started(rows: Mapping[str, Iterator[StreamRow]]) -> dict[str, Iterator[StreamRow]]:
    """The streams with their first rows fetched side by side (threads), so that a mixture's Ray Data
    executions (one per source: a SplitCoordinator and its preprocessing actors, several seconds to start) start
    together rather than one after another as the schedule first reaches each source."""
    with concurrent.futures.ThreadPoolExecutor(len(rows), thread_name_prefix="start-stream") as pool:
        firsts = dict(zip(rows, pool.map(lambda it: next(it, None), rows.values()), strict=True))
    return {n: itertools.chain(() if firsts[n] is None else (firsts[n],), it) for n, it in rows.items()}


class BatchIterator:
    """Batches of `collate` drawn from one or more CorpusStreams (build it with `iter_train_batches` or
    `iter_mixture_batches`).

    weights None: a single corpus (exactly one stream), else the mixture's weights by stream name. Iterate once
    per epoch. `stats` holds the counts so far (including those of a resumed part), `resume_state()` the state
    to save with a checkpoint.
    """

    def __init__(self, streams: Sequence[CorpusStream], pad_id: int, batch_size: int, *,
                 weights: Mapping[str, float] | None = None, seed: int = 0, block: int = 64,
                 num_rows: int | None = None, slots: int = 0, with_meta: bool = False, drop_last: bool = False,
                 progress_every_s: float = 30.0) -> None:
        if batch_size < 1 or (num_rows is not None and num_rows < 1):
            raise ValueError(f"batch_size and num_rows must be >= 1, got {batch_size}, {num_rows}")
        if weights is None and len(streams) != 1:
            raise ValueError(f"a single corpus is one stream, got {len(streams)}; give weights for a mixture")
        self.streams = {s.name: s for s in streams}
        if len(self.streams) != len(streams):
            raise ValueError(f"stream names must differ, got {[s.name for s in streams]}")
        self.mixture = weights is not None
        self.weights = dict(weights) if weights is not None else None
        self.pad_id, self.batch_size, self.seed, self.block = pad_id, batch_size, seed, block
        self.num_rows, self.with_meta, self.drop_last = num_rows, with_meta, drop_last
        self.slots = slots
        self.rows = 0  # good rows delivered by this iterator (not counting a resumed part)
        self._resumed_ok = sum(s.stats.ok for s in streams)
        only = streams[0] if not self.mixture else None
        total = num_rows if num_rows is not None else (only.total_rows if only is not None else None)
        self.progress = ProgressLog(only.label if only is not None else "mixture", total, progress_every_s,
                                    start=self._progress_done())

    @property
    def stats(self) -> RowStats:
        """The counts so far: of the corpus, or summed over a mixture's sources."""
        if not self.mixture:
            return next(iter(self.streams.values())).stats
        total = RowStats()
        for s in self.streams.values():
            total.merge(s.stats)
        return total

    @property
    def stats_by_source(self) -> dict[str, RowStats]:
        return {n: s.stats for n, s in self.streams.items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        gens = {n: iter(s) for n, s in self.streams.items()}
        schedule = self._schedule()
        pending: list[tuple[str, StreamRow]] = []
        used = self.slots
        limit = math.inf if self.num_rows is None else self.num_rows - self._resumed_ok
        try:
            rows = _started(gens) if self.mixture else gens
            while self.rows + len(pending) < limit:
                name = next(schedule)
                row = next(rows[name], None)
                if row is None:
                    break
                pending.append((name, row))
                used += 1
                if len(pending) == self.batch_size:
                    yield self._emit(pending, used)
                    pending = []
            if pending and not self.drop_last:
                yield self._emit(pending, used)
        finally:
            for it in gens.values():
                it.close()  # stops the Ray executors of streams that did not run out
        self.progress.tick(self._progress_done(), self.stats.bad, force=True)
        for stream in self.streams.values():
            stream.finish()

    def resume_state(self) -> ResumeState | MixtureState:
        """What `resume=` of the function that built this iterator takes: a single corpus's ResumeState, or a
        mixture's MixtureState (slots used and each source's ResumeState)."""
        if not self.mixture:
            return next(iter(self.streams.values())).resume_state()
        return MixtureState(self.slots, {n: s.resume_state() for n, s in self.streams.items()})

    def _schedule(self) -> Iterator[str]:
        if not self.mixture:
            return itertools.repeat(next(iter(self.streams)))
        schedule = weighted_schedule(self.weights, self.seed, self.block)
        for _ in range(self.slots):  # the slots a resumed mixture used before
            next(schedule)
        return schedule

    def _emit(self, pending: list[tuple[str, StreamRow]], used: int) -> dict[str, Any]:
        batch = collate_rows([r for _, r in pending], self.pad_id, self.with_meta)
        if self.with_meta and self.mixture:
            batch["sources"] = [n for n, _ in pending]
        for name, r in pending:
            self.streams[name].take(r)
        self.rows += len(pending)
        self.slots = used
        self.progress.tick(self._progress_done(), self.stats.bad)
        return batch

    def _progress_done(self) -> int:
        """Progress in the unit of the end: good rows of num_rows, else rows seen (good and bad)."""
        if self.num_rows is not None:
            return self._resumed_ok + self.rows
        return sum(s.stats.rows for s in self.streams.values())


def iter_train_batches(data: Any, vocab: Any, batch_size: int, *, info: EpochInfo | None = None,
                       resume: ResumeState | None = None, options: ConsumerOptions | None = None,
                       **batching: Any) -> BatchIterator:
    """Batches of `collate` (src_tokens, src_lengths, patch_images, patch_masks, prev_output_tokens, target,
    target_weights, code_masks, ntokens) from one corpus: a Ray DataIterator (e.g.
    `ray.train.get_dataset_shard`) or a Dataset built by `build_dataset`. `vocab`: a Vocabulary or the pad id.

    info: the epoch's `EpochInfo` (plan.info): checks `resume`, names the state, and lets the early bad-row
    check know the epoch's size. resume: a ResumeState from `resume_state()`. options: `ConsumerOptions`
    (default: its defaults; `ConsumerOptions.of(cfg)` for a DataConfig's). Batching keywords (see
    BatchIterator): with_meta (adds ids, tasks, seqs, image_sizes), drop_last, num_rows.
    """
    options = options if options is not None else ConsumerOptions()
    stream = CorpusStream(data, info=info, resume=resume, options=options, fetch_rows=batch_size)
    return BatchIterator([stream], pad_id_of(vocab), batch_size, seed=options.seed,
                         progress_every_s=options.progress_every_s, **batching)


def iter_mixture_batches(sources: Mapping[str, Any], weights: Mapping[str, float], vocab: Any, batch_size: int, *,
                         infos: Mapping[str, EpochInfo] | None = None, resume: MixtureState | None = None,
                         options: ConsumerOptions | None = None, block: int = 64, **batching: Any) -> BatchIterator:
    """Weighted row-level interleave of several corpora (`build_dataset` Datasets or DataIterators; in Ray
    Train one `get_dataset_shard(name)` each) into `collate` batches, in a seeded order.

    weights: relative, >= 0, per source name (a 0-weight source is never read). infos: each source's EpochInfo.
    resume: a MixtureState from `resume_state()`. options: as in `iter_train_batches`, for every source alone;
    its seed also seeds the schedule. block: schedule block size. Batching keywords: with_meta (adds ids, tasks,
    seqs, image_sizes, sources), drop_last, num_rows.
    """
    if set(sources) != set(weights):
        raise ValueError(f"sources {sorted(sources)} and weights {sorted(weights)} must name the same datasets")
    _check_weights(weights)
    infos = dict(infos or {})
    options = options if options is not None else ConsumerOptions()
    streams = [
        CorpusStream(sources[name], name=name, info=infos.get(name),
                     resume=resume.sources.get(name) if resume is not None else None, options=options,
                     fetch_rows=batch_size)
        for name in sorted(weights) if weights[name] > 0
    ]
    return BatchIterator(streams, pad_id_of(vocab), batch_size, weights={s.name: weights[s.name] for s in streams},
                         seed=options.seed, block=block, slots=resume.slots if resume is not None else 0,
                         progress_every_s=options.progress_every_s, **batching)


def pad_id_of(vocab: Any) -> int:
    """The pad id of a Vocabulary, or `vocab` itself when it is already an int."""
    return vocab if isinstance(vocab, int) else vocab.pad_id


def weighted_schedule(weights: Mapping[str, float], seed: int, block: int = 64) -> Iterator[str]:
    """Endless source names in proportion to `weights` (see the module docstring); deterministic in `seed`."""
    _check_weights(weights)
    names = sorted(weights)
    w = np.array([float(weights[n]) for n in names])
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    share = w / w.sum() * block
    credit = np.zeros(len(names))
    for k in range(2**62):
        credit += share
        counts = np.floor(credit).astype(int)
        extra = block - counts.sum()
        if extra > 0:  # largest remainders first, ties by name order
            counts[np.argsort(-(credit - counts), kind="stable")[:extra]] += 1
        elif extra < 0:  # float rounding can overshoot by one
            counts[np.argsort(credit - counts, kind="stable")[:-extra]] -= 1
        credit -= counts
        order = np.repeat(np.arange(len(names)), counts)
        np.random.default_rng([seed, k]).shuffle(order)
        for i in order:
            yield names[i]


def _check_weights(weights: Mapping[str, float]) -> None:
    values = list(weights.values())
    ok = all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in values)
    if not values or not ok or sum(values) <= 0:
        raise ValueError(f"mixture weights must be finite numbers >= 0, not all 0, got {dict(weights)}")


def _norm_key(norm: list[float] | None, row_id: str | None) -> tuple[float, ...]:
    if norm is None or len(norm) != 6:
        raise ValueError(f"row {row_id}: a uint8 image needs image_norm (mean and std, 6 values), got {norm!r}")
    return tuple(norm)


def _normalized(pixels: torch.Tensor, norm: tuple[float, ...], blank: bool) -> torch.Tensor:
    """`model_pixels` under the mean and std the actors shipped (only those matter to it)."""
    return model_pixels(pixels, PreprocessConfig(mean=norm[:3], std=norm[3:]), blank=blank)


def collate_rows(rows: Sequence[StreamRow], pad_id: int, with_meta: bool = False) -> dict[str, Any]:
    """`collate` of the rows' samples, uint8 images made model inputs (`model_pixels`);
    with_meta adds lists ids, tasks, seqs and image_sizes ((w, h) or None).

    When every image is uint8 under one mean and std (one corpus's rows, the usual case), the bytes are stacked
    and normalised once per batch: a quarter of the memory traffic of stacking float32 images normalised one by
    one, which took a third of a core in the consumer at 480x480 (the values are the same: normalisation is
    elementwise). Otherwise each row is normalised on its own."""
    samples = [r.sample for r in rows]
    norms = {s.get("image_norm") for s in samples if s.get("image") is not None}
    if len(norms) == 1 and None not in norms:
        batch = collate(samples, pad_id)
        images = _normalized(batch["patch_images"], norms.pop(), blank=False)
        images[~batch["patch_masks"]] = 0  # rows without an image: zeros, as collate gives them
        for i, s in enumerate(samples):
            if s.get("image_blank"):
                blank_centre(images[i])
        batch["patch_images"] = images
    else:
        batch = collate([{**s, "image": _normalized(s["image"], s["image_norm"], s.get("image_blank", False))}
                         if s.get("image_norm") is not None else s for s in samples], pad_id)
    if with_meta:
        batch["ids"] = [r.id for r in rows]
        batch["tasks"] = [r.task for r in rows]
        batch["seqs"] = [r.seq for r in rows]
        batch["image_sizes"] = [r.sample["image_size"] for r in rows]
    return batch


def _images(col: pa.ChunkedArray | pa.Array) -> list[torch.Tensor | None]:
    """Per-row (3, S, S) tensors (None for null) from a flattened large_list column, without copying.

    The tensors view the Arrow buffers (read-only, e.g. in Ray's object store); `collate` only reads them
    (torch.stack copies into the batch), so torch's one-time "not writable" warning is silenced here.
    """
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    out: list[torch.Tensor | None] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for chunk in chunks:
            if len(chunk) == 0:
                continue
            valid = chunk.is_valid().to_numpy(zero_copy_only=False)
            offsets = chunk.offsets.to_numpy()  # absolute positions in chunk.values (which ignores slicing)
            values = chunk.values.to_numpy(zero_copy_only=False)
            for i in range(len(chunk)):
                if not valid[i]:
                    out.append(None)
                    continue
                flat = values[offsets[i] : offsets[i + 1]]
                side = math.isqrt(flat.size // 3)
                if 3 * side * side != flat.size:
                    raise ValueError(f"image row {len(out)} has {flat.size} values, not 3 * S * S")
                out.append(torch.from_numpy(flat.reshape(3, side, side)))
    return out


class ProgressLog:
    """Rows delivered of the epoch's total, rate and ETA every `every_s` seconds, with the bad rows so far
    (`pipelines.progress.Progress`); the rate counts from `start`."""

    def __init__(self, label: str, total: int | None, every_s: float, start: int = 0) -> None:
        self.progress = Progress(label, total, every_s, unit="rows", start=start, logger=logger)

    def tick(self, done: int, bad: int, force: bool = False) -> None:
        self.progress.update(done, extra={"bad": bad}, force=force)
