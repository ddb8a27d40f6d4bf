"""Placeholder; replaced by the plugin implementation."""
from cka_offline.hookspecs import hookimpl


@hookimpl
def cka_extractors():
    return []
