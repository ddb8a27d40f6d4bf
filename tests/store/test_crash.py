"""A writer killed with SIGKILL leaves nothing at the final path, and resume completes it identically."""

import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from cka_offline.errors import OutputError, ResumeError
from cka_offline.store.reader import open_activations
from cka_offline.store.writer import ActivationWriter, LayerSpec

from . import writer_process

SCRIPT = writer_process.__file__


def _run(path, mode):
    return subprocess.run([sys.executable, SCRIPT, str(path), mode], capture_output=True, text=True, check=True)


def file_content(path):
    """Everything in the file except the creation time."""
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


@pytest.mark.parametrize("kill_after_batches", [1, 7, 23])
def test_sigkill_then_resume_gives_identical_file(tmp_path, reference, kill_after_batches):
    path = tmp_path / "out.h5"
    proc = subprocess.Popen([sys.executable, SCRIPT, str(path), "fresh"], stdout=subprocess.PIPE, text=True)
    for _ in range(kill_after_batches):
        assert proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert not path.exists(), "a killed writer must leave nothing at the final path"
    assert (tmp_path / "out.h5.partial").exists()
    _run(path, "resume")
    assert path.exists() and not (tmp_path / "out.h5.partial").exists()
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
