"""What a sweep shows: one summary per trial, a table best first, a plot of metric against epoch, and the trial
time early stopping saved."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune.search import format_value


@dataclass(frozen=True)
class TrialSummary:
    trial_id: str
    params: dict[str, Any]  # one value per space key
    curve: tuple[tuple[int, float], ...]  # (epoch, metric) per finished epoch, epoch from 1
    best: float  # the best metric over its epochs (nan: none finished)
    best_epoch: int  # 0: none
    epochs: int  # epochs run
    stopped_early: bool  # stopped by the scheduler before max_t
    error: str | None
    trial_time_s: float  # time of the trial's reported epochs, restarts included
    run_name: str
    mlflow_run_id: str | None = None


def rank(trials: Sequence[TrialSummary], mode: str) -> list[TrialSummary]:
    """Best first; trials without a finished epoch last; ties by trial id."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(trials, key=lambda t: (math.isnan(t.best), sign * t.best if not math.isnan(t.best) else 0.0,
                                         t.trial_id))


def savings(trials: Sequence[TrialSummary], max_t: int) -> tuple[float, float]:
    """(trial seconds spent, trial seconds had every trial run max_t epochs): a stopped trial's missing epochs
    are estimated at its own mean epoch time (worker start-up included)."""
    spent = sum(t.trial_time_s for t in trials)
    full = spent + sum(t.trial_time_s / t.epochs * (max_t - t.epochs) for t in trials if t.stopped_early and t.epochs)
    return spent, full


def table(trials: Sequence[TrialSummary], metric: str) -> str:
    """A fixed-width table, one trial a row, in the given order."""
    keys = sorted({k for t in trials for k in t.params})
    head = ["#", "trial", *keys, metric, "at epoch", "epochs", "stopped early", "minutes"]
    rows = []
    for i, t in enumerate(trials, 1):
        rows.append([str(i), t.trial_id, *(format_value(t.params.get(k, "")) for k in keys),
                     "-" if math.isnan(t.best) else f"{t.best:.4f}", str(t.best_epoch or "-"), str(t.epochs),
                     "error" if t.error else "yes" if t.stopped_early else "no", f"{t.trial_time_s / 60:.1f}"])
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_csv(trials: Sequence[TrialSummary], path: Path) -> None:
    keys = sorted({k for t in trials for k in t.params})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial", *keys, "best", "best_epoch", "epochs", "stopped_early", "error",
                    "trial_time_s", "curve", "mlflow_run_id"])
        for i, t in enumerate(trials, 1):
            w.writerow([i, t.trial_id, *(t.params.get(k, "") for k in keys), t.best, t.best_epoch, t.epochs,
                        t.stopped_early, t.error or "", round(t.trial_time_s, 1),
                        " ".join(f"{e}:{v:.6g}" for e, v in t.curve), t.mlflow_run_id or ""])


def plot(trials: Sequence[TrialSummary], metric: str, max_t: int, path: Path, title: str) -> None:
    """Metric against epoch, a line per trial (best trial thick; a cross where a trial was stopped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, t in enumerate(trials):
        if not t.curve:
            continue
        epochs, values = zip(*t.curve, strict=True)
        line, = ax.plot(epochs, values, marker="o", linewidth=2.5 if i == 0 else 1.2,
                        label=f"{t.trial_id}{' (best)' if i == 0 else ''}{' stopped' if t.stopped_early else ''}")
        if t.stopped_early:
            ax.plot([epochs[-1]], [values[-1]], marker="x", markersize=12, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_xticks(range(1, max_t + 1))
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best", ncol=2 if len(trials) > 8 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
