"""pipelines.progress: rate, ETA and the line, at most every every_s seconds, from a fake clock."""

from __future__ import annotations

import io
import logging
import math

import pytest

from pipelines.progress import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_eta_and_line_at_most_every_every_s(caplog):
    caplog.set_level(logging.INFO, logger="pipelines.progress")
    clock, seen = Clock(), []
    progress = Progress("coco", 1000, 10.0, start=100, on_report=seen.append, clock=clock)
    clock.now += 5
    assert progress.update(200, extra={"bad": 3}) is None  # 5 s < every_s
    clock.now += 15  # 20 s after the start: 200 rows since start=100 -> 10 rows/s
    figures = progress.update(300, extra={"bad": 3})
    assert figures == {"done": 300, "elapsed_s": 20.0, "rate": 10.0, "total": 1000, "percent": 30.0,
                       "eta_s": 70.0, "bad": 3}
    assert seen == [figures]
    assert caplog.messages == ["coco: 300/1000 rows (30%), 3 bad, 10.0 rows/s, ETA 1m10s"]
    clock.now += 1
    assert progress.update(310) is None  # 1 s after the last line
    last = progress.update(1000, force=True)
    assert last["eta_s"] == 0.0 and last["rate"] == pytest.approx(900 / 21)
    assert caplog.messages[-1] == "coco: 1000/1000 rows (100%), 42.9 rows/s, ETA 0m00s" and len(seen) == 2


def test_unknown_total_and_extra_rates(caplog):
    caplog.set_level(logging.INFO, logger="pipelines.progress")
    clock = Clock()
    rows = Progress("giga", None, 0.0, clock=clock)
    clock.now += 4
    assert rows.update(10, extra={"bad": 1}) == {"done": 10, "elapsed_s": 4.0, "rate": 2.5, "bad": 1}
    files = Progress("ofa-tsv", 3, 0.0, unit="files", extra_rates={"rows ok": "rows"}, clock=clock)
    assert files.figures(0)["eta_s"] == math.inf  # no rate yet
    clock.now += 2
    figures = files.update(1, extra={"rows ok": 7, "bad": 7})
    assert figures["rows_per_s"] == 3.5 and figures["eta_s"] == 4.0
    assert caplog.messages == ["giga: 10 rows, 1 bad, 2.50 rows/s",
                               "ofa-tsv: 1/3 files (33.3%), 7 rows ok, 7 bad, 3.50 rows/s, 0.50 files/s, ETA 0m04s"]


def test_duration_and_bad_every_s():
    assert [duration(s) for s in (None, math.inf, math.nan, 0.4, 59.6, 3725)] == ["?", "?", "?", "0m00s", "1m00s",
                                                                                   "1h02m05s"]
    with pytest.raises(ValueError, match="every_s must be >= 0, got -1"):
        Progress("x", None, -1)


def test_the_training_meter_reports_loss_per_token_rate_and_both_etas(caplog):
    """The train loop's meter (pipelines.train.worker) on the shared helper: a fake clock, 5 updates in 2 s."""
    import types

    import torch

    from pipelines.train.worker import _Meter

    now = [100.0]
    meter = _Meter("train epoch 1/2", 1.5, steps_total=100, steps_epoch=50, step=10)
    meter.progress.clock = lambda: now[0]
    meter.progress.t0 = meter.progress.last = now[0]
    for loss in (8.0, 4.0):
        meter.add(types.SimpleNamespace(loss=torch.tensor(loss), ntokens=4), {"src_tokens": torch.zeros(3, 2)})
    assert not meter.due()
    now[0] += 2.0
    assert meter.due()
    with caplog.at_level(logging.INFO, logger="pipelines.train.worker"):
        m = meter.metrics(step_in_epoch=5, step=15, world=2, lr=1e-4)
    assert m["train/loss"] == 12.0 / 8 and m["train/steps_per_s"] == 2.5  # (15 - 10) steps / 2 s
    assert m["train/samples_per_s"] == 6 / 2.0 * 2  # per worker x world
    assert m["train/eta_epoch_s"] == 45 / 2.5 and m["train/eta_run_s"] == 85 / 2.5
    assert m["progress/fraction"] == 0.15  # 15 of 100 steps
    assert caplog.messages == ["train epoch 1/2: 15/100 steps (15%), 1.5 loss, 0.0001 lr, 6 samples, "
                               "3.00 samples/s, 2.50 steps/s, ETA 0m34s"]
    assert meter.sums == {}  # the sums start again


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_on_a_terminal_one_bar_is_redrawn_in_place_and_the_last_line_logged(caplog):
    caplog.set_level(logging.INFO, logger="pipelines.progress")
    clock, seen, term = Clock(), [], Terminal()
    progress = Progress("coco", 1000, 10.0, on_report=seen.append, stream=term, clock=clock)
    clock.now += 5
    assert progress.update(100, extra={"bad": 2}) is None  # drawn, not yet due
    clock.now += 0.1
    progress.update(150, extra={"bad": 2})  # under REDRAW_S since the last draw: not drawn
    clock.now += 4.9
    assert progress.update(500, extra={"bad": 3})["eta_s"] == 10.0  # due: reported, drawn, not logged
    clock.now += 10
    progress.update(1000, extra={"bad": 3}, force=True)
    first = "coco [##..................] 100/1000 rows (10%), 2 bad, 20.0 rows/s, ETA 0m45s"
    second = "coco [##########..........] 500/1000 rows (50%), 3 bad, 50.0 rows/s, ETA 0m10s"
    assert len(first) == len(second)
    assert term.getvalue() == "\r" + first + "\r" + second + "\r" + " " * len(second) + "\r"
    assert caplog.messages == ["coco: 1000/1000 rows (100%), 3 bad, 50.0 rows/s, ETA 0m00s"]
    assert [f["done"] for f in seen] == [500, 1000]


def test_on_a_terminal_a_shorter_line_blanks_the_longer_one_and_close_wipes(caplog):
    caplog.set_level(logging.INFO, logger="pipelines.progress")
    clock, term = Clock(), Terminal()
    progress = Progress("giga", None, 30.0, stream=term, clock=clock)
    clock.now += 1
    progress.update(1000, extra={"bad": 10})
    clock.now += 1
    progress.update(1001, extra={"bad": 0})
    progress.close()
    first, second = "giga: 1000 rows, 10 bad, 1000.0 rows/s", "giga: 1001 rows, 0 bad, 500.5 rows/s"
    assert len(second) < len(first)  # the shorter line is padded over the longer one, then wiped at its width
    assert term.getvalue() == "\r" + first + "\r" + second.ljust(len(first)) + "\r" + " " * len(second) + "\r"
    assert caplog.messages == []


def test_elsewhere_every_line_is_logged_and_nothing_drawn(caplog):
    caplog.set_level(logging.INFO, logger="pipelines.progress")
    clock, plain = Clock(), io.StringIO()
    progress = Progress("coco", 10, 1.0, stream=plain, clock=clock)
    clock.now += 1
    progress.update(5)
    clock.now += 0.5
    progress.update(6)
    progress.update(10, force=True)
    progress.close()
    assert plain.getvalue() == ""
    assert caplog.messages == ["coco: 5/10 rows (50%), 5.00 rows/s, ETA 0m01s",
                               "coco: 10/10 rows (100%), 6.67 rows/s, ETA 0m00s"]
