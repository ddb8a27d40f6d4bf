"""``python -m cka_offline extract|analyze|inspect ...``: the ``cka`` command."""

from .cli.cka import main

if __name__ == "__main__":
    main(prog_name="cka")
