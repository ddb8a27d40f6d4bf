"""cka-offline arrays plugin."""
