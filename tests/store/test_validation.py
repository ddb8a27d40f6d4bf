"""Every error the store raises, reached with the message a user sees."""

import os

import h5py
import numpy as np
import pytest

from cka_offline.errors import (
    AlignmentError,
    FormatError,
    IncompleteFileError,
    InputError,
    OutputError,
    UnsafeFileError,
    VersionError,
)
from cka_offline.store import schema
from cka_offline.store.reader import open_activations
from cka_offline.store.writer import ActivationWriter, LayerSpec

from .conftest import make_layers, specs_for, write_file


def _mutate(path, fn):
    with h5py.File(path, "r+") as h:
        fn(h)
    return path


def test_missing_file_mentions_partial(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        open_activations(tmp_path / "nope.h5")
    (tmp_path / "x.h5.partial").write_bytes(b"")
    with pytest.raises(FormatError, match="--resume"):
        open_activations(tmp_path / "x.h5")


def test_random_bytes(tmp_path):
    p = tmp_path / "r.h5"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(FormatError, match="not a readable HDF5 file"):
        open_activations(p)


def test_truncated_file(small_file, tmp_path):
    path, _ = small_file
    data = open(path, "rb").read()
    p = tmp_path / "t.h5"
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(FormatError, match=r"t\.h5 is truncated .*copy it again or extract it again") as info:
        open_activations(p)
    assert not isinstance(info.value, IncompleteFileError)  # not mistaken for a file locked by its writer


def test_hdf5_but_not_activation_file(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as h:
        h["x"] = np.zeros(3)
    with pytest.raises(FormatError, match="not a cka-offline activation file"):
        open_activations(p)


def test_newer_major_refused_newer_minor_read(small_file):
    path, _ = small_file
    _mutate(path, lambda h: h.attrs.__setitem__(schema.ATTR_VERSION, "1.7"))
    assert open_activations(path).version == (1, 7)
    _mutate(path, lambda h: h.attrs.__setitem__(schema.ATTR_VERSION, "2.0"))
    with pytest.raises(VersionError, match=r"format 2\.0.*reads format 1\.x.*pip install -U"):
        open_activations(path)


def test_malformed_version(small_file):
    path, _ = small_file
    _mutate(path, lambda h: h.attrs.__setitem__(schema.ATTR_VERSION, "one"))
    with pytest.raises(FormatError, match="malformed format version"):
        open_activations(path)


@pytest.mark.parametrize(
    "attr", [a for a in schema.REQUIRED_ROOT_ATTRS if a not in (schema.ATTR_FORMAT, schema.ATTR_VERSION)]
)
def test_missing_root_attribute(small_file, attr):
    path, _ = small_file
    _mutate(path, lambda h: h.attrs.__delitem__(attr))
    with pytest.raises(FormatError, match=f"required attribute '{attr}' is missing"):
        open_activations(path)


def test_non_integer_attribute(small_file):
    path, _ = small_file
    _mutate(path, lambda h: h.attrs.__setitem__(schema.ATTR_N_EXAMPLES, "many"))
    with pytest.raises(FormatError, match="'n_examples' must be an integer"):
        open_activations(path)


def test_incomplete_file_and_partial_name(small_file, tmp_path):
    path, arrays = small_file
    _mutate(path, lambda h: h.attrs.__setitem__(schema.ATTR_COMPLETE, False))
    with pytest.raises(IncompleteFileError, match=r"incomplete \(50 of 50 rows.*--resume"):
        open_activations(path)
    w = ActivationWriter(tmp_path / "p.h5", ids=np.arange(50), layers=specs_for(arrays), provenance={})
    w.write({k: v[:10] for k, v in arrays.items()})
    # a reader opening the file being written, in this process: refused as unfinished
    with pytest.raises(IncompleteFileError, match="unfinished extraction"):
        open_activations(str(tmp_path / "p.h5.partial"))
    w.abort()


def test_ids_missing_wrong_shape_duplicate(tmp_path):
    arrays = make_layers(10)
    p1 = write_file(tmp_path / "1.h5", arrays)
    _mutate(p1, lambda h: h.__delitem__("ids"))
    with pytest.raises(FormatError, match="example ids\\) is missing"):
        open_activations(p1)
    p2 = write_file(tmp_path / "2.h5", arrays)

    def dup(h):
        h["ids"][3] = 5

    _mutate(p2, dup)
    with pytest.raises(FormatError, match="example id 5 occurs more than once"):
        open_activations(p2)
    p3 = write_file(tmp_path / "3.h5", arrays)

    def short(h):
        del h["ids"]
        h["ids"] = np.arange(9)

    _mutate(p3, short)
    with pytest.raises(FormatError, match=r"has shape \(9,\), expected \(10,\)"):
        open_activations(p3)
    p4 = write_file(tmp_path / "4.h5", arrays)

    def floats(h):
        del h["ids"]
        h["ids"] = np.arange(10.0)

    _mutate(p4, floats)
    with pytest.raises(FormatError, match="expected integers or strings"):
        open_activations(p4)


def _replace_layer(key, data):
    """A mutation that swaps /layers/<key> for ``data``, keeping its attributes."""

    def mutate(h):
        attrs = dict(h["layers/" + key].attrs)
        del h["layers/" + key]
        h["layers/" + key] = data
        h["layers/" + key].attrs.update(attrs)

    return mutate


def test_layer_row_count_and_shape_problems(tmp_path):
    arrays = make_layers(10)
    rows = _replace_layer("L0001", np.zeros((9, 8), np.float32))
    with pytest.raises(FormatError, match="layer 'layer1.0.relu' has 9 rows but the file has 10 example ids"):
        open_activations(_mutate(write_file(tmp_path / "a.h5", arrays), rows))

    def features(h):
        h["layers/L0002"].attrs["features"] = 4

    with pytest.raises(FormatError, match="says 4 features but stores 5"):
        open_activations(_mutate(write_file(tmp_path / "b.h5", arrays), features))
    dtype = _replace_layer("L0000", np.zeros((10, 12), np.int32))
    with pytest.raises(FormatError, match="stored as int32"):
        open_activations(_mutate(write_file(tmp_path / "c.h5", arrays), dtype))
    three_d = _replace_layer("L0000", np.zeros((10, 3, 4), np.float32))
    with pytest.raises(FormatError, match="has 3 dimensions"):
        open_activations(_mutate(write_file(tmp_path / "d.h5", arrays), three_d))

    def no_attr(h):
        del h["layers/L0000"].attrs["reduction"]

    with pytest.raises(FormatError, match="lacks attribute 'reduction'"):
        open_activations(_mutate(write_file(tmp_path / "e.h5", arrays), no_attr))

    def no_layers(h):
        del h["layers"]

    with pytest.raises(FormatError, match="holds no layers"):
        open_activations(_mutate(write_file(tmp_path / "f.h5", arrays), no_layers))


def test_links_and_external_storage_refused(tmp_path):
    arrays = make_layers(10)
    secret = tmp_path / "secret.h5"
    with h5py.File(secret, "w") as h:
        h["data"] = np.ones((10, 3), np.float32)

    def ext_link(h):
        h["layers/evil"] = h5py.ExternalLink(str(secret), "data")

    p = _mutate(write_file(tmp_path / "a.h5", arrays), ext_link)
    with pytest.raises(UnsafeFileError, match="external link.*allow_external"):
        open_activations(p)

    def virtual(h):
        layout = h5py.VirtualLayout(shape=(10, 3), dtype=np.float32)
        layout[:] = h5py.VirtualSource(str(secret), "data", shape=(10, 3))
        h.create_virtual_dataset("vds", layout)

    with pytest.raises(UnsafeFileError, match="virtual dataset"):
        open_activations(_mutate(write_file(tmp_path / "b.h5", arrays), virtual))

    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"\0" * 120)

    def external(h):
        h.create_dataset("ext", shape=(10, 3), dtype=np.float32, external=[(str(raw), 0, 120)])

    with pytest.raises(UnsafeFileError, match="external file"):
        open_activations(_mutate(write_file(tmp_path / "c.h5", arrays), external))

    def soft(h):
        h["alias"] = h5py.SoftLink("/ids")

    path = _mutate(write_file(tmp_path / "d.h5", arrays), soft)
    with pytest.raises(UnsafeFileError, match="soft link"):
        open_activations(path)
    assert open_activations(path, allow_external=True).n_examples == 10


def test_writer_errors(tmp_path):
    arrays = make_layers(10)
    specs = specs_for(arrays)
    path = write_file(tmp_path / "a.h5", arrays)
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        ActivationWriter(path, ids=np.arange(10), layers=specs, provenance={})
    with pytest.raises(OutputError, match="does not exist"):
        ActivationWriter(tmp_path / "no" / "a.h5", ids=np.arange(10), layers=specs, provenance={})
    with pytest.raises(InputError, match="ids must be unique.*e.g. 3"):
        ActivationWriter(tmp_path / "b.h5", ids=[0, 1, 2, 3, 3], layers=specs, provenance={})
    with pytest.raises(InputError, match="must be 1-D"):
        ActivationWriter(tmp_path / "b.h5", ids=np.zeros((2, 2), int), layers=specs, provenance={})
    with pytest.raises(InputError, match="integers or strings"):
        ActivationWriter(tmp_path / "b.h5", ids=np.arange(3.0), layers=specs, provenance={})
    with pytest.raises(InputError, match="no examples"):
        ActivationWriter(tmp_path / "b.h5", ids=np.arange(0), layers=specs, provenance={})
    with pytest.raises(OutputError, match="unknown dtype"):
        ActivationWriter(tmp_path / "b.h5", ids=np.arange(10), layers=specs, provenance={}, dtype="int8")
    with pytest.raises(OutputError, match="unknown compression"):
        ActivationWriter(tmp_path / "b.h5", ids=np.arange(10), layers=specs, provenance={}, compression="zip")
    with pytest.raises(OutputError, match="unknown reduction"):
        ActivationWriter(tmp_path / "b.h5", ids=np.arange(10), layers=[LayerSpec("x", (3,), "max", 3)], provenance={})
    with pytest.raises(OutputError, match="no layers"):
        ActivationWriter(tmp_path / "b.h5", ids=np.arange(10), layers=[], provenance={})
    with pytest.raises(OutputError, match="selected twice"):
        ActivationWriter(tmp_path / "b.h5", ids=np.arange(10), layers=specs + specs[:1], provenance={})
    with pytest.raises(OutputError, match="has no features"):
        ActivationWriter(tmp_path / "b.h5", ids=np.arange(10), layers=[LayerSpec("x", (0,), "none", 0)], provenance={})
    w = ActivationWriter(tmp_path / "b.h5", ids=np.arange(10), layers=specs, provenance={})
    with pytest.raises(OutputError, match="lacks layer"):
        w.write({"fc": arrays["fc"][:2]})
    with pytest.raises(OutputError, match="different row counts"):
        w.write({k: v[: 2 + i] for i, (k, v) in enumerate(arrays.items())})
    bad = {k: v[:2] for k, v in arrays.items()}
    bad["fc"] = np.zeros((2, 4))
    with pytest.raises(OutputError, match="expected rows of 5 features"):
        w.write(bad)
    with pytest.raises(OutputError, match="holds 10 examples"):
        w.write({k: np.concatenate([v, v]) for k, v in arrays.items()})
    w.write({k: v[:4] for k, v in arrays.items()})
    with pytest.raises(OutputError, match="only 4 of 10 rows.*kept"):
        w.close()
    assert not os.path.exists(tmp_path / "b.h5") and os.path.exists(tmp_path / "b.h5.partial")


def test_unwritable_folder_root(tmp_path, monkeypatch):
    import cka_offline.files as files

    monkeypatch.setattr(files, "writable_folder", lambda folder: False)  # the probe both commands use
    with pytest.raises(OutputError, match="not writable"):
        ActivationWriter(tmp_path / "a.h5", ids=np.arange(3), layers=specs_for(make_layers(3)), provenance={})


def test_disk_full_keeps_partial(tmp_path, monkeypatch):
    arrays = make_layers(10)
    w = ActivationWriter(tmp_path / "a.h5", ids=np.arange(10), layers=specs_for(arrays), provenance={})
    w.write({k: v[:3] for k, v in arrays.items()})

    def full():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w._file, "flush", full)
    with pytest.raises(OutputError, match="disk is full.*--resume"):
        w.write({k: v[3:6] for k, v in arrays.items()})
    monkeypatch.undo()
    w.abort()
    assert not os.path.exists(tmp_path / "a.h5")
    with h5py.File(tmp_path / "a.h5.partial", "r") as h:
        assert h.attrs["rows_complete"] == 3 and not h.attrs["complete"]


def test_glob_with_no_match(tmp_path):
    with pytest.raises(FormatError, match="no activation file matches"):
        open_activations(str(tmp_path / "x-*.h5"))
    (tmp_path / "x-0.h5.partial").write_bytes(b"")
    with pytest.raises(FormatError, match="unfinished .partial"):
        open_activations(str(tmp_path / "x-*.h5"))


def test_unknown_layer(small_file):
    path, _ = small_file
    with pytest.raises(FormatError, match="no layer named 'nope'; it has /conv1/Conv_output_0"):
        open_activations(path).read("nope", 0, 1)


def test_alignment_error_type_is_exported():
    assert issubclass(AlignmentError, Exception)
