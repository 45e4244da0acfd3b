"""The one exception type spa raises for problems a user can fix."""


class SpaError(Exception):
    """A bad model, bad input or bad option. The command line prints its message as one line."""


class CalibrationError(SpaError):
    """Calibration data that onnxruntime cannot run, or whose statistics are not finite. The
    data-free default falls back to a prune without data on it; explicit calibration fails."""
