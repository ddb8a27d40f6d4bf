"""cka-offline extractor plugin for ONNX models, run with onnxruntime.

The extractor class lives in :mod:`cka_offline_onnx.extractor`; the entry point module
:mod:`cka_offline_onnx.plugin` registers it. Neither imports onnx or onnxruntime at import time.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
