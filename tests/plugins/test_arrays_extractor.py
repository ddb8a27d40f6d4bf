"""The arrays extractor on .npy folders, .npz (stored and compressed) and .safetensors files built here."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from cka_offline.errors import CKAOfflineError, FormatError, InputError, OptionError
from cka_offline.extractor import sha256_path
from cka_offline.registry import find_extractor, get_plugin_manager
from cka_offline_arrays import sources
from cka_offline_arrays.extractor import ArraysExtractor

N = 12
RNG = np.random.default_rng(0)
ACTS = {  # model order; names sort differently by plain string order ("conv10" < "conv2")
    "conv2": RNG.normal(size=(N, 3, 4, 4)).astype(np.float32),
    "conv10": RNG.normal(size=(N, 5)),
    "score": RNG.normal(size=(N,)).astype(np.float32),  # 1-D: one feature per example
}
ORDER = ["conv2", "conv10", "score"]
FORMATS = ["folder", "npz", "npz_compressed", "safetensors"]


def write_source(tmp_path, fmt: str, arrays: dict[str, np.ndarray] = ACTS) -> str:
    if fmt == "folder":
        path = tmp_path / "acts"
        path.mkdir()
        for name, arr in arrays.items():
            np.save(path / f"{name}.npy", arr)
    elif fmt in ("npz", "npz_compressed"):
        path = tmp_path / "acts.npz"
        (np.savez if fmt == "npz" else np.savez_compressed)(path, **arrays)
    else:
        from safetensors.numpy import save_file

        path = tmp_path / "acts.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    return str(path)


def expected(name: str, index) -> np.ndarray:
    rows = ACTS[name][index]
    return rows.reshape(len(rows), 1) if rows.ndim == 1 else rows


@pytest.mark.parametrize("fmt", FORMATS)
def test_layers_rows_and_default_inputs(tmp_path, fmt):
    source = write_source(tmp_path, fmt)
    with ArraysExtractor(source) as ext:
        infos = ext.layers()
        assert [i.name for i in infos] == ORDER
        assert [i.shape for i in infos] == [(3, 4, 4), (5,), (1,)]
        assert {i.kind for i in infos} == {"array"}
        assert ext.input_names() == ["index"]

        for index in (np.arange(3, 9), np.array([0, 2, 3, 4, 11]), np.array([5]), np.arange(0)):
            out = ext.run({"index": index}, ORDER)
            assert list(out) == ORDER
            for name in ORDER:
                assert out[name].dtype == ACTS[name].dtype and out[name].flags.c_contiguous
                np.testing.assert_array_equal(out[name], expected(name, index))

        reader = ext.default_inputs()
        assert len(reader) == N
        np.testing.assert_array_equal(reader.ids(), np.arange(N))
        np.testing.assert_array_equal(reader.read(4, 8)["index"], np.arange(4, 8))
        np.testing.assert_array_equal(reader.read(10, 16)["index"], [10, 11])
        assert reader.fingerprint()["sha256"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_conformance(tmp_path, fmt):
    testing = pytest.importorskip("cka_offline.testing")
    source = write_source(tmp_path, fmt)
    checked = testing.check_extractor(ArraysExtractor, source, {"index": np.arange(N)})
    assert checked == ORDER


def test_provenance(tmp_path):
    source = write_source(tmp_path, "folder")
    with ArraysExtractor(source) as ext:
        prov = ext.provenance()
    assert prov["framework"] == "numpy" and prov["framework_version"] == np.__version__
    assert prov["model"] == source
    assert prov["model_sha256"] == sha256_path(source) != ""
    assert prov["imported_from"] == "folder of 3 .npy files; ids from row numbers"


def test_can_open(tmp_path):
    folder = write_source(tmp_path, "folder")
    assert ArraysExtractor.can_open(folder)
    assert ArraysExtractor.can_open(write_source(tmp_path, "npz"))
    assert ArraysExtractor.can_open(write_source(tmp_path, "safetensors"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.onnx").write_bytes(b"")
    assert not ArraysExtractor.can_open(str(tmp_path / "empty"))
    assert not ArraysExtractor.can_open(str(tmp_path / "model.onnx"))
    assert not ArraysExtractor.can_open(str(tmp_path / "missing.npz"))


def test_registered_through_the_entry_point(tmp_path):
    pm = get_plugin_manager()
    assert find_extractor(write_source(tmp_path, "folder"), pm) is ArraysExtractor


# --- memory maps -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["folder", "npz"])
def test_npy_and_stored_npz_members_are_memory_mapped(tmp_path, fmt):
    arrays = open_set(write_source(tmp_path, fmt))
    block = arrays.layers["conv2"].read_range(2, 5)
    assert isinstance(block, np.memmap)  # a view of the file, not a loaded copy
    np.testing.assert_array_equal(block, ACTS["conv2"][2:5])
    arrays.close()


def test_compressed_npz_members_are_decompressed_once_to_a_mapped_temporary_file(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="cka_offline_arrays.sources"):
        arrays = open_set(write_source(tmp_path, "npz_compressed"))
    assert "3 of 3 members are compressed" in caplog.text and "np.savez" in caplog.text
    block = arrays.layers["conv10"].read_range(0, 4)
    assert isinstance(block, np.memmap)
    spilled = block.filename
    assert os.path.isfile(spilled) and not spilled.startswith(str(tmp_path))
    np.testing.assert_array_equal(block, ACTS["conv10"][:4])
    arrays.close()
    assert not os.path.exists(os.path.dirname(spilled))


def test_fortran_order_and_big_endian_arrays(tmp_path):
    folder = tmp_path / "acts"
    folder.mkdir()
    fortran = np.asfortranarray(ACTS["conv10"])
    big = ACTS["conv2"].astype(">f4")
    np.save(folder / "f.npy", fortran)
    np.save(folder / "b.npy", big)
    with ArraysExtractor(str(folder)) as ext:
        out = ext.run({"index": np.array([1, 3, 4])}, ["b", "f"])
    np.testing.assert_array_equal(out["f"], ACTS["conv10"][[1, 3, 4]])
    np.testing.assert_array_equal(out["b"], ACTS["conv2"][[1, 3, 4]])
    assert out["b"].dtype == np.dtype("=f4")


def open_set(source: str) -> sources.ArraySet:
    return sources.open_arrays(source)


# --- ids and layer names -------------------------------------------------------------------------------------


def test_ids_from_the_source(tmp_path):
    ids = np.arange(N) * 10 + 7
    folder = write_source(tmp_path, "folder")
    np.save(os.path.join(folder, "ids.npy"), ids)
    npz = tmp_path / "with_ids.npz"
    np.savez(npz, ids=ids, **ACTS)
    for source in (folder, str(npz)):
        with ArraysExtractor(source) as ext:
            assert [i.name for i in ext.layers()] == ORDER  # "ids" is not a layer
            np.testing.assert_array_equal(ext.default_inputs().ids(), ids)
            assert "ids from" in ext.provenance()["imported_from"]


def test_ids_option_txt_and_npy(tmp_path):
    source = write_source(tmp_path, "npz")
    ints = tmp_path / "ids.txt"
    ints.write_text("\n".join(str(100 + i) for i in range(N)) + "\n")
    strings = tmp_path / "names.txt"
    strings.write_text("\n".join(f"{i:03d}" for i in range(N)))  # "007" must stay a string
    npy = tmp_path / "names.npy"
    np.save(npy, np.array([f"img_{i}" for i in range(N)]))
    for path, want in (
        (ints, np.arange(100, 100 + N)),
        (strings, [f"{i:03d}" for i in range(N)]),
        (npy, [f"img_{i}" for i in range(N)]),
    ):
        with ArraysExtractor(source, options={"ids": str(path)}) as ext:
            got = ext.default_inputs().ids()
            assert got.dtype.kind == ("i" if path == ints else "U")
            np.testing.assert_array_equal(got, want)
            assert (
                ext.default_inputs().fingerprint()["sha256"]
                != ArraysExtractor(source).default_inputs().fingerprint()["sha256"]
            )


def test_layers_json_names_orders_and_aliases(tmp_path):
    folder = write_source(tmp_path, "folder")
    (tmp_path / "acts" / "layers.json").write_text(json.dumps({"score.npy": "head/score:0", "conv10": "block/10"}))
    with ArraysExtractor(folder) as ext:
        infos = ext.layers()
        assert [i.name for i in infos] == ["head/score:0", "block/10", "conv2"]
        assert [i.aliases for i in infos] == [("score",), ("conv10",), ()]
        out = ext.run({"index": np.arange(2)}, ["head/score:0"])
    np.testing.assert_array_equal(out["head/score:0"], expected("score", np.arange(2)))


@pytest.mark.parametrize(
    "mapping, match",
    [
        ({"nope.npy": "x"}, r"'nope.npy' is not a .npy file of the folder"),
        ({"score.npy": "conv2"}, r"score.npy and conv2.npy are both named 'conv2'"),
        ({"score.npy": "ids"}, r"the name 'ids' is kept for the example ids"),
        (["score"], r"expected a JSON object"),
    ],
)
def test_layers_json_errors(tmp_path, mapping, match):
    folder = write_source(tmp_path, "folder")
    (tmp_path / "acts" / "layers.json").write_text(json.dumps(mapping))
    with pytest.raises(FormatError, match=match):
        ArraysExtractor(folder)


# --- errors ----------------------------------------------------------------------------------------------


def test_arrays_with_different_numbers_of_rows(tmp_path):
    folder = write_source(tmp_path, "folder", {"a": np.zeros((5, 2)), "b": np.zeros((4, 2))})
    with pytest.raises(FormatError, match=r"b\.npy has 4 rows but .*a\.npy has 5"):
        ArraysExtractor(folder)


def test_safetensors_weights_given_as_source(tmp_path):
    source = write_source(
        tmp_path, "safetensors", {"fc.weight": np.zeros((3, 4)), "fc.bias": np.zeros(3), "out.weight": np.zeros((2, 3))}
    )
    with pytest.raises(FormatError, match=r"out.weight has 2 rows but .*fc.bias has 3.*torch extractor as --weights"):
        ArraysExtractor(source)


@pytest.mark.parametrize(
    "array, match",
    [
        (
            np.array([{"a": 1}, None], dtype=object),
            r"x\.npy: cannot read it without unpickling: it holds Python objects .* never unpickled",
        ),
        (np.array(["a", "b"]), r"x\.npy: dtype <U1 is not numeric"),
        (np.zeros(2, dtype=[("a", "f4"), ("b", "f4")]), r"is not numeric"),
        (np.zeros(2, dtype=np.complex64), r"dtype complex64 is not numeric"),
        (np.float32(3.0), r"x\.npy: is a single number \(0-d\)"),
        (np.zeros((0, 3)), r"x\.npy: has no rows"),
        (np.zeros((3, 0)), r"x\.npy: declares 3 examples of 0 bytes each .*at least one value"),
    ],
)
def test_bad_arrays(tmp_path, array, match):
    folder = tmp_path / "acts"
    folder.mkdir()
    np.save(folder / "x.npy", array, allow_pickle=True)
    with pytest.raises(FormatError, match=match):
        ArraysExtractor(str(folder))


def test_object_member_of_npz(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, a=np.zeros((2, 2)), b=np.array([None, 1], dtype=object))
    with pytest.raises(
        FormatError, match=r"obj\.npz:b\.npy: cannot read it without unpickling: it holds Python objects"
    ):
        ArraysExtractor(str(path))


def test_unreadable_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"no \.npy files in this folder"):
        ArraysExtractor(str(tmp_path / "empty"))
    (tmp_path / "only_ids").mkdir()
    np.save(tmp_path / "only_ids" / "ids.npy", np.arange(3))
    with pytest.raises(FormatError, match=r"no layer arrays found"):
        ArraysExtractor(str(tmp_path / "only_ids"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.npy").write_bytes(b"not an array")
    with pytest.raises(FormatError, match=r"x\.npy: not a readable \.npy array"):
        ArraysExtractor(str(tmp_path / "broken"))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(FormatError, match=r"not a readable \.npz"):
        ArraysExtractor(str(tmp_path / "broken.npz"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(FormatError, match=r"not a readable \.safetensors"):
        ArraysExtractor(str(tmp_path / "broken.safetensors"))
    with pytest.raises(FormatError, match=r"no such file or folder"):
        ArraysExtractor(str(tmp_path / "missing.npz"))
    (tmp_path / "x.h5").write_bytes(b"")
    with pytest.raises(FormatError, match=r"expected a folder of \.npy files"):
        ArraysExtractor(str(tmp_path / "x.h5"))


def test_bfloat16_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    path = tmp_path / "bf16.safetensors"
    save_file({"h": torch.zeros(4, 2, dtype=torch.bfloat16)}, str(path))
    with pytest.raises(FormatError, match=r"bf16\.safetensors:h: dtype BF16 has no numpy equivalent.*float32"):
        ArraysExtractor(str(path))


def test_ids_errors(tmp_path):
    source = write_source(tmp_path, "npz")
    short = tmp_path / "short.txt"
    short.write_text("\n".join(map(str, range(N - 1))))
    with pytest.raises(InputError, match=rf"short\.txt: {N - 1} ids for {N} rows"):
        ArraysExtractor(source, options={"ids": str(short)})
    dup = tmp_path / "dup.npy"
    np.save(dup, np.array([0, 1, 2, 3, 3] + list(range(5, N))))
    with pytest.raises(InputError, match=r"dup\.npy: id 3 occurs 2 times \(rows 3, 4\)"):
        ArraysExtractor(source, options={"ids": str(dup)})
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array(list(range(N)), dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"obj\.npy: cannot read it without unpickling: it holds Python objects"):
        ArraysExtractor(source, options={"ids": str(obj)})
    floats = tmp_path / "floats.npy"
    np.save(floats, np.arange(N) / 2)
    with pytest.raises(InputError, match=r"expected integers or strings, got dtype float64"):
        ArraysExtractor(source, options={"ids": str(floats)})
    with pytest.raises(InputError, match=r"ids file .*missing\.txt: no such file"):
        ArraysExtractor(source, options={"ids": str(tmp_path / "missing.txt")})
    (tmp_path / "ids.csv").write_text("1\n")
    with pytest.raises(InputError, match=r"expected a \.npy array or a \.txt file"):
        ArraysExtractor(source, options={"ids": str(tmp_path / "ids.csv")})
    folder = write_source(tmp_path, "folder")
    np.save(os.path.join(folder, "ids.npy"), np.zeros(N, dtype=np.int64))
    with pytest.raises(InputError, match=r"ids\.npy: id 0 occurs 12 times"):
        ArraysExtractor(folder)


def test_option_and_run_errors(tmp_path):
    source = write_source(tmp_path, "folder")
    with pytest.raises(OptionError, match=r"unknown option\(s\) idz for the arrays extractor; known: ids"):
        ArraysExtractor(source, options={"idz": "x.txt"})
    with ArraysExtractor(source) as ext:
        with pytest.raises(InputError, match=r"expected input 'index' \(row numbers\), got pixels"):
            ext.run({"pixels": np.zeros((2, 3))}, ORDER)
        with pytest.raises(InputError, match=r"'index' must be 1-D integer row numbers, got dtype float64"):
            ext.run({"index": np.zeros(2)}, ORDER)
        with pytest.raises(InputError, match=rf"row {N} is out of range; the arrays have {N} rows"):
            ext.run({"index": np.array([0, N])}, ORDER)
        with pytest.raises(InputError, match=r"no array named 'fc'"):
            ext.run({"index": np.arange(2)}, ["fc"])


def test_every_error_is_a_known_error():
    assert issubclass(FormatError, CKAOfflineError) and issubclass(InputError, CKAOfflineError)
