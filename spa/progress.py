"""A progress bar on stderr, shown only on a terminal and only once a step has taken a while."""

from __future__ import annotations

import sys
import time

_SHOW_AFTER_S = 1.0


class Progress:
    def __init__(self, total: int, label: str):
        self.total, self.label = max(total, 1), label
        self.start = time.perf_counter()
        self.enabled = sys.stderr.isatty()
        self.shown = False

    def update(self, done: int) -> None:
        if not self.enabled or time.perf_counter() - self.start < _SHOW_AFTER_S:
            return
        filled = int(30 * done / self.total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * (len(self.label) + 45) + "\r")
            sys.stderr.flush()
