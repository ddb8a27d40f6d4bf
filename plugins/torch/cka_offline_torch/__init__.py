"""cka-offline torch plugin."""
