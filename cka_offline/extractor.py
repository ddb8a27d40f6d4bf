"""The plugin contract: what an extractor plugin provides and what the core does with it.

A plugin contributes :class:`Extractor` subclasses (and optionally :class:`InputReader` subclasses)
through the hooks in :mod:`cka_offline.hookspecs`. The split of work is:

- the **extractor** opens a model source, lists the layers it offers, and runs *one batch* of inputs,
  returning the raw per-layer outputs as numpy arrays with the batch on axis 0;
- the **core** (:func:`cka_offline.extract`) owns everything else: reading inputs in batches, layer
  selection by names/globs, reductions (flatten, spatial mean, token pooling), dtype, the HDF5 file,
  resume, sharding and progress.

A plugin imports only this module, :mod:`cka_offline.hookspecs` (for ``hookimpl``),
:mod:`cka_offline.errors` and its own framework. See ``docs/plugins.md`` for a walk-through.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import OptionError

if TYPE_CHECKING:  # numpy only in annotations: the CLI imports this module to parse -X values
    import numpy as np


# --------------------------------------------------------------------------------------------- options

#: the value types an :class:`Option` can declare; ``object`` takes any value (the plugin parses it)
OPTION_TYPES: tuple[type, ...] = (bool, int, float, str, object)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def parse_value(text: str) -> Any:
    """A command-line option value (``-X key=VALUE``, ``-I``): JSON numbers, true/false/null, lists and
    objects; anything else is the string itself. The declared :class:`Option` type then converts it."""
    stripped = text.strip()
    if stripped and (stripped[0] in "-0123456789[{" or stripped in ("true", "false", "null")):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            pass
    return text


def parse_flag(value: Any, key: str) -> bool:
    """A boolean given as a bool or as a command-line string (1/0, true/false, yes/no, on/off; empty: false).

    Raises:
        OptionError: anything else.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise OptionError(f"option {key}={value!r} is not a boolean; use {key}=true or {key}=false")


def parse_int(value: Any, key: str, *, minimum: int | None = None) -> int:
    """An integer given as an int, an integral float or a command-line string.

    Raises:
        OptionError: not an integer, or below ``minimum``.
    """
    try:
        if isinstance(value, bool):
            raise ValueError
        number = int(value.strip()) if isinstance(value, str) else int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError):
        raise OptionError(f"option {key}={value!r} is not an integer; give e.g. {key}=1") from None
    if minimum is not None and number < minimum:
        raise OptionError(f"option {key}={number} must be >= {minimum}")
    return number


@dataclass(frozen=True)
class Option:
    """One option an extractor or input reader understands, given as ``-X name=value`` (extractors) or
    ``-I name=value`` (input readers) on the command line, or in ``options=`` from Python.

    Attributes:
        name: the key.
        type: one of :data:`OPTION_TYPES`; ``bool`` and ``int`` accept the command line's strings
            (``true``, ``0``, ``"3"``), ``float`` and ``str`` convert; ``object`` passes the value as given.
        default: the value when the option is not given (not converted; ``None``: no value).
        help: one line for ``cka-extract --list-options``.
        choices: the allowed values of a ``str`` option (compared in lower case; the value is lowered).
        minimum: the smallest allowed value of an ``int`` option.
    """

    name: str
    type: builtins.type = str
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None
    minimum: int | None = None

    def parse(self, value: Any) -> Any:
        """``value`` converted to :attr:`type`; raises :class:`OptionError` saying what is expected."""
        if self.type is bool:
            return parse_flag(value, self.name)
        if self.type is int:
            return parse_int(value, self.name, minimum=self.minimum)
        if self.type is float:
            try:
                return float(value)
            except (TypeError, ValueError):
                raise OptionError(f"option {self.name}={value!r} is not a number; give e.g. {self.name}=0.5") from None
        if self.type is str:
            text = str(value)
            if self.choices is not None:
                text = text.strip().lower()
                if text not in self.choices:
                    raise OptionError(f"option {self.name}={value!r} is not one of {', '.join(self.choices)}")
            return text
        return value

    def describe_type(self) -> str:
        """``bool``, ``int``, ``all|basic|...``, ``value``: the type column of ``--list-options``."""
        if self.choices is not None:
            return "|".join(self.choices)
        return "value" if self.type is object else self.type.__name__


def check_declarations(options: Sequence[Option], owner: str) -> None:
    """Raise ``TypeError`` unless ``options`` is a sequence of :class:`Option` with unique names and known
    types (a bug in the plugin, found by :mod:`cka_offline.testing` and when options are parsed)."""
    if not isinstance(options, (tuple, list)) or not all(isinstance(o, Option) for o in options):
        raise TypeError(
            f"{owner}: declared_options must be a tuple of cka_offline.extractor.Option, got {options!r:.200}"
        )
    names = [o.name for o in options]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TypeError(f"{owner}: options {dup} are declared twice")
    bad = [o.name for o in options if o.type not in OPTION_TYPES]
    if bad:
        raise TypeError(f"{owner}: options {bad} have a type outside bool, int, float, str, object")


def parse_options(declared: Sequence[Option], given: Mapping[str, Any] | None, *, owner: str) -> dict[str, Any]:
    """Every declared option's value: the given ones converted (:meth:`Option.parse`), the others their
    default. The one place options are checked: keys that are not declared are refused.

    ``owner`` names who reads them in errors (``the torch extractor``, ``npz inputs x.npz``).

    Raises:
        OptionError: an unknown key (the message lists the known ones), or a value of the wrong type.
    """
    check_declarations(declared, owner)
    given = dict(given or {})
    known = {o.name: o for o in declared}
    unknown = sorted(set(given) - set(known))
    if unknown:
        listing = ", ".join(known) or "none"
        raise OptionError(
            f"unknown option(s) {', '.join(unknown)} for {owner}; known: {listing} (see cka-extract --list-options)"
        )
    values: dict[str, Any] = {}
    for name, option in known.items():
        value = given.get(name)
        try:
            values[name] = option.default if value is None else option.parse(value)
        except OptionError as exc:
            raise OptionError(f"{owner}: {exc}") from None
    return values


def declared_options(cls: type) -> tuple[Option, ...]:
    """The options a plugin class declares: ``declared_options``, or for a class written before it
    existed, one ``object`` option per key of its ``options_help`` (deprecated)."""
    declared = tuple(getattr(cls, "declared_options", ()) or ())
    legacy = getattr(cls, "options_help", None) or {}
    if not declared and isinstance(legacy, dict):
        return tuple(Option(key, object, None, str(text)) for key, text in legacy.items())
    return declared


# --------------------------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class LayerInfo:
    """One layer (tensor) a model source offers.

    Attributes:
        name: the layer's name as the framework spells it (``"layer1.0.conv1"``, ``"/conv1/Conv_output_0"``).
            Names may contain ``/`` and dots; the core never turns them into file paths.
        kind: the module class (``"Conv2d"``) or op type (``"Relu"``); ``--layers kind:Relu`` selects by it.
        shape: per-example output shape (without the batch axis) where known; ``None`` entries are
            dimensions that are not known before running (sequence length), ``None`` overall if unknown.
        aliases: other names the same tensor may be selected by (for an ONNX export of a PyTorch model,
            the original module name), so two models of one architecture can be compared layer for layer.
        exposable: ``False`` for tensors that exist but cannot be extracted (inside ONNX If/Loop subgraphs);
            ``reason`` then says why. Selecting such a layer is an error that quotes ``reason``.
        layout: ``"channels_first"`` (``(C, *spatial)``: convolutions, their norms and pools) or
            ``"tokens_first"`` (``(T, D)``: Linear, LayerNorm, attention, embeddings) where the extractor
            knows it, else ``""``; decides what ``mean`` averages on a 2-D output (:mod:`cka_offline.reduce`).
        runs: how many times the module behind the layer runs in one forward pass, where known (from a
            probe batch, :meth:`Extractor.probe`); ``None`` if not known.
        group: for one call of a module that runs several times per forward pass (named ``NAME:N``), the
            module's name ``NAME``: selecting it selects every call (:mod:`cka_offline.selection`).
    """

    name: str
    kind: str = ""
    shape: tuple[int | None, ...] | None = None
    aliases: tuple[str, ...] = ()
    exposable: bool = True
    reason: str = ""
    layout: str = ""
    runs: int | None = None
    group: str = ""


class InputReader(ABC):
    """Reads model inputs (one or several named arrays per example) in row blocks.

    The core calls ``read(start, stop)`` with increasing, contiguous ranges; an implementation should
    read only those rows (memory maps, HDF5 slices), never the whole input.
    """

    #: unique short name, shown by ``cka-extract --list-extractors``
    name: ClassVar[str] = ""
    #: one line: what it reads
    description: ClassVar[str] = ""
    #: the options it understands (``-I key=value`` on the command line); others are refused
    declared_options: ClassVar[tuple[Option, ...]] = ()

    @classmethod
    @abstractmethod
    def can_open(cls, path: str) -> bool:
        """True if this reader understands ``path`` (by extension or by looking at it, cheaply)."""

    def __init__(self, path: str, **options: Any) -> None:
        """Keeps ``options`` as given (``self.options``, recorded in the fingerprint) and their checked,
        converted values with defaults (``self.option_values``)."""
        self.path = path
        self.options = options
        self.option_values = parse_options(declared_options(type(self)), options, owner=f"{self.name} inputs {path}")

    @abstractmethod
    def __len__(self) -> int:
        """Number of examples."""

    @abstractmethod
    def ids(self) -> np.ndarray:
        """1-D array of example ids (integers or strings), one per example, in row order."""

    @abstractmethod
    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The inputs of examples ``start:stop`` as ``{input name: array with batch on axis 0}``."""

    def fingerprint(self) -> dict[str, str]:
        """``{"description": ..., "sha256": ...}`` identifying the inputs for provenance and resume."""
        return {"description": f"{self.name}:{os.path.abspath(self.path)}", "sha256": sha256_path(self.path)}

    def close(self) -> None:  # noqa: B027 - optional hook: a reader without open files needs none
        """Release open files."""


class Extractor(ABC):
    """Base class of an extractor: one model framework (or source kind) behind a uniform interface.

    Subclasses set the class attributes, implement :meth:`can_open`, :meth:`layers` and :meth:`run`, and
    may override the rest. Construct with ``Extractor(source, device=..., options=...)``; use as a
    context manager or call :meth:`close`.
    """

    #: unique name, used by ``--extractor NAME``
    name: ClassVar[str] = ""
    #: the framework that runs the model, recorded in the file ("torch", "onnxruntime", "numpy")
    framework: ClassVar[str] = ""
    #: one line: which sources it opens, shown by ``--list-extractors``
    description: ClassVar[str] = ""
    #: the extractor-specific options it understands, given on the CLI as ``-X key=value``; the core
    #: refuses others and converts the values (see :class:`Option`)
    declared_options: ClassVar[tuple[Option, ...]] = ()
    #: deprecated: ``{key: help}`` of untyped options, read only when ``declared_options`` is empty
    options_help: ClassVar[dict[str, str]] = {}
    #: reductions (names from :data:`cka_offline.reduce.REDUCTIONS`) this extractor can apply itself while
    #: the batch runs -- e.g. in a forward hook, while the output is still in cache, instead of handing the
    #: whole output to the core. Optional; see :meth:`reduce_early`.
    early_reductions: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    @abstractmethod
    def can_open(cls, source: str) -> bool:
        """True if this extractor can open ``source`` (a path or a spec such as ``pkg.mod:factory``).

        Must be cheap and must not import heavy frameworks or execute anything from the source.
        """

    def __init__(self, source: str, *, device: str = "cpu", options: Mapping[str, Any] | None = None) -> None:
        """Keeps ``options`` as given (``self.options``) and their checked, converted values with the
        defaults filled in (``self.option_values``: every declared key); unknown keys raise OptionError."""
        self.source = source
        self.device = device
        self.options: dict[str, Any] = dict(options or {})
        self.option_values: dict[str, Any] = parse_options(
            declared_options(type(self)), self.options, owner=f"the {self.name} extractor"
        )

    @abstractmethod
    def layers(self) -> list[LayerInfo]:
        """Every layer the source offers, in model order."""

    def input_names(self) -> list[str] | None:
        """Names of the inputs the model takes, in order, or ``None`` if it takes any single array."""
        return None

    def probe(self, inputs: Mapping[str, np.ndarray]) -> list[LayerInfo] | None:
        """The layers as one batch of ``inputs`` (as :meth:`run` gets them) shows them, or ``None``.

        Optional, for extractors that learn from running what :meth:`layers` cannot say: per-example shapes,
        how often each module runs (:attr:`LayerInfo.runs`), a module that runs several times listed once per
        call (``NAME:1``, ``NAME:2``, ... with :attr:`LayerInfo.group` ``NAME``; :meth:`run` must accept those
        names), modules that do not run marked not exposable. When overridden, the core calls it with the
        first batch before selecting layers, and selects from what it returns; ``--list-layers`` with inputs
        shows it. The default returns ``None``: the core uses :meth:`layers`.
        """
        return None

    def default_inputs(self) -> InputReader | None:
        """Inputs to use when the user gives none (an importer of precomputed arrays provides its rows)."""
        return None

    def open_inputs(self, path: str, options: Mapping[str, Any]) -> InputReader | None:
        """An input reader for ``path`` that needs this model (text tokenized with the model's own
        tokenizer), or ``None`` (the default) to let the registered readers open it; ``options`` are the
        input options (``-I``). Called before the registered readers are looked up."""
        return None

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray], layers: Sequence[str]) -> dict[str, np.ndarray]:
        """Run one batch and return ``{layer name: array of shape (batch, *per-example shape)}``.

        ``inputs`` maps input names to arrays with the batch on axis 0 (all with the same batch size);
        ``layers`` are names from :meth:`layers` (never aliases). Every requested layer must be in the
        result; a layer that produced no output is an error (:class:`cka_offline.errors.ModelError`)
        naming it, never a zero array.
        """

    def reduce_early(self, reductions: Mapping[str, str]) -> list[str]:
        """From the next :meth:`run` on, return these layers already reduced: ``{layer: reduction}``, each
        reduction one of :attr:`early_reductions`; returns the layers it will reduce (the core reduces the
        rest itself).

        The core calls it at most once, after a first batch that it reduced itself (so it knows every
        layer's per-example shape and has checked that the reduction fits), and then runs that batch again.
        A reduced layer's array must be what :func:`cka_offline.reduce.reduce` computes on the full output,
        up to float32 rounding: shape ``(batch, features)``. ``mean`` averages every axis after the
        channel axis (axis 1). The default reduces nothing.
        """
        return []

    def provenance(self) -> dict[str, str]:
        """Provenance recorded in the file. Keys the core reads: ``framework``, ``framework_version``,
        ``model`` (identifier), ``model_sha256`` (empty if there is no file); others are stored as extras."""
        return {"framework": self.framework, "framework_version": "", "model": self.source, "model_sha256": ""}

    def close(self) -> None:  # noqa: B027 - optional hook: an extractor without resources needs none
        """Release the model and any resources."""

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sha256_path(path: str, *, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, or of a folder's files (sorted relative paths and contents); '' if missing."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for fname in sorted(files):
                full = os.path.join(root, fname)
                digest.update(os.path.relpath(full, path).encode())
                _update_file(digest, full, chunk)
        return digest.hexdigest()
    if not os.path.isfile(path):
        return ""
    _update_file(digest, path, chunk)
    return digest.hexdigest()


def _update_file(digest: hashlib._Hash, path: str, chunk: int) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)


__all__ = [
    "Extractor",
    "InputReader",
    "LayerInfo",
    "OPTION_TYPES",
    "Option",
    "check_declarations",
    "declared_options",
    "parse_flag",
    "parse_int",
    "parse_options",
    "parse_value",
    "sha256_path",
]
