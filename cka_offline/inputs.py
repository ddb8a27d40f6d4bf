"""The core's own input readers: ``.npz``, ``.npy``, a dataset in an HDF5 file, a folder of images.

They are registered through the ``cka_input_readers`` hook like any plugin's readers
(:func:`cka_offline.registry.get_plugin_manager` registers this module), so a plugin can override one.
Every reader reads only the rows it is asked for (memory maps, HDF5 slices, per-file image loads), so
memory stays bounded by the batch size whatever the size of the inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import zipfile
import zlib
from collections.abc import Sequence
from typing import IO, Any, Literal

import numpy as np

from .errors import CKAOfflineError, InputError
from .extractor import InputReader, Option, sha256_path
from .hookspecs import hookimpl
from .untrusted import check_npy_stored, read_npy_header, require_regular_file, shown, utf8_name

log = logging.getLogger(__name__)

#: the ``.npz`` member that holds example ids (not a model input)
IDS_NAME = "ids"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf")
#: deflate's largest expansion (a compressed ``.npz`` member cannot hold more than this times its size)
DEFLATE_MAX_RATIO = 1032
#: what to do about a damaged inputs file
_SAVE_AGAIN = "save the inputs again"


def check_ids(ids: np.ndarray, where: str) -> np.ndarray:
    """Example ids as int64 or str, 1-D and unique; an :class:`InputError` names a duplicate."""
    from .store.writer import normalize_ids  # h5py: imported only when inputs are read

    return normalize_ids(ids, where=where)


def check_lengths(lengths: dict[str, int], where: str) -> int:
    if not lengths:
        raise InputError(f"{where} holds no input arrays")
    if len(set(lengths.values())) != 1:
        listing = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise InputError(
            f"arrays in {where} have different numbers of examples (axis 0): {listing}; they must all match"
        )
    return next(iter(lengths.values()))


def _parse_floats(value: Any, key: str) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
    else:
        parts = list(np.atleast_1d(value))
    try:
        return np.asarray([float(p) for p in parts], dtype=np.float32)
    except ValueError:
        raise InputError(f"input option {key}={value!r} must be a number or comma-separated numbers") from None


class _BuiltinInputs(InputReader):
    """The shared base of the built-in readers: a fingerprint that includes the options given."""

    def _options_text(self) -> str:
        return json.dumps(self.options, sort_keys=True, default=str) if self.options else ""

    def fingerprint(self) -> dict[str, str]:
        desc = f"{self.name}:{os.path.abspath(self.path)}"
        if self.options:
            desc += f" {self._options_text()}"
        return {"description": desc, "sha256": sha256_path(self.path)}


# ------------------------------------------------------------------------------------------------ npz


def _copy_rows(mapped: np.ndarray, start: int, stop: int) -> np.ndarray:
    """A copy of rows ``start:stop`` of a memory-mapped array; then the map's pages are dropped from this
    process (they stay in the page cache), so resident memory does not grow with the inputs read so far."""
    rows = np.array(mapped[start:stop])
    handle = getattr(mapped, "_mmap", None)
    if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
        handle.madvise(mmap.MADV_DONTNEED)
    return rows


class _NpzMember:
    """One array of an ``.npz``: memory-mapped when stored uncompressed, otherwise streamed forward.

    Its header is checked against the bytes the member really holds before anything is allocated."""

    def __init__(self, path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, file_size: int) -> None:
        self.path, self.zf, self.member, self.name = path, zf, info.filename, name
        self._stream: IO[bytes] | None = None
        self._pos = 0
        self._full: np.ndarray | None = None
        where = f"array {name!r} in {shown(path)}"
        if info.flag_bits & 0x1:
            raise InputError(f"{where} is encrypted; save the inputs with numpy.savez")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InputError(
                f"{where} is compressed with zip method {info.compress_type}; numpy.savez and savez_compressed "
                "write stored or deflated members: save the inputs with one of them"
            )
        try:
            with zf.open(info) as fh:
                header = read_npy_header(fh, where)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise InputError(f"{where} is damaged ({exc}); save the inputs again") from None
        self.shape, self.fortran, self.dtype = header.shape, header.fortran, header.dtype
        if not self.shape:
            raise InputError(f"{where} is a scalar; inputs need the examples on axis 0")
        self.row_bytes = header.row_bytes
        self._memmap: np.ndarray | None = None
        if info.compress_type == zipfile.ZIP_STORED:
            # the local file header has variable-length fields; read it to find where the data starts
            with open(path, "rb") as raw:
                raw.seek(info.header_offset)
                local = raw.read(30)
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            offset = info.header_offset + 30 + name_len + extra_len + header.header_bytes
            stored = min(info.file_size - header.header_bytes, file_size - offset)
        else:  # deflate expands at most DEFLATE_MAX_RATIO times: a larger declaration cannot be real
            offset = -1
            stored = min(info.file_size, DEFLATE_MAX_RATIO * info.compress_size + 1024) - header.header_bytes
        check_npy_stored(header, stored, where)
        if offset >= 0 and not self.fortran and header.nbytes:
            self._memmap = np.memmap(path, dtype=self.dtype, mode="r", offset=offset, shape=self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        try:
            return self._read(start, stop)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise InputError(f"array {self.name!r} in {shown(self.path)} is damaged ({exc}); save it again") from None

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self._memmap is not None:
            return _copy_rows(self._memmap, start, stop)
        if self.fortran:  # rows are not contiguous on disk; rare, so load once (its size was checked)
            if self._full is None:
                log.warning("array %r in %s is Fortran-ordered; loading it whole", self.name, self.path)
                with np.load(self.path, allow_pickle=False) as npz:
                    self._full = npz[self.name]
            return np.array(self._full[start:stop])
        # compressed: the core reads forward in contiguous blocks, so keep one decompressing stream open
        if self._stream is None or start < self._pos:
            self.close()
            self._stream = self.zf.open(self.member)
            read_npy_header(self._stream, self.name)
            self._pos = 0
        stream = self._stream
        skip = (start - self._pos) * self.row_bytes
        while skip > 0:
            got = len(stream.read(min(skip, 1 << 24)))
            if got == 0:
                break
            skip -= got
        want = (stop - start) * self.row_bytes
        data = stream.read(want)
        if len(data) != want:
            raise InputError(
                f"array {self.name!r} in {shown(self.path)} is truncated (rows {start}:{stop} missing); save it again"
            )
        self._pos = stop
        return np.frombuffer(data, dtype=self.dtype).reshape((stop - start, *self.shape[1:])).copy()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class NpzInputs(_BuiltinInputs):
    """Named arrays in a ``.npz``, passed to the model by name; an ``ids`` array gives the example ids."""

    name = "npz"
    description = ".npz file: every array is a model input by name, except 'ids' (example ids)"

    @classmethod
    def can_open(cls, path: str) -> bool:
        return path.lower().endswith(".npz")

    def __init__(self, path: str, **options: Any) -> None:
        super().__init__(path, **options)
        size = require_regular_file(path, "inputs")
        try:
            self._zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise InputError(
                f"cannot read inputs {shown(path)}: {exc}; expected a .npz written by numpy.savez"
            ) from None
        self._members: dict[str, _NpzMember] = {}
        try:
            for info in self._zip.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                name = info.filename[: -len(".npy")]
                self._members[name] = _NpzMember(path, self._zip, info, name, size)
            ids_member = self._members.pop(IDS_NAME, None)
            self._n = check_lengths({k: len(m) for k, m in self._members.items()}, path)
            if ids_member is not None:
                if len(ids_member) != self._n:
                    raise InputError(
                        f"'{IDS_NAME}' in {path} has {len(ids_member)} entries but the inputs have {self._n} examples; "
                        "give exactly one id per example"
                    )
                self._ids = check_ids(ids_member.read(0, len(ids_member)), path)
            else:
                self._ids = np.arange(self._n, dtype=np.int64)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return self._n

    def ids(self) -> np.ndarray:
        return self._ids

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: m.read(start, stop) for name, m in self._members.items()}

    def close(self) -> None:
        for m in self._members.values():
            m.close()
        self._zip.close()


# ------------------------------------------------------------------------------------------------ npy


class NpyInputs(_BuiltinInputs):
    """One array in a ``.npy`` (memory-mapped), given to the model as its input ``"input"``."""

    name = "npy"
    description = ".npy file: one array, the model's single input (examples on axis 0)"
    input_name = "input"

    @classmethod
    def can_open(cls, path: str) -> bool:
        return path.lower().endswith(".npy")

    def __init__(self, path: str, **options: Any) -> None:
        super().__init__(path, **options)
        where = f"inputs {shown(path)}"
        size = require_regular_file(path, "inputs")
        with open(path, "rb") as fh:
            header = read_npy_header(fh, where)
        if not header.shape:
            raise InputError(f"the array in {shown(path)} is a scalar; inputs need the examples on axis 0")
        check_npy_stored(header, size - header.header_bytes, where)
        self._array: np.ndarray
        if header.nbytes == 0:  # no examples: nothing to map
            self._array = np.empty(header.shape, dtype=header.dtype)
        else:
            order: Literal["C", "F"] = "F" if header.fortran else "C"
            self._array = np.memmap(
                path, dtype=header.dtype, mode="r", offset=header.header_bytes, shape=header.shape, order=order
            )

    def __len__(self) -> int:
        return int(self._array.shape[0])

    def ids(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {self.input_name: _copy_rows(self._array, start, stop)}

    def close(self) -> None:
        # an empty array of the same kind in its place drops the memory map
        self._array = np.empty((0, *self._array.shape[1:]), dtype=self._array.dtype)


# ----------------------------------------------------------------------------------------------- HDF5


def _split_h5(path: str) -> tuple[str, str | None]:
    """``file.h5:/a/b`` -> (``file.h5``, ``/a/b``); a plain path -> (path, None)."""
    lower = path.lower()
    for ext in HDF5_EXTENSIONS:
        idx = lower.rfind(ext + ":")
        if idx >= 0:
            cut = idx + len(ext)
            return path[:cut], path[cut + 1 :]
    return path, None


class HDF5Inputs(_BuiltinInputs):
    """Datasets in an HDF5 file: ``file.h5:/path/to/dataset`` or ``file.h5`` with option ``dataset=...``.

    Options: ``dataset`` (one path, or several comma-separated; each is a model input named by its
    basename), ``ids`` (path of a dataset of example ids), ``allow_external`` (read datasets whose values
    live in other files: external links, virtual datasets, external storage; refused by default, as for
    activation files). A file with a single dataset needs neither path.
    """

    name = "hdf5"
    declared_options = (
        Option(
            "dataset", str, None, "dataset path(s) in the file, comma-separated, each an input named by its basename"
        ),
        Option("ids", str, None, "path of a dataset of example ids in the file (default: row numbers)"),
        Option(
            "allow_external",
            bool,
            False,
            "read datasets whose values live in other files (external links, virtual datasets, external "
            "storage): only for files you trust (cka-extract --allow-external)",
        ),
    )
    description = "HDF5 dataset: file.h5:/path/to/dataset (input named by the basename), ids with option ids=/path"

    @classmethod
    def can_open(cls, path: str) -> bool:
        file, _ = _split_h5(path)
        return file.lower().endswith(HDF5_EXTENSIONS)

    def __init__(self, path: str, **options: Any) -> None:
        super().__init__(path, **options)
        import h5py

        self.file, inner = _split_h5(path)
        datasets = inner or self.option_values["dataset"]
        self._allow_external: bool = self.option_values["allow_external"]
        require_regular_file(self.file, "inputs")
        try:
            self._h5 = h5py.File(self.file, "r")
        except OSError as exc:
            raise InputError(f"cannot open inputs {shown(self.file)}: {exc}") from None
        try:
            if not datasets:
                found: list[str] = []
                self._h5.visititems(lambda n, o: found.append("/" + n) if isinstance(o, h5py.Dataset) else None)
                if len(found) != 1:
                    listing = ", ".join(found[:10]) or "none"
                    raise InputError(
                        f"{self.file} holds {len(found)} datasets ({listing}); name the input as "
                        f"{self.file}:/path/to/dataset or with --input-option dataset=/path"
                    )
                datasets = found[0]
            paths = [d.strip() for d in str(datasets).split(",") if d.strip()]
            self._datasets = {}
            for p in paths:
                ds = self._dataset(p)
                if ds.dtype.kind == "O":
                    raise InputError(
                        f"dataset {p} in {self.file} has variable-length type {ds.dtype}; inputs must be numeric"
                    )
                if ds.ndim == 0:
                    raise InputError(f"dataset {p} in {self.file} is a scalar; inputs need the examples on axis 0")
                self._datasets[p.rstrip("/").rsplit("/", 1)[-1]] = ds
            self._n = check_lengths({k: d.shape[0] for k, d in self._datasets.items()}, self.file)
            ids_path = self.option_values["ids"]
            if ids_path:
                ids_ds = self._dataset(ids_path)
                if ids_ds.dtype.kind == "O" and h5py.check_string_dtype(ids_ds.dtype) is None:
                    raise InputError(
                        f"ids {ids_path} in {self.file} have type {ids_ds.dtype}; ids must be integers or strings"
                    )
                if ids_ds.ndim != 1 or len(ids_ds) != self._n:
                    raise InputError(
                        f"ids {ids_path} in {self.file} has shape {ids_ds.shape}, the inputs {self._n} examples; "
                        "give one id per example"
                    )
                self._ids = check_ids(self._guarded(lambda: ids_ds[()], f"ids {ids_path}"), f"{self.file}:{ids_path}")
            else:
                self._ids = np.arange(self._n, dtype=np.int64)
        except BaseException:
            self._h5.close()
            raise

    def _dataset(self, p: str) -> Any:
        """Dataset ``p``, checked: it reads no other file (unless allowed) and stores what it declares."""
        import h5py

        from .store.links import refuse_external_path
        from .store.reader import check_stored

        if not self._allow_external:
            refuse_external_path(self._h5, self.file, p)
        obj = self._guarded(lambda: self._h5.get(p), f"object {p}")
        if not isinstance(obj, h5py.Dataset):
            raise InputError(f"{self.file} has no dataset {p!r}; check the path (h5ls -r {self.file})")
        what = f"dataset {p}"
        if obj.ndim and obj.shape[0] > 0 and obj.size == 0:
            raise InputError(
                f"{self.file}: {what} declares {obj.shape[0]} examples with no values (shape {obj.shape}); "
                "every example needs at least one value"
            )
        self._guarded(lambda: check_stored(obj, self.file, what, fix=_SAVE_AGAIN, error=InputError), what)
        from .store.filters import require_filters  # the one place filters are loaded (writer, reader, inputs)

        require_filters(obj, self.file, what)
        return obj

    def _guarded(self, read: Any, what: str) -> Any:
        """``read()``, with HDF5's errors for a damaged file (or a missing filter) as one InputError."""
        try:
            return read()
        except CKAOfflineError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            detail = " ".join(str(exc).split())[:160]
            raise InputError(f"{self.file}: cannot read {what} ({detail}); {_SAVE_AGAIN}") from None

    def __len__(self) -> int:
        return self._n

    def ids(self) -> np.ndarray:
        return self._ids

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {
            name: self._guarded(lambda ds=ds: ds[start:stop], f"rows {start}:{stop} of dataset {ds.name}")
            for name, ds in self._datasets.items()
        }

    def _options_text(self) -> str:
        # allow_external is a trust decision, not a setting: the same inputs read with it are the same inputs
        kept = {k: v for k, v in self.options.items() if k != "allow_external"}
        return json.dumps(kept, sort_keys=True, default=str) if kept else ""

    def fingerprint(self) -> dict[str, str]:
        desc = f"{self.name}:{os.path.abspath(self.file)}:{','.join(self._datasets)}"
        options = self._options_text()
        if options:
            desc += f" {options}"
        return {"description": desc, "sha256": sha256_path(self.file)}

    def close(self) -> None:
        self._h5.close()


# --------------------------------------------------------------------------------------------- images


class ImageFolderInputs(_BuiltinInputs):
    """A folder of images, sorted recursively; ids are the paths relative to the folder.

    Images become channels-first float32 arrays in [0, 1], then ``(x - mean) / std``. Options:
    ``resize=HxW`` (needed unless every image has one size), ``mean`` and ``std`` (one number or one per
    channel, comma-separated), ``grayscale`` (one channel instead of RGB), ``name`` (input name, "input").
    """

    name = "images"
    declared_options = (
        Option("resize", object, None, "HxW, for example 224x224 (needed unless every image has one size)"),
        Option("mean", object, None, "subtracted: one number, or one per channel comma-separated"),
        Option("std", object, None, "divided by (after the mean): one number, or one per channel comma-separated"),
        Option("grayscale", bool, False, "true for one channel instead of RGB"),
        Option("name", str, "input", "the model input the images are given as"),
    )
    description = "folder of images (png, jpg, ...): options resize=HxW, mean=, std=, grayscale=true, name="

    @classmethod
    def can_open(cls, path: str) -> bool:
        return os.path.isdir(path)

    def __init__(self, path: str, **options: Any) -> None:
        super().__init__(path, **options)
        rel = _image_files(path)
        self._files = rel
        self._ids = np.asarray(rel, dtype=str)
        values = self.option_values
        self.input_name: str = values["name"]
        self.grayscale: bool = values["grayscale"]
        self.size = self._parse_size(values["resize"])
        self.mean = _parse_floats(values["mean"], "mean")
        self.std = _parse_floats(values["std"], "std")
        channels = 1 if self.grayscale else 3
        for key, vec in (("mean", self.mean), ("std", self.std)):
            if vec is not None and len(vec) not in (1, channels):
                raise InputError(f"image option {key} has {len(vec)} values; give 1 or {channels} (one per channel)")
        if self.std is not None and np.any(self.std == 0):
            raise InputError("image option std must not contain 0")
        self._shape = self._load(0).shape

    @staticmethod
    def _parse_size(value: Any) -> tuple[int, int] | None:
        if value is None:
            return None
        if isinstance(value, str):
            parts = value.lower().replace("*", "x").split("x")
        else:
            parts = list(value)
        try:
            h, w = (int(p) for p in parts)
        except (TypeError, ValueError):
            raise InputError(f"image option resize={value!r} must be HxW, for example 224x224") from None
        if h <= 0 or w <= 0:
            raise InputError(f"image option resize={value!r} must be positive")
        return h, w

    def _load(self, index: int) -> np.ndarray:
        from .images import load_image

        full = os.path.join(self.path, self._files[index])
        require_regular_file(full, "image")  # replaced by a FIFO since the folder was listed: never open it
        arr = load_image(full, grayscale=self.grayscale, size=self.size)
        if self.mean is not None:
            arr = arr - self.mean.reshape(-1, 1, 1)
        if self.std is not None:
            arr = arr / self.std.reshape(-1, 1, 1)
        return np.ascontiguousarray(arr, dtype=np.float32)

    def __len__(self) -> int:
        return len(self._files)

    def ids(self) -> np.ndarray:
        return self._ids

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        out = np.empty((stop - start, *self._shape), dtype=np.float32)
        for i in range(start, stop):
            arr = self._load(i)
            if arr.shape != self._shape:
                raise InputError(
                    f"image {self._files[i]} in {self.path} has shape {arr.shape[1:]} (HxW), the first image "
                    f"{self._shape[1:]}; give a common size with --input-option resize=HxW"
                )
            out[i - start] = arr
        return {self.input_name: out}

    def fingerprint(self) -> dict[str, str]:
        digest = hashlib.sha256()
        for rel in self._files:  # only the images that are read, not other files in the folder
            digest.update(rel.encode())
            digest.update(bytes.fromhex(sha256_path(os.path.join(self.path, rel))))
        desc = f"{self.name}:{os.path.abspath(self.path)}"
        if self.options:
            desc += f" {self._options_text()}"
        return {"description": desc, "sha256": digest.hexdigest()}


def _image_files(folder: str) -> list[str]:
    """The image files under ``folder`` (recursively, sorted), as ``/``-separated relative paths; refuses a
    name that is not valid UTF-8 (ids are stored as UTF-8; shown with ``\\xNN`` escapes) and anything but
    a regular file (a FIFO named ``x.png`` would block the reader forever)."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in names:
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if not utf8_name(rel):
                raise InputError(
                    f"image file name '{shown(rel)}' under {shown(folder)} is not valid UTF-8; example ids are "
                    "the file names, stored as UTF-8 text: rename it (e.g. convmv -f latin1 -t utf-8)"
                )
            require_regular_file(full, "image")
            files.append(rel)
    if not files:
        raise InputError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {shown(folder)}")
    return sorted(files)


BUILTIN_READERS: Sequence[type[InputReader]] = (NpzInputs, NpyInputs, HDF5Inputs, ImageFolderInputs)


@hookimpl
def cka_input_readers() -> list[type[InputReader]]:
    return list(BUILTIN_READERS)


__all__ = ["NpzInputs", "NpyInputs", "HDF5Inputs", "ImageFolderInputs", "check_ids", "cka_input_readers"]
