"""cka-offline arrays plugin: pack activations computed elsewhere (.npy folders, .npz, .safetensors)."""

from .extractor import ArraysExtractor

__all__ = ["ArraysExtractor"]
