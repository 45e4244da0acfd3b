"""spa: structural pruning for ONNX models.

    import spa
    result = spa.prune("model.onnx", "model_pruned.onnx", ratio=0.5)
    print(result.after.macs / result.before.macs)

    analysis = spa.analysis("model.onnx")
    for group in analysis.groups: ...
"""

__version__ = "0.1.0"

from spa.api import PruneResult, analyze, prune, sweep, zero_channel_check  # noqa: E402
from spa.errors import SpaError  # noqa: E402

__all__ = ["prune", "analyze", "sweep", "zero_channel_check", "PruneResult", "SpaError", "__version__"]
