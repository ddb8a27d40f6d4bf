"""``cka``: one entry point for the three commands (``cka extract|analyze|inspect ...``), also
``python -m cka_offline``. ``cka-extract``, ``cka-analyze`` and ``cka-inspect`` stay the same commands.

Each command's module is imported only when it runs, so ``cka --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from .common import version_option

#: subcommand -> (module, attribute of its click command), in the order ``--help`` lists them
COMMANDS = {
    "extract": (
        "cka_offline.cli.extract",
        "main",
        "Run a model over inputs and store layer activations (cka-extract).",
    ),
    "analyze": ("cka_offline.cli.analyze", "main", "Compare the layers of activation files with CKA (cka-analyze)."),
    "inspect": ("cka_offline.cli.inspect", "inspect", "Show what activation files hold (cka-inspect)."),
}


class _Commands(click.Group):
    """A group whose commands are the existing ones, imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        command = getattr(importlib.import_module(module), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module}.{attr} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # the short help without importing every command module
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, _, text) in COMMANDS.items()])


@click.group(
    cls=_Commands,
    name="cka",
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Each command has its own --help, e.g. cka analyze --help.",
)
@version_option
def main(**_: Any) -> None:
    """cka-offline: extract layer activations to HDF5 once, compare them with streaming minibatch CKA."""


__all__ = ["COMMANDS", "main"]


if __name__ == "__main__":
    main(prog_name="cka")
