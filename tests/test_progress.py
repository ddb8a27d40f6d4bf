"""Progress with tqdm: lines in a log that is not a terminal, TQDM_DISABLE, the library's progress=True."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from cka_offline.progress import LOG_INTERVAL, TqdmProgress, progress_callback

from .analyze_fixtures import chain_activations, write_acts

SCRIPT = """
import time
from cka_offline.progress import TqdmProgress
bar = TqdmProgress("working")
for done in range(0, 11):
    bar(done, 10)
    time.sleep(0.05)
"""


def _run(code, env_extra, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    env.update(env_extra)
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:  # a file, as under nohup or Slurm: not a terminal
        subprocess.run([sys.executable, "-c", code], stderr=fh, stdout=subprocess.DEVNULL, env=env, check=True)
    return log.read_text()


def test_a_log_that_is_not_a_terminal_gets_a_line_per_interval(tmp_path):
    text = _run(SCRIPT, {"TQDM_MININTERVAL": "0.1"}, tmp_path)
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert len(lines) >= 3 and all(line.startswith("working:") for line in lines), text
    assert "10/10" in lines[-1] and "0/10" in lines[0]


def test_the_default_log_interval_keeps_logs_short(tmp_path):
    text = _run(SCRIPT, {}, tmp_path)
    assert LOG_INTERVAL >= 10
    assert text.count("\n") == 2, text  # the start and the end: the run is shorter than one interval


def test_tqdm_disable_turns_the_bar_off(tmp_path):
    assert _run(SCRIPT, {"TQDM_DISABLE": "1"}, tmp_path) == ""


def test_cli_analyze_progress_in_a_log(tmp_path):
    a = write_acts(tmp_path / "a.h5", chain_activations(64, seed=1))
    b = write_acts(tmp_path / "b.h5", chain_activations(64, seed=2))
    code = f"from cka_offline.cli.analyze import main; main([{str(a)!r}, {str(b)!r}, '-m', '8', '--epochs', '2'])"
    text = _run(code, {"TQDM_MININTERVAL": "0"}, tmp_path)
    lines = [line for line in text.splitlines() if line.startswith("analyzing:")]
    assert len(lines) >= 2 and "\r" not in text, text
    assert "128/128" in lines[-1]


def test_progress_true_means_a_tqdm_bar():
    assert isinstance(progress_callback(True, "analyzing"), TqdmProgress)
    assert progress_callback(False, "x") is None and progress_callback(None, "x") is None
    calls = []
    assert progress_callback(lambda d, t: calls.append(d), "x") is not None
    with pytest.raises(TypeError, match="progress must be True, False, None or a callable"):
        progress_callback("yes", "x")  # type: ignore[arg-type]


def test_bar_follows_a_changing_total_and_finish_is_idempotent():
    log = io.StringIO()
    bar = TqdmProgress("x", stream=log)
    bar(0, 10)
    bar(4, 20)
    bar.finish()
    bar.finish()
    assert "4/20" in log.getvalue().splitlines()[-1]
