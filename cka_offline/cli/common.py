"""Helpers every command shares: known errors as one line, --debug/--quiet, -X key=value, the progress bar.

Imports nothing heavy (no torch, h5py, onnxruntime) so that ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar, cast

import click

from ..devices import DEVICE_KINDS, describe_kinds, parse_device
from ..errors import CKAOfflineError, DeviceError
from ..extractor import parse_value
from ..progress import TqdmProgress

F = TypeVar("F", bound=Callable[..., Any])

INTERRUPTED_EXIT_CODE = 130
#: 128 + SIGTERM, what a shell reports for a process ended by SIGTERM
TERMINATED_EXIT_CODE = 143

#: set by Ctrl-C (or SIGTERM) inside cli_errors; the progress callback re-raises it (see _on_sigint)
_interrupted = threading.Event()
_terminated = threading.Event()


class Terminated(KeyboardInterrupt):
    """SIGTERM: a batch scheduler's time limit or preemption (Slurm, Kubernetes), ``kill PID``. Handled as
    Ctrl-C is -- the output is closed cleanly, an interrupted extraction's partial file kept for
    ``--resume`` -- and the command exits with 143."""


def _on_sigint(signum: int, frame: Any) -> None:
    """Ctrl-C (and SIGTERM): raise KeyboardInterrupt (Terminated) now, and remember it. Python drops an
    exception raised while a finalizer or weakref callback runs (h5py has many), so a Ctrl-C landing there
    would be lost and the run would finish as if nothing happened; the next progress callback raises it
    again."""
    _interrupted.set()
    if signum == signal.SIGTERM:
        _terminated.set()
        raise Terminated
    raise KeyboardInterrupt


def raise_interrupt() -> None:
    """Raise the Ctrl-C or SIGTERM that a finalizer swallowed, if one came (see _on_sigint)."""
    if _interrupted.is_set():
        raise Terminated if _terminated.is_set() else KeyboardInterrupt


def _quiet_unraisable(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable hook that drops the KeyboardInterrupt a finalizer swallowed (it is re-raised, see
    _on_sigint) instead of printing "Exception ignored in ..." and a traceback."""

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _interrupted.is_set():
            return
        previous(unraisable)

    return hook


def debug_option(f: F) -> F:
    return click.option("--debug", is_flag=True, help="Show the full traceback of errors, and debug logging.")(f)


def quiet_option(f: F) -> F:
    return click.option(
        "--quiet",
        "-q",
        is_flag=True,
        help="No progress bar, summary or informational messages; warnings and errors still go to stderr.",
    )(f)


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from .. import __version__

    click.echo(f"{ctx.command_path} {__version__}")
    ctx.exit()


def version_option(f: F) -> F:
    """``--version``: prints the command and the package's version (``cka-analyze 0.1.0``) and exits."""
    return click.option(
        "--version",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_print_version,
        help="Show the version and exit.",
    )(f)


def setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if not debug:  # plugins' frameworks are chatty at INFO
        for name in ("h5py", "matplotlib", "PIL"):
            logging.getLogger(name).setLevel(logging.WARNING)


class HeldWarnings(logging.Filter):
    """Holds back the analysis' log records while it is installed, so that a warning the library also
    returns (``CKAResult.warnings``, printed in the summary) is printed once, not twice.

    ``with HeldWarnings() as held: result = analyze(...)`` then ``held.release(result.warnings)``: the held
    records whose message is not among those are emitted then, except the math's (``cka_offline.cka``:
    "full CKA undefined ... (a constant layer?)"), which the result's warnings name layer by layer; after an
    error, all of them are emitted.
    """

    #: loggers whose records are held; the second is summarized by the result's warnings when it has any
    HELD = ("cka_offline.analysis", "cka_offline.cka")
    SUMMARIZED = ("cka_offline.cka",)

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self._handlers: list[logging.Handler] = []

    @staticmethod
    def _under(name: str, loggers: tuple[str, ...]) -> bool:
        return any(name == logger or name.startswith(logger + ".") for logger in loggers)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._under(record.name, self.HELD):
            if record not in self.records:  # one record passes every handler's filter
                self.records.append(record)
            return False
        return True

    def __enter__(self) -> HeldWarnings:
        self._handlers = list(logging.getLogger().handlers)
        for handler in self._handlers:
            handler.addFilter(self)
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        for handler in self._handlers:
            handler.removeFilter(self)
        if exc_type is not None:
            self.release(())

    def release(self, already_shown: Iterable[str]) -> None:
        """Emit the held records, except those ``already_shown`` says (see the class docstring)."""
        shown = set(already_shown)
        records, self.records = self.records, []
        for record in records:
            if record.getMessage() in shown or (shown and self._under(record.name, self.SUMMARIZED)):
                continue
            for handler in self._handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)


def fail(prog: str, message: str, code: int = 2) -> None:
    """Print ``prog: error: message`` as one line on stderr and exit with ``code``."""
    one_line = " ".join(str(message).split())
    click.echo(f"{prog}: error: {one_line}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def cli_errors(prog: str, debug: bool = False, *, interrupted: str | Callable[[], str] | None = None) -> Iterator[None]:
    """Inside it, a known error becomes one line ``prog: error: message`` on stderr and its exit code
    (``--debug``: the traceback too); Ctrl-C prints ``interrupted`` (a text or a function giving it) and
    exits with 130; SIGTERM is handled the same way, says "terminated (SIGTERM)" and exits with 143. Bugs
    (other exceptions) keep their traceback."""
    _interrupted.clear()
    _terminated.clear()
    try:
        previous = signal.signal(signal.SIGINT, _on_sigint)
        previous_term = signal.signal(signal.SIGTERM, _on_sigint)
    except ValueError:  # not the main thread: keep Python's default handlers
        previous = previous_term = None
    unraisable_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_unraisable(unraisable_hook)
    # Python warnings of any thread (numpy, matplotlib, h5py, threadpoolctl, a plugin's framework) are held:
    # printed as one line each after a success or a bug, dropped after a known error (its one line is what
    # the person must read; --debug shows them) or Ctrl-C
    caught = contextlib.ExitStack()
    held = caught.enter_context(warnings.catch_warnings(record=True))
    show_warnings = True
    try:
        yield
    except CKAOfflineError as exc:
        show_warnings = False
        if debug:
            _print_warnings(prog, held)
            traceback.print_exc(file=sys.stderr)
        if getattr(exc, "abandon_process", False):
            # an HDF5 file whose write failed cannot be closed: h5py's finalizers print tracebacks and HDF5
            # crashes the process at exit, so after the one line the process ends without running them
            click.echo(f"{prog}: error: {' '.join(str(exc).split())}", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.exit_code)
        fail(prog, str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        show_warnings = False
        if debug:
            traceback.print_exc(file=sys.stderr)
        text = interrupted() if callable(interrupted) else interrupted or "interrupted"
        if isinstance(exc, Terminated) or _terminated.is_set():
            click.echo(f"{prog}: {text.replace('interrupted', 'terminated (SIGTERM)', 1)}", err=True)
            sys.exit(TERMINATED_EXIT_CODE)
        click.echo(f"{prog}: {text}", err=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    finally:
        caught.close()
        if show_warnings:
            _print_warnings(prog, held)
        sys.unraisablehook = unraisable_hook
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _print_warnings(prog: str, records: list[warnings.WarningMessage]) -> None:
    """Each distinct Python warning once, as one line: ``prog: warning: message (Category)``."""
    seen: set[tuple[type, str]] = set()
    for record in records:
        text = " ".join(str(record.message).split())
        key = (record.category, text)
        if key in seen:
            continue
        seen.add(key)
        click.echo(f"{prog}: warning: {text} ({record.category.__name__})", err=True)
    records.clear()


def handle_errors(prog: str, *, interrupted: Callable[..., str] | None = None) -> Callable[[F], F]:
    """Decorator form of :func:`cli_errors` for a click command that takes a ``debug`` parameter;
    ``interrupted(**command kwargs)`` gives the Ctrl-C message."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            message = (lambda: interrupted(**kwargs)) if interrupted is not None else None
            with cli_errors(prog, bool(kwargs.get("debug")), interrupted=message):
                return func(*args, **kwargs)

        return cast(F, wrapper)  # functools.wraps keeps the signature; mypy cannot see that

    return decorate


def parse_key_values(values: Iterable[str], option: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``; a malformed item is a usage error naming ``option``."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=option)
        out[key.strip()] = parse_value(value)
    return out


class DeviceType(click.ParamType):
    """A click parameter type for ``--device``: checks the syntax with :func:`cka_offline.devices.parse_device`
    (no torch import) and gives back the normalised device string (``str(Device)``: ``cuda:0``, ``cpu``).

    ``allowed`` is the subset of :data:`cka_offline.devices.DEVICE_KINDS` the command accepts.
    """

    name = "device"

    def __init__(self, allowed: tuple[str, ...] = DEVICE_KINDS) -> None:
        self.allowed = tuple(allowed)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "DEVICE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return str(parse_device(value, allowed=self.allowed))
        except DeviceError as exc:
            self.fail(str(exc), param, ctx)

    def describe(self) -> str:
        """``auto, cpu, cuda, cuda:N or mps``: for help texts."""
        return describe_kinds(self.allowed)


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``inf`` (click's range comparisons let NaN through)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:  # the float, before the range check
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a valid float.", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


class SizeType(click.ParamType):
    """A memory size: bytes or ``8G``, ``512M``, ``1.5GiB`` (binary units); at least 1 byte."""

    name = "size"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from ..analysis.options import parse_size

        try:
            size = parse_size(value, "the size")
        except ValueError:
            self.fail(f"{value!r} must be a size such as 8G, 512M or 1000000 (bytes).", param, ctx)
        if size is None or size < 1:
            self.fail(f"{value!r} is below 1 byte; give a size such as 8G or 512M.", param, ctx)
        return size


def split_list(values: Iterable[str]) -> list[str]:
    """Repeated and comma-separated values -> one list (``--layers a,b --layers c``)."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


class ProgressBar(TqdmProgress):
    """The commands' progress callback ``(done, total)``: a tqdm bar on stderr (see :mod:`cka_offline.progress`:
    redrawn on a terminal, a line every 30 s in a log, ``TQDM_DISABLE=1`` turns it off) that also re-raises
    a Ctrl-C a finalizer swallowed (see _on_sigint)."""

    def __init__(self, label: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        super().__init__(label, enabled=enabled, stream=stream)

    def __call__(self, done: int, total: int) -> None:
        raise_interrupt()  # a Ctrl-C or SIGTERM that a finalizer swallowed (see _on_sigint)
        super().__call__(done, total)

    def abandon(self) -> None:
        """Close the bar after an error: on a terminal it is erased, so that the error's one line is all that
        stays on screen (a log keeps the progress lines it was given)."""
        bar = self._bar
        if bar is not None and not self._closed and getattr(bar, "fp", None) is not None:
            from ..progress import _is_tty

            if _is_tty(self.stream if self.stream is not None else sys.stderr):
                bar.leave = False
        self.finish()


__all__ = [
    "debug_option",
    "quiet_option",
    "version_option",
    "setup_logging",
    "fail",
    "HeldWarnings",
    "cli_errors",
    "handle_errors",
    "parse_value",
    "parse_key_values",
    "split_list",
    "DeviceType",
    "FiniteFloatRange",
    "ProgressBar",
    "SizeType",
]
