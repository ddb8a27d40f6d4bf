"""analyze() takes activations from memory (dicts, Activations, torch tensors), opened files and single
paths, besides file paths: the same numbers as from files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cka_offline as ck
from cka_offline.errors import ActivationValueError, InputError
from cka_offline.store.reader import open_activations

from .activation_files import write_acts
from .analyze_fixtures import chain_activations

OPTS = dict(batch_size=16, precision="float64", device="cpu", hash_files=False)


def test_a_dict_in_memory_equals_the_same_arrays_in_a_file(tmp_path):
    a = chain_activations(120, seed=1)
    b = chain_activations(120, widths=(5, 3), seed=2)
    ids = np.array([f"img{k:03d}" for k in range(120)])
    from_files = ck.analyze([write_acts(tmp_path / "a.h5", a, ids), write_acts(tmp_path / "b.h5", b, ids)], **OPTS)
    torch_b = {k: torch.from_numpy(v) for k, v in b.items()}  # tensors are taken as they are
    from_memory = ck.analyze([ck.Activations(a, ids, label="A"), ck.Activations(torch_b, ids, label="B")], **OPTS)
    np.testing.assert_allclose(from_memory.cka, from_files.cka, rtol=0, atol=1e-12)
    np.testing.assert_allclose(from_memory.se, from_files.se, rtol=0, atol=1e-12)
    assert [f.label for f in from_memory.files] == ["A", "B"]
    assert from_memory.files[0].provenance == {"source": "memory"} and from_memory.files[0].paths == []
    assert [f.layers for f in from_memory.files] == [list(a), list(b)]


def test_one_source_on_its_own_and_mixed_sources(tmp_path):
    a = chain_activations(80, seed=3)
    path = write_acts(tmp_path / "a.h5", a)
    alone = ck.analyze(path, **OPTS)  # a single path, not a list (was iterated character by character)
    assert alone.files[0].label == path and alone.matrix().shape == (3, 3)
    assert np.allclose(ck.analyze(a, **OPTS).cka, alone.cka, atol=1e-12)  # a single dict
    with open_activations(path) as opened:
        mixed = ck.analyze([opened, {k: v.astype(np.float64) for k, v in a.items()}], **OPTS)
        assert opened.layer_names == list(a)  # left open for its owner
    assert [f.label for f in mixed.files] == [path, "memory[1]"] and mixed.pairs == [(0, 1)]
    np.testing.assert_allclose(np.diag(mixed.matrix(0, 1)), 1.0, atol=1e-12)  # the same arrays, file and memory


@pytest.mark.parametrize(
    "layers, ids, match",
    [
        ({}, None, "hold no layers"),
        ({"a": np.zeros((5, 2)), "b": np.zeros((6, 2))}, None, "different numbers of examples"),
        ({"a": np.arange(10).reshape(5, 2)}, None, "dtype int64; CKA needs floating-point"),
        ({"a": np.zeros((5, 2))}, [1, 2, 3], "3 ids for 5 examples"),
        ({"a": np.zeros((5, 2))}, [1, 1, 2, 3, 4], "must be unique"),
        ({"a": np.zeros((3, 2))}, np.array([2**64 - 1, 1, 2], dtype=np.uint64), "above 2\\*\\*63-1"),
        ({"a": np.zeros((2, 2))}, [b"\xff", b"a"], "not valid UTF-8"),
    ],
)
def test_bad_in_memory_sources_say_what_to_fix(layers, ids, match):
    with pytest.raises(InputError, match=match):
        ck.analyze(ck.Activations(layers, ids) if layers else {}, **OPTS)


def test_non_finite_values_in_memory_name_the_layer_and_example():
    a = chain_activations(40, seed=1)
    a["layer1"][7, 0] = np.nan
    with pytest.raises(ActivationValueError, match="'layer1'.*example id 7"):
        ck.analyze(a, **OPTS)


def test_progress_true_draws_a_bar_on_stderr(capsys):
    a = chain_activations(64, seed=2)
    ck.analyze(a, progress=True, **OPTS)
    err = capsys.readouterr().err
    assert "analyzing" in err and "64/64" in err
    with pytest.raises(TypeError, match="progress must be True, False, None or a callable"):
        ck.analyze(a, progress="yes", **OPTS)
