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


def python_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


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
