"""One progress line for a sanitize job: rows done, rows/s and time left, from what the purify actors report.

Ray Data's own per-operator bars are turned off by the job: a user wants to know how far the job is, not how each
operator's queue looks. Rows are counted where they are decided (the purify stage); the total comes from the
source's metadata where it is cheap to know (Parquet footers, image-folder listings), else only the rate shows.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


def progress_text(done: int, total: int | None, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        left = max(total - done, 0)
        eta = f", about {_duration(left / rate)} left" if rate > 0 and left else ""
        return f"sanitize: {done}/{total} rows ({100 * done / total:.0f}%), {rate:.1f} rows/s{eta}"
    return f"sanitize: {done} rows, {rate:.1f} rows/s"


class ProgressLine:
    """Polls `rows_done()` every `every_s` seconds on a thread and prints one line (rewritten in place on a
    terminal, one line per update otherwise)."""

    def __init__(self, rows_done: Callable[[], int], total: int | None, every_s: float = 5.0,
                 out: TextIO | None = None) -> None:
        self.rows_done, self.total, self.every_s = rows_done, total, every_s
        self.out = out or sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._t0 = time.monotonic()
        self._tty = bool(getattr(self.out, "isatty", lambda: False)())

    def __enter__(self) -> ProgressLine:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_s + 5)
        if self._tty:
            self.out.write("\n")
            self.out.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                done = self.rows_done()
            except Exception:  # noqa: BLE001 - a progress line must never stop the job it describes
                continue
            text = progress_text(done, self.total, time.monotonic() - self._t0)
            self.out.write(f"\r{text}\033[K" if self._tty else f"{text}\n")
            self.out.flush()
