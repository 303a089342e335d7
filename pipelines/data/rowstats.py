"""Row accounting: the one bad-row tally (`RowStats`, kept by the consumer, by `converters.prepare` and by each
part of `raw_convert`), the consumer's one bad-row rule (`BadRowRule`, failing with
`BadDataError`) and where an epoch stands (`ResumeState`; `MixtureState` for a weighted mixture).

Every row of an epoch is either good (delivered in a batch) or bad (counted by reason, with example ids).
`BadRowRule` decides when bad rows stop an epoch, the same way for a single corpus and for every source
of a mixture:

* at the end of a source's epoch (its stream ran out): when the bad fraction is over `threshold`;
* before the end, once `early_check_rows` rows were seen: only when the epoch can no longer stay under the
  threshold (bad rows > threshold x the epoch's rows, from its `EpochInfo`), or, when the epoch's size is
  unknown, when the bad fraction is over `early_factor` x threshold.

So one unreadable shard arriving first never fails an epoch that stays under the threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.data.source import EpochInfo, SeqSet

__all__ = ["BadDataError", "BadRowRule", "MixtureState", "ResumeState", "RowStats"]


@dataclass
class RowStats:
    """Counts of one reader of rows (a consumer, a conversion; or, merged, of several): good rows by task, bad
    rows by reason and by task ("?" when unknown), and up to `max_examples` example ids (shard URIs for
    unreadable shards) per reason."""

    ok: int = 0
    ok_by_task: dict[str, int] = field(default_factory=dict)
    bad_by_reason: dict[str, int] = field(default_factory=dict)
    bad_by_task: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    @property
    def bad(self) -> int:
        return sum(self.bad_by_reason.values())

    @property
    def rows(self) -> int:
        return self.ok + self.bad

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.rows if self.rows else 0.0

    def add_ok(self, task: str, n: int = 1) -> None:
        self.ok += n
        self.ok_by_task[task] = self.ok_by_task.get(task, 0) + n

    def add_bad(self, reason: str, example: str | None, task: str | None, n: int = 1) -> None:
        self.bad_by_reason[reason] = self.bad_by_reason.get(reason, 0) + n
        key = task or "?"
        self.bad_by_task[key] = self.bad_by_task.get(key, 0) + n
        examples = self.examples.setdefault(reason, [])
        if example is not None and len(examples) < self.max_examples and example not in examples:
            examples.append(example)

    def merge(self, other: RowStats) -> None:
        """Add `other`'s counts (rows of disjoint shares of one epoch, e.g. two training workers' parts)."""
        self.ok += other.ok
        for mine, theirs in ((self.ok_by_task, other.ok_by_task), (self.bad_by_reason, other.bad_by_reason),
                             (self.bad_by_task, other.bad_by_task)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n
        for reason, ids in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(i for i in ids if i not in mine and len(mine) < self.max_examples)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "bad": self.bad, "ok_by_task": dict(sorted(self.ok_by_task.items())),
                "bad_by_reason": dict(sorted(self.bad_by_reason.items())),
                "bad_by_task": dict(sorted(self.bad_by_task.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RowStats:
        return cls(ok=int(d["ok"]), ok_by_task=dict(d["ok_by_task"]), bad_by_reason=dict(d["bad_by_reason"]),
                   bad_by_task=dict(d["bad_by_task"]), examples={k: list(v) for k, v in d["examples"].items()})

    def describe(self) -> str:
        """One line: counts by reason with example ids."""
        parts = [f"{r} {n} (e.g. {', '.join(self.examples.get(r, [])[:3]) or '-'})"
                 for r, n in sorted(self.bad_by_reason.items(), key=lambda kv: -kv[1])]
        return "; ".join(parts) or "none"


class BadDataError(RuntimeError):
    """Too many rows of an epoch could not be used; `stats` holds the counts, `threshold` the limit."""

    def __init__(self, stats: RowStats, threshold: float, early: bool = False) -> None:
        self.stats = stats
        self.threshold = threshold
        when = f"after the first {stats.rows} rows" if early else "at the end of the epoch"
        super().__init__(
            f"{stats.bad} of {stats.rows} rows ({stats.bad_fraction:.2%}) were bad {when}, over "
            f"bad_row_threshold={threshold:.2%}; by reason: {stats.describe()}. Fix or drop those rows "
            "(python -m jobs.inspect_data lists them) or raise bad_row_threshold."
        )


@dataclass(frozen=True)
class BadRowRule:
    """When bad rows stop an epoch (see the module docstring). threshold None: never (the doctor)."""

    threshold: float | None = 0.01
    early_check_rows: int = 1000
    early_factor: float = 3.0

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"bad_row_threshold must be None or in [0, 1], got {self.threshold!r}")
        if self.early_check_rows < 1 or self.early_factor < 1.0:
            raise ValueError(f"early_check_rows must be >= 1 and early_factor >= 1, got "
                             f"{self.early_check_rows!r}, {self.early_factor!r}")

    def check(self, stats: RowStats, total_rows: int | None, *, finished: bool) -> None:
        """BadDataError when `stats` (an epoch of `total_rows` rows, None: unknown) break the rule; `finished`:
        the whole epoch was read (the end-of-epoch check), else the early check."""
        if self.threshold is None:
            return
        if finished:
            if stats.bad_fraction > self.threshold:
                raise BadDataError(stats, self.threshold)
            return
        if stats.rows < self.early_check_rows:
            return
        if total_rows:
            hopeless = stats.bad > self.threshold * total_rows
        else:
            hopeless = stats.bad_fraction > min(1.0, self.early_factor * self.threshold)
        if hopeless:
            raise BadDataError(stats, self.threshold, early=True)


@dataclass(frozen=True)
class ResumeState:
    """Where an epoch stands: rows consumed (as `seq` positions) and the counts so far. JSON-friendly via
    to_dict/from_dict, for checkpoints. `plan_key` ties it to one EpochPlan (corpus, selection, seed, epoch)."""

    epoch: int
    plan_key: str | None
    consumed: tuple[tuple[int, int], ...]
    stats: dict[str, Any]

    @property
    def rows_consumed(self) -> int:
        return sum(b - a for a, b in self.consumed)

    def seqs(self) -> SeqSet:
        return SeqSet(self.consumed)

    def row_stats(self) -> RowStats:
        return RowStats.from_dict(self.stats)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "plan_key": self.plan_key, "consumed": [list(iv) for iv in self.consumed],
                "stats": self.stats}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ResumeState:
        return cls(epoch=int(d["epoch"]), plan_key=d["plan_key"],
                   consumed=tuple((int(a), int(b)) for a, b in d["consumed"]), stats=dict(d["stats"]))

    @staticmethod
    def merge(states: Sequence[ResumeState]) -> ResumeState:
        """One state from the states of workers that consumed disjoint shares of the same epoch."""
        if not states:
            raise ValueError("ResumeState.merge needs at least one state")
        keys = {(s.epoch, s.plan_key) for s in states}
        if len(keys) != 1:
            raise ValueError(f"cannot merge resume states of different epochs/plans: {sorted(keys, key=str)}")
        seqs, stats = SeqSet(), RowStats()
        for s in states:
            seqs.update(s.seqs())
            stats.merge(s.row_stats())
        return ResumeState(states[0].epoch, states[0].plan_key, tuple(seqs.intervals()), stats.to_dict())

    def check(self, info: EpochInfo) -> None:
        """ValueError unless this state belongs to the epoch `info` describes."""
        if self.epoch != info.epoch or (self.plan_key is not None and self.plan_key != info.key):
            raise ValueError(
                f"resume state is for epoch {self.epoch} (plan {self.plan_key}), but this is epoch {info.epoch} "
                f"(plan {info.key}): the corpus, its selection or the seed changed"
            )


@dataclass(frozen=True)
class MixtureState:
    """Where a weighted mixture stands: schedule slots used so far and each source's ResumeState (JSON via
    to_dict/from_dict)."""

    slots: int
    sources: dict[str, ResumeState]

    def to_dict(self) -> dict[str, Any]:
        return {"slots": self.slots, "sources": {n: s.to_dict() for n, s in sorted(self.sources.items())}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MixtureState:
        return cls(int(d["slots"]), {n: ResumeState.from_dict(s) for n, s in d["sources"].items()})
