"""Example cka-offline plugin: runs a small MLP stored as JSON (``*.mlp.json``) with numpy.

A model file looks like ``{"layers": [{"name": "fc1", "weight": [[...]], "bias": [...]}, ...]}``:
each layer is ``x @ weight + bias``, followed by ReLU except for the last layer.
"""

from __future__ import annotations

import json

import numpy as np

from cka_offline.errors import InputError, LayerSelectionError, ModelError
from cka_offline.extractor import Extractor, LayerInfo, Option, sha256_path
from cka_offline.hookspecs import hookimpl


class MLPExtractor(Extractor):
    name = "example-mlp"
    framework = "numpy"
    description = "*.mlp.json: a numpy MLP (example plugin)"
    # the options it understands (-X dtype=float64); the core refuses others and checks the values
    declared_options = (
        Option("dtype", str, "float32", "dtype of the returned activations", choices=("float32", "float64")),
    )

    @classmethod
    def can_open(cls, source):
        return source.endswith(".mlp.json")  # cheap: never reads the file

    def __init__(self, source, *, device="cpu", options=None):
        super().__init__(source, device=device, options=options)
        try:
            with open(source) as fh:
                spec = json.load(fh)
            self.weights = [(l["name"], np.asarray(l["weight"]), np.asarray(l["bias"])) for l in spec["layers"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"cannot load MLP {source}: {exc}") from None

    def layers(self):
        return [LayerInfo(name, kind="Linear", shape=(w.shape[1],)) for name, w, _ in self.weights]

    def input_names(self):
        return ["input"]

    def run(self, inputs, layers):
        unknown = set(layers) - {name for name, _, _ in self.weights}
        if unknown:
            raise LayerSelectionError(f"{self.source} has no layer(s) {sorted(unknown)}")
        x = np.asarray(inputs["input"], dtype=np.float64).reshape(len(inputs["input"]), -1)
        if x.shape[1] != self.weights[0][1].shape[0]:
            raise InputError(f"{self.source} takes {self.weights[0][1].shape[0]} features, got {x.shape[1]}")
        out = {}
        for i, (name, w, b) in enumerate(self.weights):
            x = x @ w + b
            if i < len(self.weights) - 1:
                x = np.maximum(x, 0.0)
            if name in layers:
                out[name] = x.astype(self.option_values["dtype"])
        return out

    def provenance(self):
        return {
            "framework": "numpy",
            "framework_version": np.__version__,
            "model": self.source,
            "model_sha256": sha256_path(self.source),
        }


@hookimpl
def cka_extractors():
    return [MLPExtractor]
