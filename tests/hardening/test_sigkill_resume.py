"""cka-extract killed with SIGKILL, SIGTERM and SIGINT at random moments, uncompressed, gzip and LZ4 (a
sample of tests/hardening/kill_loop.py): the final path holds nothing or a complete file, and --resume
finishes every run to content identical to an uninterrupted run. Two runs to one output: the second touches
nothing. Readers of a file that is still being written get a clear "incomplete" error. (The store-level
version, a writer process killed after a chosen batch, is tests/store/test_crash.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cka_offline.errors import IncompleteFileError
from cka_offline.store.reader import open_activations

from . import kill_loop
from .builders import BIN, invoke, npy_folder

#: kills per compression and signal; the suite runs a small sample, docs/reliability.md reports a full
#: run (CKA_KILL_LOOPS=20, or python -m tests.hardening.kill_loop)
KILLS = int(os.environ.get("CKA_KILL_LOOPS", "2"))


def test_kills_at_random_moments_then_resume(tmp_path):
    """SIGKILL, SIGTERM and Ctrl-C at random moments (from just before the file is created to past the end
    of the run), for uncompressed, gzip and LZ4 files: afterwards the final path holds nothing or a file
    identical to an uninterrupted run's, and --resume finishes every interrupted run to an identical file
    (or refuses with one line, and --overwrite then gives it); nothing else is left in the folder."""
    report = kill_loop.run(tmp_path, kills=KILLS, rows=6000, seed=int(os.environ.get("CKA_KILL_SEED", "20")))
    print(report.table())
    assert not report.failures, "\n".join(report.failures)
    total = report.total()
    assert sum(total[o] for o in kill_loop.OUTCOMES) == KILLS * 9
    assert total["mid-write"] >= KILLS * 9 // 3, report.table()  # the random moments do land mid-write


def _damage_counted_chunk(partial: Path, how: str) -> None:
    """Leave rows that ``partial`` counts as written readable but wrong, as a torn write or a chunk index
    pointing at the wrong place would: chunk 1 of layer L0001 gets other bytes (``garbage``) or those of
    chunk 3 (``another chunk``). HDF5 reads both without an error (no filter checks uncompressed chunks)."""
    with h5py.File(partial, "r") as h:
        ds = h["layers/L0001"]
        target = ds.id.get_chunk_info_by_coord((64, 0))
        source = ds.id.get_chunk_info_by_coord((3 * 64, 0))
    with open(partial, "r+b") as f:
        if how == "garbage":
            data = np.random.default_rng(1).random(target.size // 4, dtype=np.float32).tobytes()
        else:
            f.seek(source.byte_offset)
            data = f.read(source.size)
        f.seek(target.byte_offset)
        f.write(data)


@pytest.mark.parametrize("how", ["garbage", "another chunk", "no checksums (a 1.1 partial)"])
def test_counted_rows_that_read_back_wrong_are_extracted_again(tmp_path, how):
    """--resume keeps only the counted rows that read back as they were written (their /checksums entry):
    a damaged chunk and everything after it is extracted again, and the file equals an uninterrupted run's.
    A partial from a writer without checksums (format 1.1) is resumed as before, and gets them."""
    from .builders import full_content

    npy_folder(tmp_path / "acts", n=600, widths=(16, 8))
    cmd = [str(BIN / "cka-extract"), "../acts", "-o", "out.h5", "-b", "10", "--chunk-rows", "64", "-q"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    subprocess.run(cmd, cwd=ref, check=True)
    reference = full_content(str(ref / "out.h5"))
    partial = run / "out.h5.partial"
    partial.write_bytes((ref / "out.h5").read_bytes())
    with h5py.File(partial, "r+") as h:  # an interrupted run's partial: 450 rows counted
        h.attrs.modify("rows_complete", 450)
        h.attrs.modify("complete", False)
        if how.startswith("no checksums"):
            del h["checksums"]
    if not how.startswith("no checksums"):
        _damage_counted_chunk(partial, how)
    r = subprocess.run([*cmd, "--resume"], cwd=run, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    if how.startswith("no checksums"):
        assert r.stderr == ""
    else:
        assert "rows 64-450 do not read back as written" in r.stderr and "checksum" in r.stderr
    assert full_content(str(run / "out.h5")) == reference
    assert sorted(os.listdir(run)) == ["out.h5"]


@pytest.fixture
def writer_running(tmp_path):
    """A cka-extract process in the middle of writing ``out.h5.partial`` (one flush per 5 rows)."""
    acts = npy_folder(tmp_path / "acts", n=40_000, widths=(32,))
    proc = subprocess.Popen(
        [str(BIN / "cka-extract"), acts, "-o", str(tmp_path / "out.h5"), "-b", "5", "-q"], stderr=subprocess.PIPE
    )
    _wait_for_rows(tmp_path / "out.h5.partial", proc)
    yield tmp_path
    proc.kill()
    proc.communicate()


def test_a_second_run_to_the_same_output_touches_nothing(tmp_path):
    """Two cka-extract runs to one output: the second (plain, --resume or --overwrite) is refused with one
    line naming the running process and its partial file, which stays byte for byte as it was; the first
    then finishes to a complete, correct file. The first is paused (SIGSTOP) while the others try, so the
    race is the same on a fast or a busy machine."""
    acts = npy_folder(tmp_path / "acts", n=2000, widths=(32,))
    out, partial = tmp_path / "out.h5", tmp_path / "out.h5.partial"
    first = subprocess.Popen([str(BIN / "cka-extract"), acts, "-o", str(out), "-b", "5", "-q"], stderr=subprocess.PIPE)
    try:
        _wait_for_rows(partial, first)
        first.send_signal(signal.SIGSTOP)
        before = (os.stat(partial).st_ino, partial.read_bytes())
        expected = (
            f"cka-extract: error: {out}: another process (pid {first.pid} on "
            f"{socket.gethostname()}: {BIN / 'cka-extract'} {acts} -o {out} -b 5 -q) is writing {partial} right "
            "now; nothing was touched: wait for it to finish, or stop it first, or choose another -o\n"
        )
        second = subprocess.run(
            [str(BIN / "cka-extract"), acts, "-o", str(out), "-q"], capture_output=True, text=True, timeout=120
        )
        assert (second.returncode, second.stderr) == (3, expected)
        for extra in (["--resume"], ["--overwrite"], ["--resume", "--overwrite"]):
            r = invoke("cka-extract", [acts, "-o", out, "-q", *extra])
            assert (r.exit_code, r.stderr) == (3, expected), extra
        assert (os.stat(partial).st_ino, partial.read_bytes()) == before
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    with open_activations(str(out)) as f:
        assert (f.read(f.layer_names[0], 0, 2000) == np.load(Path(acts) / "l0.npy")).all()
    assert sorted(os.listdir(tmp_path)) == ["acts", "out.h5"]


def _wait_for_rows(partial: Path, proc: subprocess.Popen) -> None:
    """Until ``partial`` counts some rows as written."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if partial.exists():
            try:  # the writer may be mid-flush: then try again
                with h5py.File(partial, "r", locking=False) as h:
                    if h.attrs.get("rows_complete", 0) > 0:
                        return
            except (OSError, KeyError, RuntimeError):
                pass
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.01)
    raise AssertionError(f"{partial} counted no rows in 120 s")


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
