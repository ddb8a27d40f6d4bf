"""cka-extract killed with SIGKILL at 20 random moments: the final path holds nothing or a complete file,
and --resume finishes every run to content identical to an uninterrupted run. Readers of a file that is
still being written get a clear "incomplete" error. (The store-level version, a writer process killed after
a chosen batch, is tests/store/test_crash.py.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from cka_offline.errors import IncompleteFileError
from cka_offline.store.reader import open_activations

from .builders import BIN, full_content, invoke, npy_folder

N_KILLS = 20
PARALLEL = 2
# relative paths, run from each run's own folder: the recorded command line is then the same everywhere
COMMAND = [str(BIN / "cka-extract"), "../acts", "-o", "out.h5", "-b", "10", "--chunk-rows", "64", "-q"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A folder of .npy activations (12,000 rows; about half a second to extract) and its reference file."""
    root = tmp_path_factory.mktemp("sigkill")
    npy_folder(root / "acts", n=12_000, widths=(64, 32, 16))
    (root / "ref").mkdir()
    subprocess.run(COMMAND, cwd=root / "ref", check=True, timeout=120)
    ref = root / "ref" / "out.h5"
    return root, full_content(str(ref))


def _start(folder: Path) -> subprocess.Popen:
    folder.mkdir()
    return subprocess.Popen(COMMAND, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_at_random_moments_then_resume(job):
    root, reference = job
    rng = random.Random(20)
    # moments from just before the file is created to past the end of the run (a run writes for about a
    # second); counted from the .partial's appearance, so a slow start-up on a busy machine does not matter
    delays = [rng.uniform(-0.05, 1.2) for _ in range(N_KILLS)]
    outcomes = {"nothing": 0, "partial": 0, "complete": 0}
    folders = []
    for first in range(0, N_KILLS, PARALLEL):
        group = [(root / f"kill{k:02d}", delays[k]) for k in range(first, min(N_KILLS, first + PARALLEL))]
        procs = [(folder, delay, _start(folder)) for folder, delay in group]
        started = {folder: _created(folder / "out.h5.partial", proc) for folder, _, proc in procs}
        for folder, delay, proc in sorted(procs, key=lambda item: started[item[0]] + item[1]):
            time.sleep(max(0.0, started[folder] + delay - time.monotonic()))
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            folders.append(folder)
    resumes = []
    for folder in folders:
        final, partial = folder / "out.h5", folder / "out.h5.partial"
        if final.exists():  # killed after the rename: the file is complete and valid
            outcomes["complete"] += 1
            assert not partial.exists()
            with open_activations(str(final)) as f:
                assert f.n_examples == 12_000
            assert full_content(str(final)) == reference
            continue
        outcomes["partial" if partial.exists() else "nothing"] += 1
        resumes.append(
            (folder, subprocess.Popen([*COMMAND, "--resume"], cwd=folder, stderr=subprocess.PIPE, text=True))
        )
        if len(resumes) >= PARALLEL:
            _finish(resumes.pop(0), reference)
    for item in resumes:
        _finish(item, reference)
    assert sum(outcomes.values()) == N_KILLS
    print(outcomes)
    assert outcomes["partial"] >= 5, outcomes  # the random moments do land mid-write


def _created(partial: Path, proc: subprocess.Popen) -> float:
    """When ``partial`` appeared (polled; the process may have finished already)."""
    deadline = time.monotonic() + 60
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    return time.monotonic()


def _finish(item, reference) -> None:
    folder, proc = item
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert not (folder / "out.h5.partial").exists()
    assert full_content(str(folder / "out.h5")) == reference


@pytest.fixture
def writer_running(tmp_path):
    """A cka-extract process in the middle of writing ``out.h5.partial`` (one flush per 5 rows)."""
    acts = npy_folder(tmp_path / "acts", n=40_000, widths=(32,))
    proc = subprocess.Popen(
        [str(BIN / "cka-extract"), acts, "-o", str(tmp_path / "out.h5"), "-b", "5", "-q"], stderr=subprocess.PIPE
    )
    partial = tmp_path / "out.h5.partial"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if partial.exists():
            try:  # the writer may be mid-flush: then try again
                with h5py.File(partial, "r", locking=False) as h:
                    if h.attrs.get("rows_complete", 0) > 0:
                        break
            except (OSError, KeyError, RuntimeError):
                pass
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.01)
    yield tmp_path
    proc.kill()
    proc.communicate()


def test_reading_a_file_being_written_says_incomplete(writer_running):
    out = writer_running / "out.h5"
    for path in (out, Path(str(out) + ".partial")):
        with pytest.raises(IncompleteFileError, match="incomplete.*still being written.*wait for it to finish"):
            open_activations(str(path))
        r = invoke("cka-inspect", [path])
        assert r.exit_code == 3
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("cka-inspect: error: ") and "incomplete" in r.stderr
    r = invoke("cka-analyze", [out, "--device", "cpu"])
    assert r.exit_code == 3 and "incomplete" in r.stderr and r.stderr.count("\n") == 1


def test_a_file_another_process_holds_open_for_writing_is_incomplete(tmp_path):
    """HDF5 file locking: a reader gets a lock error while another process has the file open to write;
    that is reported as incomplete, not as a corrupt file or a traceback."""
    from .builders import acts

    path = acts(tmp_path / "a.h5")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import h5py, sys, time; f = h5py.File({path!r}, 'r+'); print('open', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        if os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE":
            pytest.skip("HDF5 file locking is disabled in this environment")
        with pytest.raises(IncompleteFileError, match="a\\.h5 is incomplete: another process has it open for writing"):
            open_activations(path)
        r = CliRunner().invoke(__import__("cka_offline.cli.inspect", fromlist=["inspect"]).inspect, [path])
        assert r.exit_code == 3 and "another process has it open for writing" in r.stderr
    finally:
        holder.kill()
        holder.communicate()
