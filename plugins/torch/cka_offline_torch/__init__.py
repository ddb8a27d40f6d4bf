"""cka-offline extractor plugin for PyTorch models (see :class:`cka_offline_torch.extractor.TorchExtractor`)."""

from importlib import metadata

try:
    __version__ = metadata.version("cka-offline-torch")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
