"""Progress bars with tqdm, as a callback ``(done, total)`` that the library functions call.

Library code reports progress only through its ``progress`` callback; this module turns that into a
``tqdm.auto`` bar: a widget in Jupyter, a redrawn line on a terminal, and in a log that is not a terminal
(Slurm, nohup, ``2> log``) one ordinary line every :data:`LOG_INTERVAL` seconds. ``TQDM_DISABLE=1`` turns
every bar off and ``TQDM_MININTERVAL`` sets the interval, as for any tqdm bar.

tqdm is imported when the first bar is drawn, so importing this module costs nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

#: seconds between two lines of a bar written to a file that is not a terminal (a log)
LOG_INTERVAL = 30.0
#: seconds between two redraws on a terminal
TTY_INTERVAL = 0.1

ProgressCallback = Callable[[int, int], None]


class _Lines:
    """A file for tqdm that turns each redraw (``\\r`` + text) into one line: logs get a line per interval
    instead of one endless line of carriage returns."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line and line != self._last:  # closing redraws the last state once more
            self.stream.write(line + "\n")
            self._last = line

    def flush(self) -> None:
        self.stream.flush()


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class TqdmProgress:
    """A progress callback ``(done, total)`` drawn with ``tqdm.auto``.

    The bar starts at the first call (so a resumed run's rate counts only this run's examples), closes
    itself when ``done`` reaches ``total``, and :meth:`finish` closes it early (an error, Ctrl-C).
    ``enabled=False`` draws nothing; ``TQDM_DISABLE`` is honoured either way.
    """

    def __init__(
        self, label: str, *, enabled: bool = True, stream: TextIO | None = None, unit: str = "ex", **tqdm_kwargs: Any
    ) -> None:
        self.label = label
        self.enabled = enabled
        self.stream = stream
        self.unit = unit
        self.tqdm_kwargs = tqdm_kwargs
        self._bar: Any = None
        self._closed = False

    def _open(self, done: int, total: int) -> Any:
        from tqdm.auto import tqdm

        stream = self.stream if self.stream is not None else sys.stderr
        kwargs: dict[str, Any] = {"desc": self.label, "total": total, "initial": done, "unit": self.unit}
        notebook = sys.modules.get("tqdm.notebook")  # tqdm.auto imports it only inside Jupyter
        if notebook is None or not issubclass(tqdm, notebook.tqdm_notebook):  # a terminal or a log
            tty = _is_tty(stream)
            kwargs["file"] = stream if tty else _Lines(stream)
            if not tty:
                kwargs.update(ascii=True, ncols=100)
            if "TQDM_MININTERVAL" not in os.environ:
                kwargs["mininterval"] = TTY_INTERVAL if tty else LOG_INTERVAL
            kwargs["miniters"] = 1  # the time interval alone decides (callbacks come at uneven rates)
        kwargs.update(self.tqdm_kwargs)
        return tqdm(**kwargs)

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or self._closed:
            return
        if self._bar is None:
            self._bar = self._open(done, total)
        bar = self._bar
        if bar.total != total:
            bar.total = total
        if done != bar.n:
            bar.update(done - bar.n)
        if done >= total:
            self.finish()

    def finish(self) -> None:
        """Close the bar (its last state stays on screen / in the log). Safe to call more than once."""
        if self._bar is not None and not self._closed:
            self._bar.close()
        self._closed = self._bar is not None


def progress_callback(progress: bool | ProgressCallback | None, label: str) -> ProgressCallback | None:
    """What a library function's ``progress=`` argument means: ``True`` a tqdm bar labelled ``label``,
    ``False``/``None`` none, a callable itself."""
    if progress is True:
        return TqdmProgress(label)
    if progress is False or progress is None:
        return None
    if not callable(progress):
        raise TypeError(f"progress must be True, False, None or a callable (done, total), got {progress!r}")
    return progress


__all__ = ["LOG_INTERVAL", "ProgressCallback", "TqdmProgress", "progress_callback"]
