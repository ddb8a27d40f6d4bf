"""The README's Python API section runs exactly as printed: its ```python blocks, in order, in one
namespace, from a folder laid out like the repository (sample_data/ beside the outputs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def code_blocks(section: str, language: str = "python") -> list[str]:
    """The ``language`` code blocks of the README section whose heading starts with ``section``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(rf"```{language}\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


def python_blocks(section: str) -> list[str]:
    return code_blocks(section, "python")


@pytest.mark.slow
def test_the_python_api_section_runs_as_printed(tmp_path):
    blocks = python_blocks("Python API")
    assert len(blocks) >= 2 and "DataLoader" in blocks[0]
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data")
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks))
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    # what the blocks promise: files to share, a saved result, a heatmap, progress lines in this log
    for name in ("a.h5", "b.h5", "mine.h5", "cka.json", "cka.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert re.search(r"^extracting: 100%.*1797/1797", done.stderr, flags=re.M), done.stderr[-2000:]
    assert "conv1" in done.stdout and "fc2" in done.stdout  # the summary names the layers


def bash_blocks(section: str) -> list[str]:
    return code_blocks(section, "bash")


@pytest.mark.slow
def test_the_command_examples_run_as_printed(tmp_path):
    """Every command of the cka-extract, cka-analyze and cka-inspect sections, in order, through the
    installed commands (a ResNet-18 on a class-sorted image folder, an ONNX model, MiniLM on text, a
    collaborator's arrays; then every analysis), with no warning but the few-groups ones."""
    blocks = [b for s in ("`cka-extract`", "`cka-analyze`", "`cka-inspect`") for b in bash_blocks(s)]
    assert len(blocks) == 3 and "make_examples.py" in blocks[0]
    (tmp_path / "sample_data").symlink_to(ROOT / "sample_data")
    (tmp_path / "readme.sh").write_text("set -euo pipefail\n" + "\n".join(blocks))
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "MPLBACKEND": "Agg", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["HF_HUB_OFFLINE"] = "1"  # nothing may come from the network
    done = subprocess.run(["bash", "readme.sh"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("a.h5", "b.h5", "r18.h5", "minilm.h5", "theirs.h5", "cka.json", "three.h5", "r18.png", "minilm.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    import numpy as np

    from cka_offline.results import load_result
    from cka_offline.store.reader import open_activations

    with open_activations(str(tmp_path / "r18.h5")) as f:  # `layer*`: the four stages, ids from the folders
        assert f.layer_names == ["layer1", "layer2", "layer3", "layer4"] and f.n_examples == 300
        assert f.ids[0] == "0/0000.png" and [f.layer(n).features for n in f.layer_names] == [64, 128, 256, 512]
    with open_activations(str(tmp_path / "minilm.h5")) as f:
        assert f.layer_names == [f"encoder.layer.{k}" for k in range(6)] and f.layer("encoder.layer.0").features == 384
    three = load_result(str(tmp_path / "three.h5"))
    assert len(three.files) == 3 and three.pairs == [(0, 1), (0, 2), (1, 2)]
    assert np.isfinite(three.matrix(0, 1)).all()
