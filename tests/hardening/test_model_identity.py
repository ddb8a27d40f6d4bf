"""A model's identity covers its code and its parameters and buffers after loading: --resume and the
shard checks notice an edited factory, other weights, another seed; the provenance records both parts."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from cka_offline_torch.extractor import TorchExtractor  # noqa: E402

from .builders import error_line, invoke  # noqa: E402

FACTORY = """
import os
import torch
from torch import nn

from helpers import SCALE


class Net(nn.Module):
    calls = 0

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.act = nn.Tanh()

    def forward(self, x):
        Net.calls += 1
        if os.environ.get("STOP_AT_CALL") == str(Net.calls):
            raise KeyboardInterrupt  # a Ctrl-C in the middle of the extraction
        return self.act(self.fc(x) * SCALE)


def make(seed=0):
    torch.manual_seed(seed)
    return Net()


def pretrained(path):
    model = Net()
    model.load_state_dict(torch.load(path, weights_only=True))  # like from_pretrained: weights inside
    return model
"""


@pytest.fixture
def project(tmp_path: Path):
    """A factory file, the helper module it imports, weights for it and inputs."""
    (tmp_path / "model.py").write_text(FACTORY)
    (tmp_path / "helpers.py").write_text("SCALE = 1.0\n")
    torch.manual_seed(7)
    trained = torch.nn.Sequential()
    trained.fc = torch.nn.Linear(3, 4)
    save_file({f"fc.{k}": v for k, v in trained.fc.state_dict().items()}, str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32))
    return tmp_path


def _identity(source: str, **options) -> dict[str, str]:
    with TorchExtractor(source, options=options) as ex:
        return ex.provenance()


def _extract(root: Path, out: str, *more: str):
    args = [f"{root}/model.py:make", "--weights", root / "w.safetensors", "-i", root / "x.npz", "-o", root / out]
    return invoke("cka-extract", [*args, "-b", "4", "-q", *more])


def test_resume_after_editing_the_factory_is_refused(project, monkeypatch):
    monkeypatch.setenv("STOP_AT_CALL", "3")  # the shape probe, batch 1, then Ctrl-C in batch 2
    r = _extract(project, "o.h5")
    assert r.exit_code == 130 and (project / "o.h5.partial").exists()
    monkeypatch.delenv("STOP_AT_CALL")
    original = (project / "model.py").read_text()
    # an edit to the forward pass: the weights file is the same, the values would not be
    (project / "model.py").write_text(original.replace("* SCALE", "* SCALE * 2"))
    r = _extract(project, "o.h5", "--resume")
    assert r.exit_code == 3
    assert "o.h5.partial was written with a different model" in error_line(r, "cka-extract")
    # an edit to a module the factory imports counts too
    (project / "model.py").write_text(original)
    (project / "helpers.py").write_text("SCALE = 3.0\n")
    r = _extract(project, "o.h5", "--resume")
    assert r.exit_code == 3 and "different model" in error_line(r, "cka-extract")
    # the same code and weights resume (the partial was kept), and give the uninterrupted run's file
    (project / "helpers.py").write_text("SCALE = 1.0\n")
    r = _extract(project, "o.h5", "--resume")
    assert r.exit_code == 0, r.stderr
    assert _extract(project, "full.h5").exit_code == 0
    with h5py.File(project / "o.h5") as a, h5py.File(project / "full.h5") as b:
        for key in a["layers"]:
            np.testing.assert_array_equal(a["layers"][key][()], b["layers"][key][()])
        assert a.attrs["model_sha256"] == b.attrs["model_sha256"]
        extra = json.loads(a.attrs["extra"])
    # provenance records both parts of the identity, and which files the code is
    assert len(extra["model_code_sha256"]) == 64 and len(extra["model_state_sha256"]) == 64
    assert sorted(Path(p).name for p in json.loads(extra["model_code_files"])) == ["helpers.py", "model.py"]


def test_shards_from_two_versions_of_a_factory_do_not_read_as_one(project):
    assert _extract(project, "s-0.h5", "--shard", "0/2").exit_code == 0
    assert _extract(project, "s-1.h5", "--shard", "1/2").exit_code == 0
    r = invoke("cka-inspect", [project / "s-*.h5"])
    assert r.exit_code == 0, r.stderr  # one version: one logical file
    (project / "model.py").write_text(FACTORY.replace("nn.Tanh()", "nn.Sigmoid()"))
    (project / "s-1.h5").unlink()
    assert _extract(project, "s-1.h5", "--shard", "1/2").exit_code == 0
    r = invoke("cka-inspect", [project / "s-*.h5"])
    assert r.exit_code == 3 and "differs from" in error_line(r, "cka-inspect") and "'model_sha256'" in r.stderr


def test_seeds_weights_and_buffers_change_the_identity(project):
    factory = f"{project}/model.py:make"
    seed0, again, seed1 = (_identity(factory, model_args=f"seed={s}") for s in (0, 0, 1))
    assert seed0["model_sha256"] == again["model_sha256"]
    assert seed0["model_code_sha256"] == seed1["model_code_sha256"]  # same code ...
    assert seed0["model_sha256"] != seed1["model_sha256"]  # ... other parameters
    # with --weights every seed is overwritten: one identity
    w0, w1 = (_identity(factory, model_args=f"seed={s}", weights=str(project / "w.safetensors")) for s in (0, 1))
    assert w0["model_sha256"] == w1["model_sha256"] != seed0["model_sha256"]
    # weights that the factory loads itself (as from_pretrained does) count as well
    for seed in (1, 2):
        torch.manual_seed(seed)
        torch.save({f"fc.{k}": v for k, v in torch.nn.Linear(3, 4).state_dict().items()}, project / f"p{seed}.pt")
    p1, p2 = (_identity(f"{project}/model.py:pretrained", model_args=f"path={project}/p{s}.pt") for s in (1, 2))
    assert p1["model_code_sha256"] == p2["model_code_sha256"] and p1["model_sha256"] != p2["model_sha256"]


def test_non_persistent_buffers_count(tmp_path):
    (tmp_path / "buf.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self, v):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(2, 2)\n"
        "        self.register_buffer('offset', torch.full((2,), float(v)), persistent=False)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x) + self.offset\n"
        "def make(v=0):\n    torch.manual_seed(0)\n    return M(v)\n"
    )
    a, b = (_identity(f"{tmp_path}/buf.py:make", model_args=f"v={v}") for v in (0, 1))
    assert a["model_sha256"] != b["model_sha256"]


def test_installed_packages_count_by_version_not_torch():
    from importlib.metadata import version

    from cka_offline_torch.identity import package_versions

    assert package_versions(["numpy", "torch", "os"]) == [f"numpy=={version('numpy')}"]
