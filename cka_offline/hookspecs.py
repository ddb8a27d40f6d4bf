"""pluggy hook specifications of the ``cka_offline`` project.

A plugin is a module (or object) with functions marked ``@hookimpl``, exposed through the
``cka_offline`` entry-point group::

    [project.entry-points.cka_offline]
    myplugin = "my_package.plugin"

All hooks are called with no arguments when the plugin manager is built
(:func:`cka_offline.registry.get_plugin_manager`); results of every plugin are collected in a list
(pluggy's default), flattened, and checked for duplicate names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .extractor import Extractor, InputReader

PROJECT = "cka_offline"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def cka_extractors() -> list[type[Extractor]]:
    """Return the :class:`~cka_offline.extractor.Extractor` subclasses this plugin provides.

    Called once per plugin manager, when extractors are listed or a source is opened. Each class must have
    a ``name`` unique across all installed plugins; a clash is reported and both are refused by name.
    The classes must be cheap to import: import the framework (torch, onnxruntime) inside methods, so
    that ``--help`` and ``--list-extractors`` stay fast.
    """


@hookspec
def cka_input_readers() -> list[type[InputReader]]:
    """Return the :class:`~cka_offline.extractor.InputReader` subclasses this plugin provides.

    Called like :func:`cka_extractors`. The core's own readers (``.npz``, ``.npy``, HDF5 datasets, image
    folders) are registered through this same hook. When several readers can open a path, the one
    registered last wins (a third-party plugin can override a built-in one).
    """
