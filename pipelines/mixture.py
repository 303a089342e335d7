"""Weighted multi-task mixtures for pretraining: interleave several datasets row by row.

    it = iter_mixture_batches({"caption": ds_cap, "vqa": ds_vqa}, {"caption": 3, "vqa": 1}, vocab, 32, seed=0)
    for batch in it: ...            # collate() dicts; 3 caption rows for every vqa row, in a seeded order

Each source is a Dataset from `pipelines.dataset.build_dataset` or its DataIterator (in Ray Train, one
`get_dataset_shard(name)` per source). The schedule decides, slot by slot, which source gives the next good
row: in every block of `block` slots each source gets its weight's share (largest remainder, the rounding
carried to the next block, so any prefix of the stream is within one block of the exact proportions) and
the block is shuffled with a generator seeded by (seed, block number). Bad rows are counted per source and
never take a slot. The mixture ends after `num_rows` rows, or when the first source runs out.

Resume: `resume_state()` gives the slots used and each source's `ResumeState`; pass it back as `resume=`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.dataset import (
    BadDataError,
    EpochInfo,
    ProgressLog,
    ResumeState,
    RowStats,
    SampleStream,
    SeqSet,
    StreamRow,
    collate_rows,
    pad_id_of,
)


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


@dataclass(frozen=True)
class MixtureState:
    """Slots of the schedule used so far and each source's ResumeState (JSON via to_dict/from_dict)."""

    slots: int
    sources: dict[str, ResumeState]

    def to_dict(self) -> dict[str, Any]:
        return {"slots": self.slots, "sources": {n: s.to_dict() for n, s in sorted(self.sources.items())}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MixtureState:
        return cls(int(d["slots"]), {n: ResumeState.from_dict(s) for n, s in d["sources"].items()})


class MixtureIterator:
    """Batches of `collate` drawn from several sources by `weighted_schedule` (see iter_mixture_batches)."""

    def __init__(self, sources: Mapping[str, Any], weights: Mapping[str, float], pad_id: int, batch_size: int, *,
                 seed: int = 0, num_rows: int | None = None, infos: Mapping[str, EpochInfo] | None = None,
                 resume: MixtureState | None = None, with_meta: bool = False, drop_last: bool = False,
                 local_shuffle_buffer: int = 0, bad_row_threshold: float | None = 0.01,
                 early_check_rows: int = 1000, early_factor: float = 3.0, prefetch_batches: int = 1,
                 progress_every_s: float = 30.0, log_bad_rows: int = 20, block: int = 64) -> None:
        if set(sources) != set(weights):
            raise ValueError(f"sources {sorted(sources)} and weights {sorted(weights)} must name the same datasets")
        if batch_size < 1 or (num_rows is not None and num_rows < 1):
            raise ValueError(f"batch_size and num_rows must be >= 1, got {batch_size}, {num_rows}")
        _check_weights(weights)
        infos = dict(infos or {})
        self.weights = {n: w for n, w in weights.items() if w > 0}  # a 0-weight source is never read
        self.pad_id, self.batch_size, self.seed, self.block = pad_id, batch_size, seed, block
        self.num_rows, self.with_meta, self.drop_last = num_rows, with_meta, drop_last
        self.threshold, self.early_check_rows, self.early_factor = bad_row_threshold, early_check_rows, early_factor
        self.slots = resume.slots if resume is not None else 0
        self.infos = infos
        self.streams: dict[str, SampleStream] = {}
        for name in self.weights:
            state = resume.sources.get(name) if resume is not None else None
            if state is not None and name in infos:
                state.check(infos[name])
            epoch = infos[name].epoch if name in infos else (state.epoch if state is not None else 0)
            self.streams[name] = SampleStream(
                sources[name], fetch_rows=batch_size, local_shuffle_buffer=local_shuffle_buffer,
                local_shuffle_seed=seed + epoch if local_shuffle_buffer else None, prefetch_batches=prefetch_batches,
                skip=state.seqs() if state is not None else None,
                stats=state.row_stats() if state is not None else RowStats(),
                consumed=state.seqs() if state is not None else SeqSet(), log_bad_rows=log_bad_rows,
                on_bad=lambda n=name: self._check(n, early=True))
        self.rows = 0  # good rows delivered by this iterator (not counting a resumed part)
        self.progress = ProgressLog("mixture", num_rows, progress_every_s)

    @property
    def stats(self) -> dict[str, RowStats]:
        return {n: s.stats for n, s in self.streams.items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iters = {n: iter(s) for n, s in self.streams.items()}
        schedule = weighted_schedule(self.weights, self.seed, self.block)
        for _ in range(self.slots):
            next(schedule)
        pending: list[tuple[str, StreamRow]] = []
        used = self.slots
        limit = math.inf if self.num_rows is None else self.num_rows - self._resumed_ok()
        try:
            while self.rows + len(pending) < limit:
                name = next(schedule)
                row = next(iters[name], None)
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
            for it in iters.values():
                close = getattr(it, "close", None)
                if close is not None:
                    close()  # stops the Ray executors of sources that did not run out
        for name in self.streams:
            self._check(name, early=False)

    def _resumed_ok(self) -> int:
        return sum(s.stats.ok for s in self.streams.values()) - self.rows

    def _emit(self, pending: list[tuple[str, StreamRow]], used: int) -> dict[str, Any]:
        batch = collate_rows([r for _, r in pending], self.pad_id, self.with_meta)
        if self.with_meta:
            batch["sources"] = [n for n, _ in pending]
        for name, r in pending:
            stream = self.streams[name]
            stream.consumed.add(r.seq, r.seq + 1)
            stream.stats.add_ok(r.task)
        self.rows += len(pending)
        self.slots = used
        total = RowStats()
        for s in self.streams.values():
            total.merge(s.stats)
        self.progress.tick(total.ok, total.bad)
        return batch

    def _check(self, name: str, early: bool) -> None:
        s = self.streams[name].stats
        if self.threshold is None:
            return
        limit = min(1.0, self.early_factor * self.threshold) if early else self.threshold
        if (not early or s.rows >= self.early_check_rows) and s.bad_fraction > limit:
            raise BadDataError(s, self.threshold, early=early)

    def resume_state(self) -> MixtureState:
        sources = {}
        for name, stream in self.streams.items():
            info = self.infos.get(name)
            sources[name] = ResumeState(info.epoch if info else 0, info.key if info else None,
                                        tuple(stream.consumed.intervals()), stream.stats.to_dict())
        return MixtureState(self.slots, sources)


def iter_mixture_batches(sources: Mapping[str, Any], weights: Mapping[str, float], vocab: Any, batch_size: int,
                         **kwargs: Any) -> MixtureIterator:
    """Weighted row-level interleave of several `build_dataset` Datasets / DataIterators into collate batches.

    weights: relative, >= 0, per source name. Keywords: see MixtureIterator (seed, num_rows, infos, resume,
    with_meta (adds ids, tasks, seqs, image_sizes, sources), local_shuffle_buffer, bad_row_threshold, ...).
    """
    return MixtureIterator(sources, weights, pad_id_of(vocab), batch_size, **kwargs)
