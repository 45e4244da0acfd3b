"""The one exception type spa raises for problems a user can fix, and how the command line names
the others."""

from __future__ import annotations

import errno
import os


class SpaError(Exception):
    """A bad model, bad input or bad option. The command line prints its message as one line."""


class CalibrationError(SpaError):
    """Calibration data that onnxruntime cannot run, or whose statistics are not finite. The
    data-free default falls back to a prune without data on it; explicit calibration fails."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) caught by the command line: unwinds like Ctrl-C, so that every clean-up
    that runs on KeyboardInterrupt (temporary files removed) runs on it too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# What to say for the errors the file system gives, by errno: one table for every call site.
_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
    errno.ENAMETOOLONG: "file name too long; choose a shorter one",
    errno.EISDIR: "is a directory; give a file name",
    errno.ENOTDIR: "a folder in the path is not a folder",
    errno.EACCES: "permission denied; choose a file and folder you may write",
    errno.EPERM: "operation not permitted; choose a file and folder you may write",
    errno.EROFS: "read-only file system; write elsewhere",
    errno.ENOENT: "no such file or folder",
}


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (onnxruntime's run to pages), or its type's name;
    cut at `limit` characters (with an ellipsis) where a caller needs it short."""
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    return text[0] if limit is None or len(text[0]) <= limit else text[0][: limit - 3] + "..."


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the file concerned, then the problem and what to do."""
    problem = _OS_ERRORS.get(e.errno, e.strerror or str(e) or type(e).__name__)
    if e.filename is None:
        return problem
    return f"{os.fsdecode(e.filename) if isinstance(e.filename, bytes) else e.filename}: {problem}"
