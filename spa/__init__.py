"""spa: structural pruning for ONNX models.

import spa
result = spa.prune("model.onnx", "model_pruned.onnx", ratio=0.5)
print(result.after.macs / result.before.macs)

analysis = spa.analyze("model.onnx")
for group in analysis.groups: ...
"""

__version__ = "0.1.0"

from spa.errors import SpaError  # noqa: E402

_API = ("prune", "analyze", "sweep", "zero_channel_check", "PruneResult")
__all__ = [*_API, "SpaError", "__version__"]


def __getattr__(name: str):
    # The API (onnx, onnxruntime) loads on first use, so that `spa ...` is quick to start and an
    # interrupt during start-up reaches the command line's handler.
    import importlib

    if name in _API:
        return getattr(importlib.import_module("spa.api"), name)
    try:  # a submodule, as `spa.calibration` was when the API loaded eagerly
        return importlib.import_module(f"spa.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'spa' has no attribute {name!r}") from None
