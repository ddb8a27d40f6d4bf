"""``cka`` / ``python -m cka_offline``: dispatch to the three commands, --version, shell completion."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import cka_offline
from cka_offline.cli import analyze, extract, inspect
from cka_offline.cli.cka import COMMANDS, main

BIN = os.path.dirname(sys.executable)


@pytest.mark.parametrize(
    "command, prog",
    [(analyze.main, "cka-analyze"), (extract.main, "cka-extract"), (inspect.inspect, "cka-inspect"), (main, "cka")],
)
def test_version_on_every_command(command, prog):
    r = CliRunner().invoke(command, ["--version"], prog_name=prog)
    assert r.exit_code == 0 and r.stdout == f"{prog} {cka_offline.__version__}\n"


def test_cka_dispatches_to_the_three_commands():
    r = CliRunner().invoke(main, ["--help"], prog_name="cka")
    assert r.exit_code == 0 and all(name in r.stdout for name in ("extract", "analyze", "inspect"))
    for name in COMMANDS:
        r = CliRunner().invoke(main, [name, "--help"], prog_name="cka")
        assert r.exit_code == 0 and f"Usage: cka {name}" in r.stdout, r.output
    assert CliRunner().invoke(main, ["analyze", "--version"], prog_name="cka").stdout.startswith("cka analyze ")
    r = CliRunner().invoke(main, ["compare"], prog_name="cka")
    assert r.exit_code == 2 and "No such command 'compare'" in r.stderr


def test_cka_inspect_runs_the_command(tmp_path):
    from ..analyze_fixtures import chain_activations, write_acts

    path = write_acts(tmp_path / "a.h5", chain_activations(16, seed=1))
    r = CliRunner().invoke(main, ["inspect", str(path)], prog_name="cka")
    assert r.exit_code == 0 and "layer1" in r.stdout, r.output


def test_python_m_cka_offline():
    r = subprocess.run([sys.executable, "-m", "cka_offline", "--version"], capture_output=True, text=True, check=True)
    assert r.stdout == f"cka {cka_offline.__version__}\n"
    r = subprocess.run([sys.executable, "-m", "cka_offline", "analyze", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Usage: cka analyze" in r.stdout


@pytest.mark.parametrize("prog", ["cka", "cka-analyze", "cka-extract", "cka-inspect"])
def test_shell_completion_scripts(prog):
    script = os.path.join(BIN, prog)
    if not os.path.exists(script):
        pytest.skip(f"{prog} is not installed in this environment (pip install -e .)")
    var = "_" + prog.replace("-", "_").upper() + "_COMPLETE"
    r = subprocess.run([script], env={**os.environ, var: "bash_source"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "complete -o nosort -F" in r.stdout and prog in r.stdout, r.stderr


def test_completion_of_cka_subcommands_and_options():
    env = {"_CKA_COMPLETE": "bash_complete", "COMP_WORDS": "cka an", "COMP_CWORD": "1"}
    r = CliRunner().invoke(main, [], prog_name="cka", env=env)
    assert "plain,analyze" in r.stdout
    env = {"_CKA_ANALYZE_COMPLETE": "bash_complete", "COMP_WORDS": "cka-analyze --ker", "COMP_CWORD": "1"}
    r = CliRunner().invoke(analyze.main, [], prog_name="cka-analyze", env=env)
    assert "plain,--kernel" in r.stdout


@pytest.mark.parametrize("prog", ["cka-analyze", "cka-inspect", "cka-extract"])
def test_exit_codes_tell_usage_errors_from_data_errors(prog, tmp_path):
    """2: the command line is wrong (click); 3: the data is (CKAOfflineError); docs/reliability.md."""
    from cka_offline.errors import DATA_EXIT_CODE, USAGE_EXIT_CODE, CKAOfflineError, OptionError

    assert (USAGE_EXIT_CODE, DATA_EXIT_CODE) == (2, 3)
    assert CKAOfflineError.exit_code == DATA_EXIT_CODE and OptionError.exit_code == USAGE_EXIT_CODE
    script = os.path.join(BIN, prog)
    if not os.path.exists(script):
        pytest.skip(f"{prog} is not installed in this environment")
    usage = subprocess.run([script, "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "No such option" in usage.stderr
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    args = [str(bad), "-o", str(tmp_path / "out.h5")] if prog == "cka-extract" else [str(bad)]
    data = subprocess.run([script, *args], capture_output=True, text=True, timeout=120)
    assert data.returncode == 3 and data.stderr.startswith(f"{prog}: error: "), data.stderr
