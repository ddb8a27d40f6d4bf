"""cka-offline onnx plugin."""
