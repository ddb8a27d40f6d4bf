"""A model's own code cannot end cka-extract in silence or speak as cka-extract: a SystemExit from a
factory's module, the factory or the forward pass is one error line naming it (non-zero exit); a
command-line parser in it sees no arguments; a Ctrl-C in it stays a Ctrl-C (exit 130)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from .builders import error_line, invoke

MODEL = "from torch import nn\n"
MAKE = "def make():\n    return nn.Sequential(nn.Linear(3, 2), nn.Tanh())\n"


def _inputs(tmp_path: Path) -> Path:
    path = tmp_path / "x.npz"
    np.savez(path, x=np.ones((4, 3), np.float32))
    return path


def _run(tmp_path: Path, code: str, attr: str = "make"):
    factory = tmp_path / "factory.py"
    factory.write_text(code)
    out = tmp_path / "o.h5"
    return invoke("cka-extract", [f"{factory}:{attr}", "-i", _inputs(tmp_path), "-o", out, "-q"]), out


@pytest.mark.parametrize(
    ("code", "attr", "match"),
    [
        (MODEL + "import sys\nsys.exit(0)\n" + MAKE, "make", "factory file '.*factory.py' .*while it was imported"),
        (MODEL + MAKE + "def gone():\n    exit()\n", "gone", "factory '.*factory.py:gone', when called,"),
        (
            MODEL + "class M(nn.Linear):\n    def forward(self, x):\n        raise SystemExit(0)\n"
            "def make():\n    return nn.Sequential(M(3, 2))\n",
            "make",
            "the forward pass of '.*factory.py:make'",
        ),
    ],
    ids=["import", "call", "forward"],
)
def test_a_factory_that_exits_is_an_error(tmp_path, code, attr, match):
    r, out = _run(tmp_path, code, attr)
    line = error_line(r, "cka-extract")
    assert r.exit_code == 3 and not out.exists()
    assert re.match(match + r",? exited \(SystemExit\((0|None)\)", line), line
    assert 'if __name__ == "__main__":' in line


def test_a_factory_that_exits_through_the_installed_command(tmp_path):
    """The reported case: sys.exit(0) in a factory made cka-extract exit 0 with no file and no message."""
    from .test_untrusted import _cka_extract

    factory = tmp_path / "factory.py"
    factory.write_text(MODEL + MAKE.replace("return", "import sys; sys.exit(0)\n    return"))
    out = tmp_path / "o.h5"
    cmd = [_cka_extract(), f"{factory}:make", "-i", str(_inputs(tmp_path)), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and not out.exists() and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("cka-extract: error: factory '"), r.stderr
    assert "exited (SystemExit(0)" in r.stderr


ARGPARSE = "import argparse\nparser = argparse.ArgumentParser()\nparser.add_argument('--data', {})\n"


def test_a_parser_at_import_sees_no_arguments(tmp_path):
    # with cka-extract's own arguments in sys.argv this parser would reject '-i', '-o', '-q'
    code = MODEL + ARGPARSE.format("default='d'") + "args = parser.parse_args()\n" + MAKE
    r, out = _run(tmp_path, code)
    assert r.exit_code == 0 and out.exists(), r.stderr


def test_a_parser_at_import_that_exits_is_explained(tmp_path):
    code = MODEL + ARGPARSE.format("required=True") + "args = parser.parse_args()\n" + MAKE
    r, out = _run(tmp_path, code)
    line = error_line(r, "cka-extract")  # one line: the parser's own usage text is not printed as ours
    assert r.exit_code == 3 and not out.exists()
    assert "while it was imported, ran its own command-line parser (argparse), which exited with status 2" in line
    assert "the following arguments are required: --data" in line
    assert "guard the parsing in" in line and 'if __name__ == "__main__":' in line


def test_ctrl_c_in_a_factory_stays_ctrl_c(tmp_path):
    r, out = _run(tmp_path, MODEL + "def make():\n    raise KeyboardInterrupt\n")
    assert r.exit_code == 130 and not out.exists()
