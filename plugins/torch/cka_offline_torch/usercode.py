"""Running the user's code (a factory's module, the factory, unpickled classes, the forward pass).

Inside :func:`user_code` the code sees ``sys.argv == [its own file]``, so a command-line parser at import
(argparse and friends) finds no arguments rather than cka-extract's; and a ``SystemExit`` it raises
(``sys.exit(0)``, ``exit()``, a parser's ``--help`` or usage error) becomes one
:class:`~cka_offline.errors.ModelError` that names the code and says how to guard it, instead of ending
the program in silence with status 0. A Ctrl-C stays a KeyboardInterrupt (exit 130). ``os._exit`` cannot
be caught by any Python code.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from cka_offline.errors import ModelError

#: top-level modules whose frames in a SystemExit's traceback mean "a command-line parser exited"
_CLI_PARSERS = ("argparse", "optparse", "getopt", "click", "typer", "absl", "fire", "docopt", "jsonargparse")


def _cli_parser(tb: Any) -> str:
    """The command-line parser module that raised the SystemExit whose traceback is ``tb``, or ''."""
    found = ""
    while tb is not None:
        name = str(tb.tb_frame.f_globals.get("__name__", ""))
        if name.split(".")[0] in _CLI_PARSERS:
            found = found or name.split(".")[0]
        tb = tb.tb_next
    return found


@contextlib.contextmanager
def user_code(what: str, argv0: str, where: str = "") -> Iterator[None]:
    """Run the user's code (``what``: "factory file 'm.py' while it was imported") with ``sys.argv`` set
    to ``[argv0]``, so a command-line parser in it sees no arguments (not ours); a ``SystemExit`` from it
    becomes a :class:`ModelError` naming ``what`` (a Ctrl-C stays a KeyboardInterrupt). ``where``: the
    file to guard, named in the advice."""
    import argparse

    saved = sys.argv
    sys.argv = [argv0]
    printed: list[str] = []  # what an argparse parser would print, kept for the one error line
    real_print = argparse.ArgumentParser._print_message

    def keep(self: argparse.ArgumentParser, message: str, file: Any = None) -> None:
        if message:
            printed.append(message)

    argparse.ArgumentParser._print_message = keep  # type: ignore[method-assign]
    said_in_error = False
    try:
        yield
    except SystemExit as exc:
        said_in_error = True
        status = exc.code
        parser = _cli_parser(exc.__traceback__)
        guard = f"in {where} " if where else ""
        if parser:
            said = " ".join(" ".join(printed).split())
            said = said.split(": error: ", 1)[-1] if ": error: " in said else ""
            raise ModelError(
                f"{what} ran its own command-line parser ({parser}), which exited with status {status!r}"
                + (f" ({said})" if said else "")
                + f"; guard the parsing {guard}with "
                "'if __name__ == \"__main__\":' so that importing the module and calling the factory do not parse"
            ) from exc
        raise ModelError(
            f"{what} exited (SystemExit({status!r}), e.g. sys.exit() or exit()) instead of returning; "
            f"a model's code must not end the program: remove the exit {guard}or put it under "
            "'if __name__ == \"__main__\":'"
        ) from exc
    finally:
        sys.argv = saved
        argparse.ArgumentParser._print_message = real_print  # type: ignore[method-assign]
        if printed and not said_in_error:  # printed without exiting (e.g. print_help()): let it through
            sys.stderr.write("".join(printed))


__all__ = ["user_code"]
