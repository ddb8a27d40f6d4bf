"""Property: whatever is wrong with an activation file, the reader either reads it (it is still valid) or
raises the tool's own error (a CKAOfflineError subclass) -- never another exception, never a hang, and never
an allocation sized by a declared-but-absent size. Files are a valid small file, mutated by hypothesis:
attributes of wrong types, shapes and values (huge sizes, NaN), datasets of wrong dtypes and shapes, groups
where datasets belong, links, and byte-level corruption or truncation."""

from __future__ import annotations

import signal
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cka_offline.errors import CKAOfflineError
from cka_offline.store import schema
from cka_offline.store.reader import open_activations

from .builders import acts

N = 24
ROOT_KEYS = list(schema.REQUIRED_ROOT_ATTRS) + list(schema.OPTIONAL_ROOT_ATTRS)
LAYER_KEYS = list(schema.REQUIRED_LAYER_ATTRS)
HUGE = 2**62
MEMORY_LIMIT = 64 * 2**20  # the valid file holds a few kB: any large allocation came from a declared size


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    def alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    layers = {"conv/1": np.arange(N * 5, dtype=np.float32).reshape(N, 5) % 7, "fc": np.ones((N, 2), np.float32)}
    return Path(acts(folder / "v.h5", n=N, layers=layers, chunk_rows=8))


values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 1, N - 1, N + 1, HUGE, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.booleans(),
    st.lists(st.integers(min_value=-5, max_value=HUGE), max_size=4).map(lambda v: np.asarray(v, dtype=np.int64)),
    st.just(np.zeros((2, 2), np.float64)),
    st.just(np.asarray([b"a", b"bc"])),
)

replacement_data = st.sampled_from(
    [
        "float64",
        "int32",
        "int64-2d",
        "complex",
        "compound",
        "bytes",
        "vlen-str",
        "empty",
        "scalar",
        "3d",
        "group",
        "one-more-row",
        "huge-declared",
    ]
)


def _replacement(kind: str, shape: tuple[int, ...]):
    rows = min(shape[0], N + 1) if shape else N  # a previous mutation may have declared 2**40 rows
    cols = min(shape[1], 8) if len(shape) > 1 else 3
    return {
        "float64": lambda: np.zeros((rows, cols), np.float64),
        "int32": lambda: np.arange(rows, dtype=np.int32),
        "int64-2d": lambda: np.zeros((rows, cols), np.int64),
        "complex": lambda: np.zeros((rows, cols), np.complex64),
        "compound": lambda: np.zeros(rows, dtype=[("a", "i4"), ("b", "f4")]),
        "bytes": lambda: np.asarray([b"x%d" % i for i in range(rows)]),
        "vlen-str": lambda: np.asarray([f"id{i}" for i in range(rows)], dtype=object),
        "empty": lambda: np.zeros((0, cols), np.float32),
        "scalar": lambda: np.float32(1.0),
        "3d": lambda: np.zeros((rows, cols, 2), np.float32),
        "group": None,
        "one-more-row": lambda: np.zeros((rows + 1, cols), np.float32),
        "huge-declared": "huge",
    }[kind]


def _replace(h: h5py.File, name: str, kind: str) -> None:
    old = h[name]
    shape = old.shape if isinstance(old, h5py.Dataset) else ()
    attrs = dict(old.attrs)
    del h[name]
    make = _replacement(kind, shape)
    if make is None:
        obj = h.create_group(name)
    elif make == "huge":  # a dataset that claims 2**40 rows but stores none (chunked, unallocated)
        tail = tuple(shape[1:]) if shape else ()
        obj = h.create_dataset(
            name,
            shape=(2**40, *tail),
            maxshape=(None, *tail),
            chunks=(8, *tail),
            dtype=old.dtype if isinstance(old, h5py.Dataset) else np.float32,
        )
        h.attrs[schema.ATTR_N_EXAMPLES] = 2**40
    else:
        data = make()
        obj = h.create_dataset(name, data=data, dtype=h5py.string_dtype() if data.dtype == object else None)
    obj.attrs.update(attrs)


mutation = st.one_of(
    st.tuples(st.just("set-root"), st.sampled_from(ROOT_KEYS), values),
    st.tuples(st.just("del-root"), st.sampled_from(ROOT_KEYS)),
    st.tuples(st.just("set-layer"), st.sampled_from(["L0000", "L0001"]), st.sampled_from(LAYER_KEYS), values),
    st.tuples(st.just("del-layer-attr"), st.sampled_from(["L0000", "L0001"]), st.sampled_from(LAYER_KEYS)),
    st.tuples(st.just("replace"), st.sampled_from(["ids", "layers/L0000", "layers/L0001", "layers"]), replacement_data),
    st.tuples(
        st.just("link"), st.sampled_from(["external", "soft", "dangling-soft"]), st.sampled_from(["x", "layers/L0002"])
    ),
    st.tuples(st.just("extra-layer"), st.sampled_from(["copy", "huge"])),
)
corruption = st.one_of(
    st.none(),
    st.tuples(
        st.just("bytes"),
        st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
    ),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
)


def _apply(h: h5py.File, m: tuple) -> None:
    kind = m[0]
    if kind == "set-root":
        h.attrs[m[1]] = m[2]
    elif kind == "del-root":
        if m[1] in h.attrs:
            del h.attrs[m[1]]
    elif kind == "set-layer" and f"layers/{m[1]}" in h:
        h[f"layers/{m[1]}"].attrs[m[2]] = m[3]
    elif kind == "del-layer-attr" and f"layers/{m[1]}" in h and m[2] in h[f"layers/{m[1]}"].attrs:
        del h[f"layers/{m[1]}"].attrs[m[2]]
    elif kind == "replace" and m[1] in h:
        _replace(h, m[1], m[2])
    elif kind == "link" and "layers" in h and (m[2] not in h):
        target = {
            "external": h5py.ExternalLink("/etc/hostname", "/x"),
            "soft": h5py.SoftLink("/ids"),
            "dangling-soft": h5py.SoftLink("/nowhere"),
        }[m[1]]
        h[m[2]] = target
    elif kind == "extra-layer" and "layers/L0000" in h and "layers/L0002" not in h:
        if m[1] == "copy":
            h.copy(h["layers/L0000"], "layers/L0002")
            h["layers/L0002"].attrs["name"] = "extra"
        else:
            ds = h.create_dataset("layers/L0002", shape=(N, 2**40), chunks=(8, 64), dtype=np.float32)
            ds.attrs.update(
                {
                    "name": "wide",
                    "order": 2,
                    "original_shape": np.asarray([2**40]),
                    "reduction": "none",
                    "dtype": "float32",
                    "features": 2**40,
                }
            )


def _read_everything(path: str) -> None:
    with open_activations(path) as f:
        for name in f.layer_names:
            f.read(name, 0, f.chunk_rows)
            f.read_rows(name, [f.n_examples - 1, 0])
            next(iter(f.iter_blocks([name])))
        f.provenance  # noqa: B018


@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutations=st.lists(mutation, min_size=1, max_size=3), damage=corruption)
def test_reader_raises_only_its_own_errors(valid_file, tmp_path, mutations, damage):
    path = tmp_path / "f.h5"
    path.write_bytes(valid_file.read_bytes())
    try:
        with h5py.File(path, "r+") as h:
            for m in mutations:
                _apply(h, m)
    except (TypeError, ValueError, OSError, KeyError, RuntimeError):
        pass  # h5py cannot write this mutation: keep what it did write
    if damage is not None:
        data = bytearray(path.read_bytes())
        if damage[0] == "bytes":
            for where, value in damage[1]:
                data[int(where * len(data))] = value
        else:
            data = data[: int(damage[1] * len(data))]
        path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with time_limit(10):
            _read_everything(str(path))
    except CKAOfflineError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(exc)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"the reader allocated {peak / 2**20:.0f} MiB"


# -- the readers of inputs and arrays: .npy headers (alone, or as .npz members) that declare anything ----------

DESCRS = ["<f4", "<f8", "|u1", "<i8", "|b1", "|V0", "|S0", "<U0", "|O", "|V8", "<U3", "[('a', '<f4', (4,))]"]


@st.composite
def npy_file(draw):
    """A .npy file: a header with any shape (up to 2**26 rows, so a reader that allocates per declared
    row shows up in the memory limit without endangering the machine), any dtype, and any number of bytes."""
    shape = tuple(draw(st.lists(st.integers(0, 2**26), min_size=0, max_size=3)))
    header = {"descr": draw(st.sampled_from(DESCRS)), "fortran_order": draw(st.booleans()), "shape": shape}
    text = repr(header).encode()
    if draw(st.booleans()):  # sometimes break the header itself
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.binary(max_size=4)) + text[cut:]
    text += b" " * ((-(len(text) + 11)) % 64) + b"\n"
    data = draw(st.binary(max_size=96))
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


def _read_inputs(path: Path, kind: str) -> None:
    from cka_offline.inputs import NpyInputs, NpzInputs
    from cka_offline_arrays.sources import open_arrays

    if kind == "arrays":
        arrays = open_arrays(str(path))
        try:
            for name in arrays.layers:
                arrays.rows(name, np.arange(min(arrays.n_rows, 8)))
        finally:
            arrays.close()
        return
    reader = (NpyInputs if kind == "npy" else NpzInputs)(str(path))
    try:
        reader.ids()
        reader.read(0, min(len(reader), 8))
    finally:
        reader.close()


@settings(
    max_examples=120,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=npy_file(), kind=st.sampled_from(["npy", "npz-stored", "npz-deflated", "arrays"]))
def test_input_readers_never_allocate_for_declared_sizes(tmp_path, data, kind):
    import zipfile

    if kind == "npy":
        path = tmp_path / "x.npy"
        path.write_bytes(data)
    elif kind == "arrays":
        (tmp_path / "acts").mkdir(exist_ok=True)
        path = tmp_path / "acts"
        (path / "l0.npy").write_bytes(data)
    else:
        path = tmp_path / "x.npz"
        method = zipfile.ZIP_STORED if kind == "npz-stored" else zipfile.ZIP_DEFLATED
        with zipfile.ZipFile(path, "w", compression=method) as zf:
            zf.writestr("x.npy", data)
    tracemalloc.start()
    try:
        with time_limit(10):
            _read_inputs(path, kind)
    except CKAOfflineError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(exc)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"the {kind} reader allocated {peak / 2**20:.0f} MiB"
