"""A progress bar on stderr, shown only on a terminal and only once a step has taken a while."""

from __future__ import annotations

import sys
import time

_SHOW_AFTER_S = 1.0
_on_screen: Progress | None = None  # the bar last drawn, until it is closed


class Progress:
    def __init__(self, total: int, label: str):
        self.total, self.label = max(total, 1), label
        self.start = time.perf_counter()
        self.enabled = sys.stderr.isatty()
        self.shown = False

    def update(self, done: int) -> None:
        global _on_screen
        if not self.enabled or time.perf_counter() - self.start < _SHOW_AFTER_S:
            return
        filled = int(30 * done / self.total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}")
        sys.stderr.flush()
        self.shown, _on_screen = True, self

    def close(self) -> None:
        global _on_screen
        if self.shown:
            sys.stderr.write("\r" + " " * (len(self.label) + 45) + "\r")
            sys.stderr.flush()
            self.shown, _on_screen = False, None


def clear() -> None:
    """Erase a bar left on screen by a step that an error or interrupt ended before close()."""
    if _on_screen is not None:
        _on_screen.close()
