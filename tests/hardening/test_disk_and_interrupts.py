"""A disk that fills up, an output folder without write permission, and Ctrl-C during extraction and
analysis: one error line, the right exit code, nothing at the final path, and --resume completes the file
identically once the cause is gone."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path
from unittest import mock

import pytest

from cka_offline.cli import analyze as cli_analyze
from cka_offline.cli import extract as cli_extract

from .builders import BIN, acts, error_line, full_content, invoke, npy_folder, snapshot

EXTRACT = [str(BIN / "cka-extract"), "../acts", "-o", "out.h5", "-b", "100", "--chunk-rows", "100", "-q"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """2,000 rows of three layers (about 2.6 MB as a file) and the file of an uninterrupted run."""
    root = tmp_path_factory.mktemp("disk")
    npy_folder(root / "acts", n=2000, widths=(256, 48, 16))
    (root / "ref").mkdir()
    subprocess.run(EXTRACT, cwd=root / "ref", check=True, timeout=120)
    return root, full_content(str(root / "ref" / "out.h5"))


def _limited(limit: int):
    def set_limit() -> None:  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


@pytest.mark.parametrize("limit", [3000, 1_500_000])
def test_file_size_limit_mid_write_then_resume(job, tmp_path, limit):
    root, reference = job
    run = root / f"run{limit}"
    run.mkdir()
    r = subprocess.run(EXTRACT, cwd=run, preexec_fn=_limited(limit), capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(
        f"cka-extract: error: out.h5: the file would grow past this process's file size limit ({limit} bytes, ulimit -f"
    )
    assert "raise the limit and rerun" in r.stderr
    assert not (run / "out.h5").exists()
    if limit > 100_000:  # the first batches fit: the partial file is kept, and names itself
        assert (run / "out.h5.partial").exists() and "out.h5.partial is kept for --resume" in r.stderr
    else:
        assert not (run / "out.h5.partial").exists()
    r = subprocess.run([*EXTRACT, "--resume"], cwd=run, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert full_content(str(run / "out.h5")) == reference


def test_disk_full_reported_before_hdf5_writes(tmp_path, monkeypatch):
    """A folder whose file system reports almost no free space (statvfs)."""
    import cka_offline.store.writer as writer

    real = os.statvfs

    def nearly_full(path):
        st = real(path)
        return os.statvfs_result(
            (st.f_bsize, 4096, st.f_blocks, 10, 10, st.f_files, st.f_ffree, st.f_favail, st.f_flag, st.f_namemax)
        )

    folder = npy_folder(tmp_path / "acts", n=2000, widths=(256,))
    monkeypatch.setattr(writer.os, "statvfs", nearly_full)
    r = invoke("cka-extract", [folder, "-o", tmp_path / "out.h5", "-b", "500", "-q"])
    assert r.exit_code == 3
    line = error_line(r, "cka-extract")
    assert line.startswith(f"{tmp_path / 'out.h5'}: the disk is full (0.0 MiB free in {tmp_path}") and line.endswith(
        "free space and rerun"
    )
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.partial").exists()


def test_output_folder_without_write_permission(tmp_path):
    """A folder with mode 0555. Root ignores permission bits, so as root the command runs without the
    capabilities that let it (setpriv drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permission bits cannot be enforced")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]
    folder = npy_folder(tmp_path / "acts", n=50, widths=(4,))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = subprocess.run(
            [*prefix, str(BIN / "cka-extract"), folder, "-o", str(ro / "out.h5"), "-q"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 3, r.stderr
        assert r.stderr == f"cka-extract: error: {ro / 'out.h5'}: folder {ro} is not writable; choose another -o\n"
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


class _InterruptAfter:
    """A progress bar that presses Ctrl-C at its ``n``-th update."""

    def __init__(self, *args, n: int = 3, **kwargs) -> None:
        self.calls, self.n = 0, n

    def __call__(self, done: int, total: int) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt

    def finish(self) -> None:
        pass

    def abandon(self) -> None:  # ProgressBar's: erase the bar after an error
        pass


def test_ctrl_c_during_extraction_then_resume(job, tmp_path, monkeypatch):
    root, reference = job
    monkeypatch.chdir(root)
    (root / "ctrlc").mkdir()
    monkeypatch.chdir(root / "ctrlc")
    with mock.patch.object(cli_extract, "ProgressBar", _InterruptAfter):
        r = invoke("cka-extract", EXTRACT[1:])
    assert r.exit_code == 130
    assert r.stderr == (
        "cka-extract: interrupted; the partial file out.h5.partial was kept: run the same command "
        "with --resume to continue\n"
    )
    assert not Path("out.h5").exists() and Path("out.h5.partial").exists()
    kept = Path("out.h5.partial").read_bytes()
    r = invoke("cka-extract", EXTRACT[1:])  # the same command without --resume
    assert r.exit_code == 3
    assert error_line(r, "cka-extract") == (
        "out.h5.partial holds an interrupted extraction (300 of 2000 rows written); run the same command with "
        "--resume to continue it, or with --overwrite to delete it and start over"
    )
    assert Path("out.h5.partial").read_bytes() == kept
    r = invoke("cka-extract", [*EXTRACT[1:], "--resume"])
    assert r.exit_code == 0, r.stderr
    assert full_content("out.h5") == reference


def test_overwrite_starts_an_interrupted_extraction_over(job, monkeypatch):
    root, reference = job
    (root / "over").mkdir()
    monkeypatch.chdir(root / "over")
    with mock.patch.object(cli_extract, "ProgressBar", _InterruptAfter):
        assert invoke("cka-extract", EXTRACT[1:]).exit_code == 130
    r = invoke("cka-extract", [*EXTRACT[1:], "--overwrite"])
    assert r.exit_code == 0, r.stderr
    assert (
        r.stderr
        == "WARNING cka_offline.store.writer: --overwrite: replacing the interrupted extraction out.h5.partial\n"
    )
    assert sorted(os.listdir(".")) == ["out.h5"]
    content = full_content("out.h5")
    assert content["/"].pop("command") == "cka-extract ../acts -o out.h5 -b 100 --chunk-rows 100 -q --overwrite"
    assert content == {**reference, "/": {k: v for k, v in reference["/"].items() if k != "command"}}


def test_ctrl_c_during_analysis_leaves_nothing(tmp_path):
    a, b = acts(tmp_path / "a.h5", n=200), acts(tmp_path / "b.h5", n=200, seed=1)
    before = snapshot(tmp_path)
    with mock.patch.object(cli_analyze, "ProgressBar", _InterruptAfter):
        r = invoke(
            "cka-analyze",
            [a, b, "-m", "16", "-o", tmp_path / "res.h5", "--plot", tmp_path / "p.png", "--device", "cpu"],
        )
    assert r.exit_code == 130
    assert r.stdout == "" and r.stderr == "cka-analyze: interrupted\n"
    assert snapshot(tmp_path) == before  # no result, no plot, no temporary file


def test_real_sigint_during_extraction(tmp_path):
    """SIGINT to the installed script: a Ctrl-C that lands in one of h5py's finalizers must not be lost."""
    acts_dir = npy_folder(tmp_path / "acts", n=20_000, widths=(32,))
    out = tmp_path / "out.h5"
    proc = subprocess.Popen(
        [str(BIN / "cka-extract"), acts_dir, "-o", str(out), "-b", "5"], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not Path(str(out) + ".partial").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == (
        f"cka-extract: interrupted; the partial file {out}.partial was kept: run the same "
        "command with --resume to continue"
    )
    assert "Exception ignored" not in err and "Traceback" not in err
    assert not out.exists()


def test_sigterm_during_extraction_keeps_the_partial_then_resume(tmp_path):
    """SIGTERM (a Slurm time limit, `kill PID`) is handled as Ctrl-C: the partial file is closed cleanly and
    kept, one line says so, the exit status is 143 (128 + SIGTERM), and --resume finishes it to the file an
    uninterrupted run writes."""
    npy_folder(tmp_path / "acts", n=20_000, widths=(32,))
    cmd = [str(BIN / "cka-extract"), "../acts", "-o", "out.h5", "-b", "5"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    subprocess.run([*cmd, "-q"], cwd=ref, check=True)
    proc = subprocess.Popen([*cmd, "-q"], cwd=run, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (run / "out.h5.partial").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err == (
        "cka-extract: terminated (SIGTERM); the partial file out.h5.partial was kept: run the same "
        "command with --resume to continue\n"
    )
    assert sorted(os.listdir(run)) == ["out.h5.partial"]
    r = subprocess.run([*cmd, "-q", "--resume"], cwd=run, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert full_content(str(run / "out.h5")) == full_content(str(ref / "out.h5"))
