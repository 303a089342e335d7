"""Conversion throughput on one large OFA TSV file: rows/s with 1 and with 2 conversion tasks, side by side.

One VQA TSV of realistic rows (640x480 JPEGs at quality 90, base64 in the line as OFA ships them, ~100 KB a
line) is written once, then converted by `pipelines.data.raw_convert` on a local Ray cluster: with one task (the
whole file, as before byte ranges existed: one task per file) and with byte ranges read by two tasks at once.
Both runs must give the same fingerprint. The ratio is the speed-up of one file over two workers; on this
2-core machine the ideal is 2.0.

    python -m bench.convert [--mb 200] [--range-mb 16]
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.data import realistic_rows
from pipelines.data.raw_convert import RawSource, convert_raw
from pipelines.local.ray_settings import init_local_ray


def write_tsv(path: Path, mb: float) -> int:
    """A VQA TSV of about `mb` MiB; returns its rows."""
    target, rows, size = mb * 2**20, 0, 0
    with open(path, "wb") as f:
        for row in realistic_rows(10**9):
            line = (f"{rows}\timg{rows}\twhat is in the photo?\t1.0|!+a photo\tobj\t"
                    f"{base64.b64encode(row['image']).decode()}\n").encode()
            f.write(line)
            rows, size = rows + 1, size + len(line)
            if size >= target:
                return rows
    return rows


def convert(tsv: Path, out: Path, *, concurrency: int, range_mb: float) -> tuple[dict, float]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.monotonic()
    summary = convert_raw(RawSource("ofa-tsv", split="train", layout="vqa"), str(tsv), str(out),
                          concurrency=concurrency, range_mb=range_mb, log_every_s=30)
    return summary, time.monotonic() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=200.0, help="size of the TSV file in MiB (default 200)")
    p.add_argument("--range-mb", type=float, default=16.0, help="byte range per task of the 2-task run")
    args = p.parse_args(argv)
    cpus = os.cpu_count() or 1
    init_local_ray(2)
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tsv = Path(tmp) / "big.tsv"
        t0 = time.monotonic()
        rows = write_tsv(tsv, args.mb)
        print(f"one TSV file: {tsv.stat().st_size / 2**20:.0f} MiB, {rows} rows (written in "
              f"{time.monotonic() - t0:.0f} s); {cpus} cores", flush=True)
        one, t_one = convert(tsv, Path(tmp) / "one", concurrency=1, range_mb=args.mb * 2)
        two, t_two = convert(tsv, Path(tmp) / "two", concurrency=2, range_mb=args.range_mb)
    assert one["fingerprint"] == two["fingerprint"] and one["rows_ok"] == two["rows_ok"] == rows
    print(f"{'tasks':>5} {'parts':>5} {'seconds':>8} {'rows/s':>8} {'MiB/s':>7}")
    for n, summary, seconds in ((1, one, t_one), (2, two, t_two)):
        print(f"{n:>5} {summary['parts']:>5} {seconds:>8.1f} {rows / seconds:>8.1f} {args.mb / seconds:>7.1f}")
    print(f"speed-up of 2 tasks over 1 on one file: {t_one / t_two:.2f}x (same fingerprint)")


if __name__ == "__main__":
    main()
