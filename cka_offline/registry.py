"""Finding plugins: the plugin manager factory and look-ups of extractors and input readers.

The manager is built by :func:`get_plugin_manager`, never at import time, so tests can build their own
and register plugins by hand. Every installed distribution that declares an entry point in the
``cka_offline`` group is loaded; one that fails to import is recorded in :func:`broken_plugins` and
the others carry on. The registry's own state lives in a :class:`Plugins` object next to pluggy's manager.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .errors import NoExtractorError, PluginError
from .extractor import Extractor, InputReader

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = hookspecs.PROJECT
#: the name the core's own input readers are registered under
CORE_PLUGIN = "cka_offline.inputs"


@dataclass(frozen=True)
class PluginEntry:
    """An extractor or input-reader class with where it came from."""

    name: str
    cls: Any  # an Extractor or InputReader subclass (which one: the list it came from)
    plugin: str
    distribution: str
    version: str
    description: str


class Plugins:
    """The installed plugins: pluggy's manager (:attr:`manager`) and the registry's own bookkeeping, the
    plugins that failed (:attr:`broken`) and the distribution of each entry point (:attr:`distributions`).

    Built by :func:`get_plugin_manager`; a bare ``pluggy.PluginManager`` given to the look-up functions is
    wrapped in one (with nothing broken).
    """

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self.manager = manager
        #: ``(entry point or plugin name, distribution, error)`` of every plugin that failed
        self.broken: list[tuple[str, str, str]] = []
        #: entry-point name -> ``(distribution, version)``
        self.distributions: dict[str, tuple[str, str]] = {}

    def report_broken(self, plugin: str, distribution: str, error: str) -> None:
        self.broken.append((plugin, distribution, error))

    def distribution(self, plugin: str) -> tuple[str, str]:
        """``(distribution, version)`` of a registered plugin (``("?", "")`` for one registered by hand)."""
        from . import __version__

        if plugin == CORE_PLUGIN:
            return "cka-offline", __version__
        return self.distributions.get(plugin, ("?", ""))


PluginsLike = Plugins | pluggy.PluginManager


def get_plugin_manager(*, entry_points: bool = True, plugins: Iterable[object] = ()) -> Plugins:
    """Build the plugins: the core's own, installed entry points and ``plugins``.

    Args:
        entry_points: load plugins from the ``cka_offline`` entry-point group.
        plugins: extra plugin objects (modules or instances with ``@hookimpl`` functions), registered last.
    """
    from . import inputs  # the core's own input readers, registered like any plugin

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(inputs, name=CORE_PLUGIN)
    state = Plugins(pm)
    if entry_points:
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            dist = ep.dist.name if ep.dist is not None else "?"
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken third-party plugin must not break the others
                log.warning("plugin %r from %s failed to load: %s", ep.name, dist, exc)
                state.report_broken(ep.name, dist, f"{type(exc).__name__}: {exc}")
                continue
            state.distributions[ep.name] = (dist, ep.dist.version if ep.dist is not None else "")
    for i, plugin in enumerate(plugins):
        pm.register(plugin, name=getattr(plugin, "__name__", None) or f"plugin-{i}-{id(plugin)}")
    pm.check_pending()
    return state


def _plugins(pm: PluginsLike | None) -> Plugins:
    if pm is None:
        return get_plugin_manager()
    return pm if isinstance(pm, Plugins) else Plugins(pm)


def broken_plugins(pm: PluginsLike) -> list[tuple[str, str, str]]:
    """``(entry point name, distribution, error)`` for every plugin that failed to load."""
    return list(pm.broken) if isinstance(pm, Plugins) else []


_KIND: dict[type, str] = {Extractor: "extractor", InputReader: "input reader"}


def _collect(plugins: Plugins, hook_name: str, base: type[Any]) -> list[PluginEntry]:
    pm = plugins.manager
    entries: list[PluginEntry] = []
    seen: dict[str, PluginEntry] = {}
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls()[::-1]:  # pluggy calls the last registered first; we keep that order
        plugin_name = pm.get_name(impl.plugin) or "?"
        try:
            classes = impl.function() or []
        except Exception as exc:
            log.warning("plugin %r failed in %s: %s", plugin_name, hook_name, exc)
            plugins.report_broken(plugin_name, plugins.distribution(plugin_name)[0], f"{type(exc).__name__}: {exc}")
            continue
        dist, version = plugins.distribution(plugin_name)
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, base)) or not getattr(cls, "name", ""):
                plugins.report_broken(plugin_name, dist, f"{cls!r} is not a named {base.__name__} subclass")
                continue
            name = str(cls.name)  # type: ignore[attr-defined]  # checked above: a named subclass of base
            entry = PluginEntry(name, cls, plugin_name, dist, version, getattr(cls, "description", ""))
            if name in seen and seen[name].cls is not cls:
                raise PluginError(
                    f"two plugins provide an {_KIND[base]} named {name!r}: "
                    f"plugin {seen[name].plugin!r} ({seen[name].distribution}) and plugin {plugin_name!r} "
                    f"({dist}); uninstall one of them"
                )
            if name not in seen:
                seen[name] = entry
                entries.append(entry)
    return entries


def list_extractors(pm: PluginsLike | None = None) -> list[PluginEntry]:
    """Every extractor class the installed plugins provide, in call order (latest registered first)."""
    return _collect(_plugins(pm), "cka_extractors", Extractor)


def list_input_readers(pm: PluginsLike | None = None) -> list[PluginEntry]:
    """Every input reader class, latest registered first (so plugins can override built-in readers)."""
    return _collect(_plugins(pm), "cka_input_readers", InputReader)


def get_extractor(name: str, pm: PluginsLike | None = None) -> type[Extractor]:
    """The extractor class called ``name``; an error lists the installed names."""
    entries = list_extractors(pm)
    for entry in entries:
        if entry.name == name:
            return entry.cls
    known = ", ".join(sorted(e.name for e in entries)) or "none"
    raise PluginError(f"no extractor named {name!r}; installed extractors: {known} (see cka-extract --list-extractors)")


def find_extractor(source: str, pm: PluginsLike | None = None) -> type[Extractor]:
    """The one extractor whose ``can_open(source)`` is true; none (:class:`NoExtractorError`) or several
    (:class:`PluginError`) is an error."""
    entries = list_extractors(pm)
    matches = []
    for entry in entries:
        try:
            if entry.cls.can_open(source):
                matches.append(entry)
        except Exception as exc:  # a plugin's bug must not hide the others
            log.warning("extractor %r failed in can_open(%r): %s", entry.name, source, exc)
    if not matches:
        known = ", ".join(f"{e.name} ({e.description})" for e in entries) or "none installed"
        raise NoExtractorError(f"no extractor can open {source!r}; installed: {known}")
    if len(matches) > 1:
        names = ", ".join(e.name for e in matches)
        raise PluginError(f"several extractors can open {source!r} ({names}); choose one with --extractor NAME")
    return matches[0].cls


def find_input_reader(path: str, pm: PluginsLike | None = None) -> type[InputReader]:
    """The input reader for ``path`` (first that can open it, plugins before built-ins)."""
    entries = list_input_readers(pm)
    for entry in entries:
        if entry.cls.can_open(path):
            return entry.cls
    known = ", ".join(f"{e.name} ({e.description})" for e in entries)
    raise PluginError(f"no input reader can open {path!r}; readers: {known}")


__all__ = [
    "CORE_PLUGIN",
    "ENTRY_POINT_GROUP",
    "PluginEntry",
    "Plugins",
    "broken_plugins",
    "find_extractor",
    "find_input_reader",
    "get_extractor",
    "get_plugin_manager",
    "list_extractors",
    "list_input_readers",
]
