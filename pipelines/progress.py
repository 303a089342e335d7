"""Progress lines for long loops: done of total, rate, ETA, at most one line every `every_s` seconds.

    progress = Progress("coco", total=None, every_s=10.0, unit="rows")
    for n, row in enumerate(rows, 1):
        progress.update(n, extra={"bad": bad})        # logs "coco: 1200 rows, 1200 bad, 85.0 rows/s"
    progress.update(n, extra={"bad": bad}, force=True)  # the last line, whenever it comes

The rate counts from `start` (work done before this run, e.g. a resumed epoch, does not speed it up) and
the ETA is what is left at that rate. `on_report` receives the same figures as a dict of floats each time
a line is due, so a caller can also record them (MLflow metrics, a Ray Train report). Pure Python and
logging: every layer above `ofa_model` may use it.

Where the lines go is decided here, once for every command: when `stream` (default stderr) is a terminal, one
line with a bar is redrawn in place (`\r`) at most every `REDRAW_S`, and only the forced lines (a loop's last)
are logged, after the bar is wiped; otherwise (CI, `ray job logs`, a file, Ray workers) every line is logged.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

_log = logging.getLogger(__name__)

REDRAW_S = 0.2  # seconds between two redraws of a terminal's bar
BAR_WIDTH = 20  # characters of the bar between its brackets


def is_terminal(stream: TextIO) -> bool:
    """Whether progress on `stream` is a bar redrawn in place (a terminal) or periodic log lines."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def duration(seconds: float | None) -> str:
    """"1h02m03s", "2m03s" or "?" (None, inf or nan)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _percent(done: float, total: float) -> str:
    return f"{100 * done / total:.1f}".removesuffix(".0")


def _rate(per_s: float) -> str:
    return f"{per_s:.2f}" if abs(per_s) < 10 else f"{per_s:.1f}"


class Progress:
    """Logs `label: done/total unit (pct%), <extra>, rate unit/s, ETA ...` at most every `every_s` seconds.

    total: None when unknown (no percentage, no ETA). start: units already done before this run (not in the
    rate). extra_rates: extra field -> unit, for extra fields whose rate per second is shown too (e.g.
    {"rows ok": "rows"} beside files). logger: where lines go (default this module's). on_report: called
    with the figures of every line that is due (logged or not). stream: where a terminal's bar is drawn
    (default sys.stderr; not a terminal: no bar, every line logged). clock: seconds, monotonic (tests pass a
    fake one).
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        every_s: float,
        *,
        unit: str = "rows",
        start: int = 0,
        extra_rates: Mapping[str, str] | None = None,
        logger: logging.Logger | None = None,
        on_report: Callable[[dict[str, float]], None] | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every_s < 0:
            raise ValueError(f"every_s must be >= 0, got {every_s}")
        self.label, self.total, self.every_s, self.unit, self.start = label, total, every_s, unit, start
        self.extra_rates = dict(extra_rates or {})
        self.logger = logger or _log
        self.on_report = on_report
        self.stream = sys.stderr if stream is None else stream
        self.bar = is_terminal(self.stream)
        self.clock = clock
        self.t0 = self.last = clock()
        self.drawn_at, self.drawn_width = -math.inf, 0  # the bar on the terminal: when, and how wide

    def figures(self, done: int, extra: Mapping[str, float] | None = None) -> dict[str, float]:
        """done, elapsed_s, rate (units/s since start), total, percent and eta_s when total is known
        (eta_s inf while the rate is 0), the extra fields, and `<unit>_per_s` for each of extra_rates."""
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = (done - self.start) / elapsed
        out: dict[str, float] = {"done": done, "elapsed_s": elapsed, "rate": rate}
        if self.total:
            out.update(total=self.total, percent=100 * done / self.total,
                       eta_s=(self.total - done) / rate if rate > 0 else math.inf)
        for name, value in (extra or {}).items():
            out[name] = value
            if name in self.extra_rates:
                out[f"{self.extra_rates[name]}_per_s"] = value / elapsed
        return out

    def update(self, done: int, *, extra: Mapping[str, float] | None = None, force: bool = False
               ) -> dict[str, float] | None:
        """A line (and on_report) when `every_s` passed since the last one or `force`: logged, or on a terminal
        the bar redrawn (the forced line logged after the bar is wiped); returns the figures of a line that was
        due, else None. On a terminal the bar is also redrawn in between, at most every REDRAW_S."""
        now = self.clock()
        due = force or now - self.last >= self.every_s
        if self.bar and (force or now - self.drawn_at >= REDRAW_S):
            self.drawn_at = now
            if force:
                self._wipe()
            else:
                figures = self.figures(done, extra)
                self._draw(self._bar(figures) + self._line(figures, extra or {}).removeprefix(self.label + ": "))
        if not due:
            return None
        self.last = now
        figures = self.figures(done, extra)
        if force or not self.bar:
            self.logger.info("%s", self._line(figures, extra or {}))
        if self.on_report is not None:
            self.on_report(figures)
        return figures

    def close(self) -> None:
        """Wipes a terminal's bar (a loop that ends without a forced line); nothing otherwise."""
        self._wipe()

    def _draw(self, text: str) -> None:
        self.stream.write("\r" + text.ljust(self.drawn_width))
        self.stream.flush()
        self.drawn_width = len(text)

    def _wipe(self) -> None:
        if self.drawn_width:
            self.stream.write("\r" + " " * self.drawn_width + "\r")
            self.stream.flush()
            self.drawn_width = 0

    def _bar(self, figures: Mapping[str, float]) -> str:
        if not self.total:
            return f"{self.label}: "
        filled = min(BAR_WIDTH, int(BAR_WIDTH * figures["done"] / self.total))
        return f"{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "

    def _line(self, figures: Mapping[str, float], extra: Mapping[str, float]) -> str:
        done = figures["done"]
        parts = [f"{done}/{self.total} {self.unit} ({_percent(done, self.total)}%)" if self.total
                 else f"{done} {self.unit}"]
        parts += [f"{value} {name}" for name, value in extra.items()]
        parts += [f"{_rate(figures[f'{u}_per_s'])} {u}/s" for name, u in self.extra_rates.items() if name in extra]
        parts.append(f"{_rate(figures['rate'])} {self.unit}/s")
        if self.total:
            parts.append(f"ETA {duration(figures['eta_s'])}")
        return f"{self.label}: " + ", ".join(parts)
