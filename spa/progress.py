"""What spa is doing, on stderr: the pipeline's steps (logged with -v), a bar with an ETA on a
terminal, and, while the command line runs, a watchdog that writes a plain line (the step, its
time, the bar's count and ETA) whenever QUIET_S pass without output: CI logs and pipes see progress
too. The library alone writes no lines."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

logger = logging.getLogger(__name__)

_SHOW_AFTER_S = 1.0  # a terminal bar appears once a step has taken this long
QUIET_S = 10.0  # never longer than this without a line on stderr (while the watchdog runs)
_on_screen: Progress | None = None  # the bar last drawn, until it is closed
_last_output = time.perf_counter()  # when spa last wrote progress
_stage: tuple[str, float] | None = None  # what runs now, since when
_status: str | None = None  # the running step's count and ETA, for the watchdog's line
_lock = threading.Lock()


class Progress:
    def __init__(self, total: int, label: str):
        self.total, self.label = max(total, 1), label
        self.start = time.perf_counter()
        self.terminal = sys.stderr.isatty()
        self.shown = False

    def update(self, done: int) -> None:
        global _on_screen, _status
        elapsed = time.perf_counter() - self.start
        eta = (
            f", about {elapsed / done * (self.total - done):.0f} s left"
            if 0 < done < self.total
            else ""
        )
        _status = f"{self.label} {done}/{self.total}{eta}"
        if self.terminal and elapsed >= _SHOW_AFTER_S:
            filled = int(30 * done / self.total)
            _write(
                f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total}{eta}   "
            )
            self.shown, _on_screen = True, self

    def close(self) -> None:
        global _on_screen, _status
        _status = None
        if self.shown:
            _write("\r" + " " * (len(self.label) + 70) + "\r")
            self.shown, _on_screen = False, None


def _write(text: str) -> None:
    global _last_output
    with _lock:
        sys.stderr.write(text)
        sys.stderr.flush()
        _last_output = time.perf_counter()


def clear() -> None:
    """Erase a bar left on screen by a step that an error or interrupt ended before close()."""
    if _on_screen is not None:
        _on_screen.close()


def step(what: str | None) -> None:
    """The pipeline moves on to `what` (None: done): -v logs each step and its time, and the
    watchdog names the running one."""
    global _stage
    now = time.perf_counter()
    if _stage is not None:
        logger.info("%s: %.1f s", _stage[0], now - _stage[1])
    _stage = None if what is None else (what, now)
    if what is not None:
        logger.info("%s ...", what)


@contextlib.contextmanager
def watchdog(what: str):
    """While the block (`what`, until a step names itself) runs, a plain line on stderr whenever
    QUIET_S pass without one: the step that runs and how long it has (a bar's update counts)."""
    done = threading.Event()
    step(what)

    def watch() -> None:
        while not done.wait(1.0):
            if _stage is not None and time.perf_counter() - _last_output >= QUIET_S:
                what, since = _stage
                clear()
                status = f" ({_status})" if _status else ""
                _write(f"spa: {what}, {time.perf_counter() - since:.0f} s so far{status}\n")

    thread = threading.Thread(target=watch, name="spa-progress", daemon=True)
    global _last_output
    _last_output = time.perf_counter()
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        step(None)
