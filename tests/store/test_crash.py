"""A writer killed with SIGKILL leaves nothing at the final path, and resume completes it identically."""

import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from cka_offline.errors import OutputError, ResumeError
from cka_offline.store.filters import load_plugins
from cka_offline.store.reader import open_activations
from cka_offline.store.schema import layer_key
from cka_offline.store.writer import ActivationWriter, LayerSpec

from . import writer_process

SCRIPT = writer_process.__file__


def _run(path, mode, compression="none"):
    return subprocess.run(
        [sys.executable, SCRIPT, str(path), mode, compression], capture_output=True, text=True, check=True
    )


def file_content(path):
    """Everything in the file except the creation time."""
    load_plugins()  # LZ4 layers
    out = {}
    with h5py.File(path, "r") as h:
        out["attrs"] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in h.attrs.items() if k != "created"}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj[()].tobytes(), obj.dtype.str, obj.chunks, {k: str(v) for k, v in obj.attrs.items()})

        h.visititems(visit)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.h5"
    _run(path, "fresh")
    return file_content(path)


@pytest.mark.parametrize(
    ("kill_after_batches", "compression", "resume_compression"),
    [(1, "none", "none"), (7, "gzip", "gzip"), (23, "lz4", "lz4"), (12, "lz4", "none")],
)
def test_sigkill_then_resume_gives_identical_file(
    tmp_path, reference, kill_after_batches, compression, resume_compression
):
    """The resume runs in a fresh process: it must make the LZ4 filter available itself, also when the run
    that resumes writes without compression (the last case: the rows it keeps are read back from LZ4)."""
    path = tmp_path / "out.h5"
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, str(path), "fresh", compression], stdout=subprocess.PIPE, text=True
    )
    for _ in range(kill_after_batches):
        line = proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    stored = int(line.split()[1])
    if compression != "none":  # compressed layers are stored a whole chunk (16 rows) at a time
        assert stored == kill_after_batches * 10 // 16 * 16
    assert not path.exists(), "a killed writer must leave nothing at the final path"
    assert (tmp_path / "out.h5.partial").exists()
    _run(path, "resume", resume_compression)
    assert path.exists() and not (tmp_path / "out.h5.partial").exists()
    assert sorted(os.listdir(tmp_path)) == ["out.h5"]  # no lock or scratch file left
    assert file_content(path) == reference
    with open_activations(path) as f:
        assert f.n_examples == writer_process.N
        np.testing.assert_allclose(f.read("b.y", 0, 400), writer_process.rows(0, 400)["b.y"], atol=1e-6)


def test_resume_refuses_other_key(tmp_path):
    path = tmp_path / "o.h5"
    specs = [LayerSpec("x", (3,), "none", 3)]
    w = ActivationWriter(path, ids=np.arange(10), layers=specs, provenance={}, resume_key="A")
    w.write({"x": np.ones((4, 3))})
    w.abort()
    with pytest.raises(ResumeError, match="different model, inputs or options.*--overwrite"):
        ActivationWriter(path, ids=np.arange(10), layers=specs, provenance={}, resume=True, resume_key="B")
    with pytest.raises(ResumeError, match="other examples or layers"):
        ActivationWriter(path, ids=np.arange(1, 11), layers=specs, provenance={}, resume=True, resume_key="A")
    w = ActivationWriter(path, ids=np.arange(10), layers=specs, provenance={}, resume=True, resume_key="A")
    assert w.rows_done == 4
    w.write({"x": np.ones((6, 3))})
    w.close()
    assert open_activations(path).n_examples == 10


def test_unreadable_partial_is_refused_and_replaced_only_with_overwrite(tmp_path):
    path = tmp_path / "o.h5"
    partial = tmp_path / "o.h5.partial"
    partial.write_bytes(b"garbage" * 100)
    specs = [LayerSpec("x", (3,), "none", 3)]
    with pytest.raises(
        ResumeError, match=r"o\.h5\.partial cannot be resumed: it is damaged \(not a readable HDF5.*--overwrite"
    ):
        ActivationWriter(path, ids=np.arange(5), layers=specs, provenance={}, resume=True, resume_key="A")
    assert partial.read_bytes() == b"garbage" * 100
    with pytest.raises(
        OutputError,
        match=r"holds an interrupted extraction; run the same command with --resume.*--overwrite to delete it",
    ):
        ActivationWriter(path, ids=np.arange(5), layers=specs, provenance={}, resume_key="A")
    for resume in (True, False):  # a damaged partial with --resume --overwrite, then a plain --overwrite
        w = ActivationWriter(
            path, ids=np.arange(5), layers=specs, provenance={}, resume=resume, overwrite=True, resume_key="A"
        )
        assert w.rows_done == 0
        w.abort()
    w = ActivationWriter(path, ids=np.arange(5), layers=specs, provenance={}, resume=True, resume_key="A")
    w.write({"x": np.ones((5, 3))})
    w.close()
    assert open_activations(path).n_examples == 5


SPECS = [LayerSpec("x", (3,), "none", 3), LayerSpec("y", (2,), "none", 2)]


def _rows(start, stop):
    i = np.arange(start, stop, dtype=np.float32)[:, None]
    return {"x": i * np.array([1, 2, 3], np.float32), "y": -i * np.array([1, 1], np.float32)}


def _writer(path, **kwargs):
    kwargs.setdefault("resume_key", "K")
    return ActivationWriter(path, ids=np.arange(40), layers=SPECS, provenance={}, chunk_rows=8, **kwargs)


def _check_complete(path):
    with open_activations(path) as f:
        np.testing.assert_array_equal(f.read("x", 0, 40), _rows(0, 40)["x"])
        np.testing.assert_array_equal(f.read("y", 0, 40), _rows(0, 40)["y"])


def test_a_second_writer_to_the_same_output_touches_nothing(tmp_path):
    path = tmp_path / "o.h5"
    first = _writer(path)
    first.write(_rows(0, 10))
    partial = tmp_path / "o.h5.partial"
    before = (os.stat(partial).st_ino, partial.read_bytes())
    for kwargs in ({}, {"resume": True}, {"overwrite": True}, {"resume": True, "overwrite": True}):
        with pytest.raises(
            OutputError, match=r"o\.h5: another process \(pid \d+ .*\) is writing .*o\.h5\.partial right now; nothing"
        ):
            _writer(path, **kwargs)
    assert (os.stat(partial).st_ino, partial.read_bytes()) == before
    first.write(_rows(10, 40))
    first.close()
    _check_complete(path)
    assert sorted(os.listdir(tmp_path)) == ["o.h5"]  # the lock file goes with the lock
    _writer(path, overwrite=True).abort()  # free again


@pytest.mark.parametrize("how", ["replaced", "removed"])
def test_a_partial_changed_under_the_writer_is_not_renamed(tmp_path, how):
    path = tmp_path / "o.h5"
    w = _writer(path)
    w.write(_rows(0, 40))
    partial = tmp_path / "o.h5.partial"
    if how == "replaced":  # another program (not cka-extract: it would need the lock) puts its own file there
        other = tmp_path / "other"
        other.write_bytes(partial.read_bytes())
        os.replace(other, partial)
    else:
        os.remove(partial)
    with pytest.raises(OutputError, match=rf"o\.h5\.partial was {how} .*while this run wrote it; nothing was moved to"):
        w.close()
    assert not path.exists()
    assert not (tmp_path / "o.h5.lock").exists()


def test_a_failed_final_rename_keeps_the_complete_partial_for_resume(tmp_path, monkeypatch):
    """The disk fills (or the folder's permissions change) just when the finished file is renamed."""
    import cka_offline.store.writer as writer

    path = tmp_path / "o.h5"
    real = os.replace

    def full(src, dst):
        if os.fspath(dst) == str(path):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(writer.os, "replace", full)
    w = _writer(path, compression="gzip")
    w.write(_rows(0, 40))
    with pytest.raises(
        OutputError,
        match=r"cannot move the finished file into place \(No space left on device\); it is kept complete at .*--resume",
    ):
        w.close()
    monkeypatch.undo()
    assert not path.exists()
    w = _writer(path, compression="gzip", resume=True)
    assert w.rows_done == 40
    w.close()
    _check_complete(path)


@pytest.mark.parametrize("compression", ["gzip", "lz4"])
def test_resume_drops_back_to_the_last_chunk_that_reads_back(tmp_path, caplog, compression):
    """A counted chunk whose bytes no longer decompress (what a kill in the middle of HDF5's flush can
    leave): the resume keeps the chunks before it and extracts the rest again."""
    path = tmp_path / "o.h5"
    w = _writer(path, compression=compression)
    w.write(_rows(0, 30))
    assert w.rows_stored == 24  # whole chunks of 8 rows only
    w.abort()
    partial = tmp_path / "o.h5.partial"
    with h5py.File(partial, "r") as h:
        info = h["layers"][layer_key(1)].id.get_chunk_info_by_coord((8, 0))  # layer y, rows 8-15
    with open(partial, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    with caplog.at_level("WARNING", logger="cka_offline.store.writer"):
        w = _writer(path, compression=compression, resume=True)
    assert w.rows_done == 8
    assert "rows 8-24 do not read back" in caplog.text
    w.write(_rows(8, 40))
    w.close()
    _check_complete(path)


def test_attributes_are_only_updated_in_place_after_creation(tmp_path, monkeypatch):
    """h5py's attrs[key] = value deletes the attribute and creates it again: a kill in between loses it.
    After the file is made, the writer never creates (or deletes) an attribute."""
    w = _writer(path := tmp_path / "o.h5", compression="gzip")

    def refused(*args, **kwargs):
        raise AssertionError("an attribute was created after the file was made")

    monkeypatch.setattr(h5py.AttributeManager, "create", refused)
    monkeypatch.setattr(h5py.AttributeManager, "__delitem__", refused)
    for start in range(0, 40, 5):
        w.write(_rows(start, start + 5))
    w.close()
    monkeypatch.undo()
    _check_complete(path)
