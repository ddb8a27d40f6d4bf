import numpy as np
import pytest

from cka_offline.errors import AlignmentError
from cka_offline.store.reader import open_activations

from .conftest import make_layers, write_file


def _shards(tmp_path, n=30, k=3, prov=None):
    prov = prov or {}
    arrays = make_layers(n, seed=5)
    bounds = np.linspace(0, n, k + 1).astype(int)
    paths = []
    for i in range(k):
        lo, hi = bounds[i], bounds[i + 1]
        part = {name: a[lo:hi] for name, a in arrays.items()}
        provenance = {"model": "m", "model_sha256": "abc", "options": "{}", **prov.get(i, {})}
        paths.append(
            write_file(
                tmp_path / f"part-{i}.h5",
                part,
                ids=np.arange(lo, hi) + 100,
                shard=(i, k, int(lo)),
                provenance=provenance,
            )
        )
    return arrays, paths


def test_shards_read_as_one_file_by_glob_and_list(tmp_path):
    arrays, paths = _shards(tmp_path)
    for spec in (str(tmp_path / "part-*.h5"), paths[::-1]):
        with open_activations(spec) as f:
            assert f.n_examples == 30
            np.testing.assert_array_equal(f.ids, np.arange(30) + 100)
            for name, a in arrays.items():
                np.testing.assert_array_equal(f.read(name, 0, 30), a)
                np.testing.assert_array_equal(f.read(name, 7, 23), a[7:23])
                idx = np.array([29, 0, 15, 9, 10])
                np.testing.assert_array_equal(f.read_rows(name, idx), a[idx])
            assert len(f.provenance["shards"]) == 3


def test_missing_shard(tmp_path):
    _, paths = _shards(tmp_path)
    with pytest.raises(AlignmentError, match="has 3 shards but 2 were given"):
        open_activations(paths[:2])
    with pytest.raises(AlignmentError, match=r"part-1.h5 is shard 1 of 3 .*pass all 3 shard files"):
        open_activations(paths[1])
    assert open_activations(paths[1], allow_lone_shard=True).n_examples == 10


def test_shards_from_other_models(tmp_path):
    _, paths = _shards(tmp_path, prov={1: {"model_sha256": "zzz"}})
    with pytest.raises(AlignmentError, match="differs from .* in 'model_sha256'"):
        open_activations(paths)


def test_overlapping_shards(tmp_path):
    arrays = make_layers(20)
    a = write_file(tmp_path / "a.h5", {k: v[:12] for k, v in arrays.items()}, ids=np.arange(12), shard=(0, 2, 0))
    b = write_file(tmp_path / "b.h5", {k: v[8:] for k, v in arrays.items()}, ids=np.arange(8, 20), shard=(1, 2, 8))
    with pytest.raises(AlignmentError, match="overlap or one is missing"):
        open_activations([a, b])


def test_duplicate_ids_across_shards(tmp_path):
    arrays = make_layers(20)
    a = write_file(tmp_path / "a.h5", {k: v[:10] for k, v in arrays.items()}, ids=np.arange(10), shard=(0, 2, 0))
    b = write_file(tmp_path / "b.h5", {k: v[10:] for k, v in arrays.items()}, ids=np.arange(10) + 5, shard=(1, 2, 10))
    with pytest.raises(AlignmentError, match="example id 5 occurs in more than one shard"):
        open_activations([a, b])


def test_shard_indexes_and_layers(tmp_path):
    arrays = make_layers(20)
    a = write_file(tmp_path / "a.h5", {k: v[:10] for k, v in arrays.items()}, ids=np.arange(10), shard=(0, 2, 0))
    c = write_file(tmp_path / "c.h5", {k: v[10:] for k, v in arrays.items()}, ids=np.arange(10, 20), shard=(0, 2, 10))
    with pytest.raises(AlignmentError, match="are not 0..1"):
        open_activations([a, c])
    d = write_file(tmp_path / "d.h5", {"fc": arrays["fc"][10:]}, ids=np.arange(10, 20), shard=(1, 2, 10))
    with pytest.raises(AlignmentError, match="other layers"):
        open_activations([a, d])
    e = write_file(tmp_path / "e.h5", {k: v[10:] for k, v in arrays.items()}, ids=np.arange(10, 20), shard=(1, 3, 10))
    with pytest.raises(AlignmentError, match="disagree on the number of shards"):
        open_activations([a, e])
