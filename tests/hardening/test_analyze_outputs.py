"""cka-analyze and cka-inspect at their edges (issue 15): outputs that are inputs, folders or unwritable; a
full disk and a file size limit while writing a result or a plot; files of 0 rows; numeric options out of
range; non-finite values and overflow in every estimator and engine, with no Python warning on the terminal.

Each case runs the real command (the installed console script in a subprocess where the process itself
matters: file size limits, warnings printed by threads; click's CliRunner elsewhere) and checks the exit
code, that stderr is exactly the one expected line, and what is left on disk.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from cka_offline.analysis import analyze
from cka_offline.errors import ActivationValueError

from ..analyze_fixtures import chain_activations, write_acts
from .builders import BIN, acts, error_line, invoke


def script(prog: str) -> str:
    """The installed console script (the project's venv, else the one on PATH)."""
    path = BIN / prog
    return str(path) if path.exists() else str(shutil.which(prog) or prog)


def digest(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def pair(tmp_path):
    a = acts(tmp_path / "a.h5", 40)
    b = acts(tmp_path / "b.h5", 40, seed=1)
    return Path(a), Path(b)


@pytest.fixture
def no_analysis(monkeypatch):
    """The analysis must not start: every case below is refused before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the analysis ran although the outputs were refused")

    monkeypatch.setattr("cka_offline.analysis.analyze", refuse)


# ---------------------------------------------------------------- 1. outputs that are inputs, folders, unwritable
def _links(tmp_path: Path, a: Path) -> dict[str, str]:
    (tmp_path / "link.h5").symlink_to(a)
    os.link(a, tmp_path / "hard.h5")
    return {
        "same path": str(a),
        "./a.h5": os.path.join(".", os.path.relpath(a)),
        "symlink": str(tmp_path / "link.h5"),
        "hard link": str(tmp_path / "hard.h5"),
        "through ..": str(tmp_path / "sub" / ".." / "a.h5"),
    }


@pytest.mark.parametrize("how", ["same path", "./a.h5", "symlink", "hard link", "through .."])
def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path, pair, monkeypatch, no_analysis, how):
    a, b = pair
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    out = _links(tmp_path, a)[how]
    before = digest(a)
    r = invoke("cka-analyze", [a, b, "-o", out, "--overwrite"])
    assert r.exit_code == 3
    assert error_line(r, "cka-analyze") == (
        f"-o {out} is one of the inputs ({a}); writing it would destroy that input (even with --overwrite): "
        "choose another -o"
    )
    assert digest(a) == before


def test_an_input_given_as_a_link_and_the_output_as_the_file(tmp_path, pair, no_analysis):
    a, b = pair
    (tmp_path / "link.h5").symlink_to(a)
    r = invoke("cka-analyze", [tmp_path / "link.h5", b, "-o", a, "--overwrite"])
    assert r.exit_code == 3 and "is one of the inputs" in error_line(r, "cka-analyze")


def test_a_plot_or_a_shard_of_a_glob_that_is_an_input(tmp_path, no_analysis):
    """The heatmap path (one per pair: the ``_i-j`` siblings too) and a shard matched by a quoted glob."""
    x = acts(tmp_path / "x.png", 40)  # an activation file may be called anything
    b = acts(tmp_path / "b.h5", 40, seed=1)
    r = invoke("cka-analyze", [x, b, "--plot", x, "--overwrite"])
    assert r.exit_code == 3 and error_line(r, "cka-analyze").startswith(f"--plot {x} is one of the inputs ({x})")
    c = acts(tmp_path / "c.h5", 40, seed=2)
    sibling = acts(tmp_path / "p_0-2.png", 40, seed=3)
    r = invoke("cka-analyze", [sibling, b, c, "--plot", tmp_path / "p.png", "--overwrite"])
    assert r.exit_code == 3 and error_line(r, "cka-analyze").startswith(f"--plot {tmp_path / 'p_0-2.png'} is one")
    r = invoke("cka-analyze", [str(tmp_path / "[bc].h5"), "-o", b, "--overwrite"])
    assert r.exit_code == 3 and error_line(r, "cka-analyze").startswith(f"-o {b} is one of the inputs")


def test_two_outputs_that_are_one_file(tmp_path, pair, no_analysis):
    a, b = pair
    out = tmp_path / "r.png"
    r = invoke("cka-analyze", [a, b, "-o", out, "--format", "json", "--plot", out])
    assert r.exit_code == 3
    assert error_line(r, "cka-analyze") == f"--plot {out} and -o {out} are the same file; give them different names"
    assert not out.exists()


@pytest.mark.parametrize("where", ["folder", "missing folder", "file as folder"])
def test_an_output_folder_or_a_missing_one_fails_before_any_work(tmp_path, pair, no_analysis, where):
    a, b = pair
    (tmp_path / "out.json").mkdir()
    out = {
        "folder": tmp_path / "out.json",
        "missing folder": tmp_path / "nope" / "r.json",
        "file as folder": a / "r.json",
    }[where]
    expected = {
        "folder": f"-o {out} is a folder; give a file name (-o {out / 'NAME'})",
        "missing folder": f"cannot write {out}: folder {tmp_path / 'nope'} does not exist; create it first",
        "file as folder": f"cannot write {out}: {a} is not a folder; choose another -o",
    }[where]
    for flags in ([], ["--overwrite"]):
        r = invoke("cka-analyze", [a, b, "-o", out, *flags])
        assert r.exit_code == 3 and error_line(r, "cka-analyze") == expected


@pytest.mark.parametrize("what", ["missing", "file"])
def test_a_scratch_dir_that_is_not_a_folder(tmp_path, pair, no_analysis, what):
    a, b = pair
    scratch = tmp_path / "scratch" if what == "missing" else a
    r = invoke("cka-analyze", [a, b, "--scratch-dir", scratch])
    suffix = " (it does not exist)" if what == "missing" else ""
    assert r.exit_code == 3
    assert error_line(r, "cka-analyze") == f"--scratch-dir {scratch} is not a folder{suffix}; create it or give another"


def test_an_output_folder_without_write_permission(tmp_path, pair):
    """Refused before any work (the installed script, as root without the capabilities that ignore mode
    bits: see test_disk_and_interrupts.test_output_folder_without_write_permission)."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permission bits cannot be enforced")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]
    a, b = pair
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for option, name in (("-o", "r.json"), ("--plot", "p.png")):
            r = subprocess.run(
                [*prefix, script("cka-analyze"), str(a), str(b), option, str(ro / name), "-q", "--epochs", "1000000"],
                capture_output=True,
                text=True,
                timeout=120,
            )  # a million epochs: only a refusal before the analysis ends in time
            assert r.returncode == 3, r.stderr
            assert (
                r.stderr == f"cka-analyze: error: {ro / name}: folder {ro} is not writable; choose another {option}\n"
            )
            assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------- 2. full disk, file size limit
_LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
if {skip_check}:  # the disk fills between the check and the write: the write itself fails
    import cka_offline.files as files
    real = files.room_error
    files.room_error = lambda path, need, exc=None: None if exc is None else real(path, need, exc)
from cka_offline.cli.analyze import main
sys.argv = ["cka-analyze", *sys.argv[1:]]
main(prog_name="cka-analyze")
"""


@pytest.mark.parametrize(
    "name,skip_check",
    [("r.h5", False), ("r.h5", True), ("r.json", True), ("r.csv", True), ("p.png", True)],
)
def test_a_result_or_plot_past_the_file_size_limit_is_one_line(tmp_path, pair, name, skip_check):
    """RLIMIT_FSIZE in the command's process: refused before writing, or -- as when another process fills
    the disk after the check -- the write fails (EFBIG): one line, exit 3, no file, no temporary file, no
    HDF5 messages, no crash (the result used to be written by HDF5 itself, which segfaulted)."""
    a, b = pair
    out = tmp_path / "out"
    out.mkdir()
    option = "--plot" if name.endswith(".png") else "-o"
    code = _LIMITED.format(limit=200, skip_check=skip_check)
    r = subprocess.run(
        [sys.executable, "-c", code, str(a), str(b), "-m", "4", "-q", option, str(out / name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 3, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(
        f"cka-analyze: error: {out / name}: the file would grow past this process's file size limit (200 bytes, "
        "ulimit -f; "
    ) and lines[0].endswith("needed); raise the limit, or write it elsewhere"), lines[0]
    assert os.listdir(out) == []


def test_a_full_disk_is_one_line_naming_the_space_needed(tmp_path, pair, monkeypatch):
    """statvfs reports 40 KiB free: the result (.h5: about 10 KiB) plus the margin does not fit."""
    import cka_offline.files as files

    real = os.statvfs

    def nearly_full(path):
        st = real(path)
        return os.statvfs_result(
            (st.f_bsize, 4096, st.f_blocks, 10, 10, st.f_files, st.f_ffree, st.f_favail, st.f_flag, st.f_namemax)
        )

    monkeypatch.setattr(files.os, "statvfs", nearly_full)
    a, b = pair
    out = tmp_path / "out"
    out.mkdir()
    for name, option in (("r.h5", "-o"), ("p.png", "--plot")):
        r = invoke("cka-analyze", [a, b, "-m", "4", "-q", option, out / name])
        assert r.exit_code == 3
        line = error_line(r, "cka-analyze")
        assert line.startswith(f"{out / name}: the disk is full (40.0 KiB free in {out}, ") and line.endswith(
            " needed); free space, or write it elsewhere"
        ), line
        assert os.listdir(out) == []


# ---------------------------------------------------------------- 3. files of 0 rows
def empty_file(path: Path, tmp_path: Path) -> str:
    """A valid activation file of 0 examples (the writer itself refuses to write one; another writer of the
    format may): a 4-row file's attributes with empty datasets."""
    src = acts(tmp_path / "src4.h5", 4)
    with h5py.File(src, "r") as s, h5py.File(path, "w") as d:
        d.attrs.update(dict(s.attrs))
        d.attrs.update({"n_examples": 0, "rows_complete": 0, "chunk_rows": 1})
        d.create_dataset("ids", data=np.zeros(0, np.int64))
        layers = d.create_group("layers")
        layers.attrs.update(dict(s["layers"].attrs))
        for key, ds in s["layers"].items():
            width = ds.shape[1]
            new = layers.create_dataset(key, shape=(0, width), dtype="f4", chunks=(1, width), maxshape=(None, width))
            new.attrs.update(dict(ds.attrs))
    os.remove(src)
    return str(path)


def test_inspect_and_analyze_a_file_of_0_rows(tmp_path, pair):
    z = empty_file(tmp_path / "z.h5", tmp_path)
    r = invoke("cka-inspect", [z])
    assert r.exit_code == 0, r.output
    assert "  examples    0 (the file holds no examples: cka-analyze needs at least 4)" in r.stdout
    assert "conv1  0x6 " in r.stdout and r.stderr == ""
    r = invoke("cka-inspect", ["--json", z])
    assert r.exit_code == 0 and '"n_examples": 0' in r.stdout and '"first": null' in r.stdout
    for args in ([z], [z, pair[0]], [pair[0], z, "--intersection"], [z, "--estimator", "full"]):
        r = invoke("cka-analyze", args)
        assert r.exit_code == 3
        assert error_line(r, "cka-analyze") == (
            f"{z} holds no examples (0 rows); CKA needs at least 4 examples in every file: extract it again from "
            "inputs that are not empty"
        )


# ---------------------------------------------------------------- 4. numeric options
@pytest.mark.parametrize(
    "args,message",
    [
        (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range 0<=x<=9223372036854775807."),
        (["--seed", str(2**63)], "Invalid value for '--seed': 9223372036854775808 is not in the range"),
        (["--epochs", "0"], "Invalid value for '--epochs': 0 is not in the range 1<=x<=1000000."),
        (["--epochs", str(10**20)], "Invalid value for '--epochs'"),
        (["-m", "3"], "Invalid value for '--batch-size' / '-m': 3 is not in the range x>=4."),
        (["--n-groups", "1"], "Invalid value for '--n-groups': 1 is not in the range x>=2."),
        (["--rbf-fraction", "nan"], "Invalid value for '--rbf-fraction': 'nan' is not a finite number."),
        (["--rbf-fraction", "inf"], "Invalid value for '--rbf-fraction': 'inf' is not a finite number."),
        (["--rbf-fraction", "0"], "Invalid value for '--rbf-fraction': 0.0 is not in the range x>0."),
        (["--max-memory", "-1G"], "Invalid value for '--max-memory': '-1G' is below 1 byte"),
        (["--max-memory", "nan"], "Invalid value for '--max-memory': 'nan' must be a size such as 8G"),
        (["--max-memory", "0.5"], "Invalid value for '--max-memory': '0.5' is below 1 byte"),
    ],
)
def test_numeric_options_out_of_range_are_usage_errors(pair, no_analysis, args, message):
    r = invoke("cka-analyze", [*pair, *args])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.splitlines()[-1] == f"Error: {message}" or message in r.stderr.splitlines()[-1], r.stderr
    assert "Traceback" not in r.stderr


def test_many_jackknife_groups_allocate_only_those_formed(pair):
    """--n-groups beyond the minibatches of an epoch used to allocate (n_groups, L, L) sums: 10**12 of them
    asked for 1.5e13 bytes."""
    r = invoke("cka-analyze", [*pair, "-m", "8", "--n-groups", str(10**12), "-q", "--no-hash"])
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------- 5. non-finite values, overflow, warnings
N = 200


def _with(tmp_path: Path, name: str, row: int, value: float, **writer: object) -> str:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6)).astype(np.float32)
    x[row, 2] = value
    layers = {"conv1": x, "fc": rng.normal(size=(N, 3)).astype(np.float32)}
    return write_acts(tmp_path / name, layers, ids=np.arange(1000, 1000 + N), **writer)


def _outside_the_samples(n: int) -> int:
    from cka_offline.analysis import MinibatchPlan
    from cka_offline.analysis.loop import SCALE_SAMPLE

    return sorted(set(range(n)) - set(MinibatchPlan(n, 16).sample(SCALE_SAMPLE).tolist()))[-1]


@pytest.mark.parametrize(
    "args",
    [
        ["--kernel", "linear"],
        ["--kernel", "rbf", "--precision", "float64"],
        ["--estimator", "full-debiased", "--kernel", "rbf"],
        ["--shuffle", "blocks"],
    ],
    ids=["linear", "rbf-float64", "full-debiased-rbf", "hdf5-reader"],
)
def test_inf_is_one_line_naming_file_layer_id_and_row(tmp_path, args):
    """The installed script: stderr is exactly one line (no RuntimeWarning from the Gram threads or the
    reader threads), naming the file, the layer, the example id and its row."""
    row = _outside_the_samples(N)  # found by a minibatch's Grams, not by the scale sample
    path = _with(tmp_path, "inf.h5", row, np.inf, compression="gzip" if "blocks" in args else None)
    r = subprocess.run(
        [script("cka-analyze"), path, "-m", "16", "-q", "--no-hash", *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 3, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(
        f"cka-analyze: error: {path}: layer 'conv1' holds inf for example id {1000 + row} (row {row}; 1 of the "
    ) and lines[0].endswith("CKA needs finite activations -- fix the model or inputs and extract again"), lines[0]


@pytest.mark.parametrize(
    "engine,kernel,bad",
    [("numpy", "linear", np.nan), ("numpy", "rbf", np.inf), ("torch", "linear", np.inf), ("torch", "rbf", -np.inf)],
)
def test_non_finite_in_both_engines_warns_nothing(tmp_path, monkeypatch, engine, kernel, bad):
    """The library, numpy and torch engines on the CPU: the error names file, layer, id and row; no Python
    warning is raised from any thread (np.errstate in the Gram threads)."""
    if engine == "torch":
        pytest.importorskip("torch")
        import cka_offline.analysis.loop as loop

        monkeypatch.setattr(loop, "engine_for", lambda device: "torch")
    row = _outside_the_samples(N)
    path = _with(tmp_path, "bad.h5", row, bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(
            ActivationValueError,
            match=rf"bad\.h5: layer 'conv1' holds -?(nan|inf) for example id "
            rf"{1000 + row} \(row {row}; 1 of the \d+ example\(s\) read hold NaN or Inf\)",
        ):
            analyze(path, batch_size=16, kernel=kernel, device="cpu", hash_files=False)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_overflow_names_the_layer_and_the_example(tmp_path, monkeypatch, engine, kernel):
    """A finite outlier overflows a float32 Gram: the line names the file, the layer and the example. Linear:
    1e25 outside the scale sample (the float64 Grams then run); RBF: +-3e38, inside the bandwidth sample
    (whose scale used to come from the outliers' root mean square, which broke every minibatch)."""
    if engine == "torch":
        pytest.importorskip("torch")
        import cka_offline.analysis.loop as loop

        monkeypatch.setattr(loop, "engine_for", lambda device: "torch")
    row = _outside_the_samples(N) if kernel == "linear" else 150
    value = 1e25 if kernel == "linear" else 3e38
    path = _with(tmp_path, "big.h5", row, value)
    if kernel == "rbf":
        with h5py.File(path, "r+") as h:  # and its mirror image, so the column keeps a mean of about 0
            h["layers/L0000"][row + 1, 2] = -value
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(
            ActivationValueError,
            match=rf"big\.h5: layer 'conv1': its float32 Gram matrix of minibatch \d+ overflows although the "
            rf"activations are finite \(values up to {re.escape(f'{value:.3g}')}, largest for example id {1000 + row}, "
            rf"row {row}\); use --precision float64$",
        ):
            analyze(path, batch_size=16, kernel=kernel, device="cpu", hash_files=False)
    assert [str(w.message) for w in caught] == []
    if kernel == "linear":  # the fix runs (the outlier's own layer has no positive self-HSIC: NaN, with a warning)
        r = analyze(path, batch_size=16, kernel=kernel, precision="float64", device="cpu", hash_files=False)
        assert np.isfinite(r.cka[1:, 1:]).all()


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_subnormal_float32_layers_are_scaled_not_overflowed(tmp_path, kernel):
    """A layer of scale 1e-40 (float32 subnormals) needs a factor 2**133, which is no float32 number: it
    used to become inf and the run failed with "the Grams overflow"; now it equals the unscaled layer's CKA."""
    a = chain_activations(64, seed=4)
    opts = dict(batch_size=16, kernel=kernel, device="cpu", hash_files=False)
    base = analyze(write_acts(tmp_path / "base.h5", a), **opts)
    tiny = {k: (v.astype(np.float64) * 2.0**-140).astype(np.float32) for k, v in a.items()}
    r = analyze(write_acts(tmp_path / "tiny.h5", tiny), **opts)
    np.testing.assert_allclose(r.cka, base.cka, rtol=0, atol=5e-3)  # subnormals keep fewer digits


def test_python_warnings_are_one_line_after_success_and_none_after_an_error(pair, monkeypatch):
    """Warnings of any library (here raised by the analysis itself) are printed once, as one line, after a
    successful run; a failing run prints only its error line."""
    from cka_offline.errors import InputError

    def noisy(*args, **kwargs):
        warnings.warn("divide by zero encountered in matmul", RuntimeWarning, stacklevel=1)
        warnings.warn("divide by zero encountered in matmul", RuntimeWarning, stacklevel=1)
        raise InputError("a.h5: something the person must read")

    monkeypatch.setattr("cka_offline.analysis.analyze", noisy)
    r = invoke("cka-analyze", [*pair])
    assert r.exit_code == 3 and error_line(r, "cka-analyze") == "a.h5: something the person must read"
    r = invoke("cka-analyze", [*pair, "--debug"])
    assert "cka-analyze: warning: divide by zero encountered in matmul (RuntimeWarning)" in r.stderr


def test_a_plot_with_characters_the_font_lacks_warns_once(tmp_path):
    rng = np.random.default_rng(0)
    layers = {"层一": rng.normal(size=(40, 4)).astype(np.float32), "层二": rng.normal(size=(40, 4)).astype(np.float32)}
    path = write_acts(tmp_path / "cjk.h5", layers)
    r = subprocess.run(
        [script("cka-analyze"), path, "-m", "4", "-q", "--plot", str(tmp_path / "p.png")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    if lines:  # a font with CJK glyphs draws them: nothing to say
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith("cka-analyze: warning: the plot's font has no glyph for 3 character(s)"), lines
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_an_error_that_abandons_the_process_is_one_line_and_its_exit_code():
    """A writer whose HDF5 write failed marks its error ``abandon_process``: the command prints the one line
    and ends without running h5py's finalizers (which print tracebacks) or HDF5's close at exit (which
    crashes with SIGSEGV)."""
    code = (
        "from cka_offline.cli.common import cli_errors\n"
        "from cka_offline.errors import OutputError\n"
        "error = OutputError('x.h5: the disk is full; free space and rerun')\n"
        "error.abandon_process = True\n"
        "with cli_errors('cka-extract'):\n"
        "    raise error\n"
        "print('not reached')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (
        3,
        "",
        "cka-extract: error: x.h5: the disk is full; free space and rerun\n",
    )


def test_the_progress_bar_is_erased_on_a_terminal_after_an_error():
    """On a terminal an error leaves its one line only: the bar is cleared (``abandon``), not left drawn."""
    import io

    from cka_offline.cli.common import ProgressBar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for method, last in (("finish", "\n"), ("abandon", "\r")):
        screen = Terminal()
        bar = ProgressBar("analyzing", stream=screen)
        bar(4, 200)
        bar(8, 200)
        getattr(bar, method)()
        text = screen.getvalue()
        assert text.endswith(last) and "4/200" in text, (method, text)
        if method == "abandon":
            assert text.rsplit("\r", 2)[-2].strip() == ""  # the bar's line overwritten with blanks


def test_a_scratch_folder_that_fills_up_is_one_line_not_sigbus(tmp_path, monkeypatch):
    """Compressed layers are decompressed into a memory-mapped scratch file for uniform minibatches. Its
    blocks are reserved first: a write into a mapped page of a full disk kills the process with SIGBUS
    (checked by hand on a full tmpfs). Here the reservation fails as on a full disk (ENOSPC) after the
    free-space check passed: one line naming the layer and the folder, and the scratch folder is removed."""
    import errno

    rng = np.random.default_rng(0)
    layers = {"l0": rng.normal(size=(64, 8)).astype(np.float32), "l1": rng.normal(size=(64, 4)).astype(np.float32)}
    path = write_acts(tmp_path / "gz.h5", layers, compression="gzip")
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    r = invoke("cka-analyze", [path, "-m", "8", "-q", "--scratch-dir", scratch])
    assert r.exit_code == 3
    assert error_line(r, "cka-analyze") == (
        f"layer 'l0' of {path} is stored compressed; decompressing it (2.00 KiB) into {scratch} failed: No space "
        "left on device; give a folder with room that you can write (--scratch-dir), or read whole chunks with "
        "--shuffle blocks"
    )
    assert os.listdir(scratch) == []
