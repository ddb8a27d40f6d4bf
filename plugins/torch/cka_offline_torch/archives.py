"""Judging model archives by their content, and loading them so that nothing in them can run code.

A ``.pt2`` (or any zip a torch loader reads) is judged entry by entry, whatever the entries are called:
torch's loaders choose what to unpickle by names that change between torch versions (the older
``.pt2`` layout unpickles ``serialized_state_dict.json``), so a name says nothing about safety. An entry
is refused when its bytes are:

- a pickle (any protocol, any number of them in a row, as torch's legacy format reads them) that names
  a global outside torch's ``weights_only`` allowlist, or builds one it cannot name statically;
- a zip inside the zip (a ``torch.save`` checkpoint): its entries are judged the same way, and a
  TorchScript archive inside is refused (loading it runs its code);
- compiled code (ELF, Mach-O, PE: what AOTInductor packages carry and ``dlopen``).

:func:`no_unsafe_loads` is the second line: while it is active, every ``torch.load`` is forced to
``weights_only=True`` and torch's other unpicklers and AOTInductor loaders refuse, so a loader that the
scan does not know cannot fall back to an unsafe load either.
"""

from __future__ import annotations

import contextlib
import io
import pickletools
import re
import zipfile
from collections.abc import Iterator
from typing import IO, Any

#: magic numbers of compiled code (ELF; Mach-O 32/64 both byte orders and fat; PE/DOS)
NATIVE_MAGIC = (b"\x7fELF", b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe", b"\xcf\xfa\xed\xfe")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NAME = re.compile(r"^[A-Za-z_][\w.]*$")
_GLOBAL_OPS = frozenset({"GLOBAL", "INST"})
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
)
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_CODE2OP: dict[str, Any] = {op.code: op for op in pickletools.opcodes}
#: strings longer than this are skipped, not read (a module or class name is never this long)
_MAX_NAME = 512
_MAX_DEPTH = 3


class UnsafeLoadRefused(Exception):
    """Raised inside :func:`no_unsafe_loads` when torch tries to unpickle or load code."""


def _allowed_globals() -> set[str]:
    from torch import _weights_only_unpickler as wou

    return set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())


def _read_arg(stream: IO[bytes], arg: Any) -> tuple[Any, bool]:
    """``(value, ok)`` of one opcode argument; long byte strings are skipped (value ``None``)."""
    n = arg.n
    if n >= 0:
        data = stream.read(n)
        return data, len(data) == n
    if n == pickletools.UP_TO_NEWLINE:
        line = stream.readline(_MAX_NAME)
        return line, line.endswith(b"\n")
    width = {
        pickletools.TAKEN_FROM_ARGUMENT1: 1,
        pickletools.TAKEN_FROM_ARGUMENT4: 4,
        pickletools.TAKEN_FROM_ARGUMENT4U: 4,
        pickletools.TAKEN_FROM_ARGUMENT8U: 8,
    }[n]
    head = stream.read(width)
    if len(head) != width:
        return None, False
    size = int.from_bytes(head, "little", signed=n == pickletools.TAKEN_FROM_ARGUMENT4)
    if size < 0:
        return None, False
    if size <= _MAX_NAME:
        data = stream.read(size)
        return data, len(data) == size
    left = size
    while left:  # skip without holding it: a weight blob can look like a huge BINBYTES
        got = len(stream.read(min(left, 1 << 20)))
        if not got:
            return None, False
        left -= got
    return None, True


def _memo_key(value: Any) -> int | None:
    """A memo index from a PUT/GET argument: a text line (protocol 0) or a little-endian integer."""
    if not isinstance(value, bytes):
        return None
    if value.endswith(b"\n"):
        return int(value) if value.strip().isdigit() else None
    return int.from_bytes(value, "little")


def pickle_globals(stream: IO[bytes]) -> tuple[list[str], bool]:
    """``(globals, is_pickle)`` of the pickles at the start of ``stream``, read as an unpickler would.

    An unpickler runs each opcode as it reads it, so a global counts even when garbage follows it; the
    pickles are followed one after another (torch's legacy format reads several). A global whose name is
    not pushed right before it (``STACK_GLOBAL`` of values built on the stack, ``EXT*`` codes) is
    ``"<dynamic>"``. ``is_pickle`` is true when the stream starts with a protocol marker or names a global.
    """
    found: list[str] = []
    started = False
    pushed: list[str | None] = []  # what each push put on the stack, where a global's name needs it
    memo: dict[int | None, str | None] = {}
    first = True
    while True:
        code = stream.read(1)
        if not code:
            break
        op = _CODE2OP.get(code.decode("latin-1"))
        if op is None:
            break
        if first and op.name == "PROTO":
            started = True
        first = False
        value, ok = (None, True) if op.arg is None else _read_arg(stream, op.arg)
        if not ok:
            break
        name = op.name
        if name in _GLOBAL_OPS:
            more, ok = _read_arg(stream, op.arg)  # GLOBAL/INST take two lines: module, then name
            if not ok or not isinstance(value, bytes) or not isinstance(more, bytes):
                break
            module, attr = value.decode("latin-1").rstrip("\n"), more.decode("latin-1").rstrip("\n")
            if _NAME.match(module) and _NAME.match(attr):
                found.append(f"{module}.{attr}")
            elif started:
                found.append("<dynamic>")
            else:
                break  # not a pickle after all (bytes that began like one)
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            module_s, attr_s = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            if module_s and attr_s and _NAME.match(module_s) and _NAME.match(attr_s):
                found.append(f"{module_s}.{attr_s}")
            elif started or found:
                found.append("<dynamic>")
            pushed.append(None)
        elif name in _EXT_OPS:
            if started or found:
                found.append("<dynamic>")
            pushed.append(None)
        elif name in _STRING_OPS:
            text = None
            if isinstance(value, bytes):
                raw = value.rstrip(b"\n").strip(b"'\"") if name in ("UNICODE", "STRING") else value
                text = raw.decode("utf-8", "replace")
            pushed.append(text)
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in _PUT_OPS:
            memo[_memo_key(value)] = pushed[-1] if pushed else None
        elif name in _GET_OPS:
            pushed.append(memo.get(_memo_key(value)))
        elif name == "STOP":
            pushed, memo, first = [], {}, True
            if not (started or found):
                break
        else:
            pushed.append(None)
        del pushed[:-4]
    return found, started or bool(found)


def _is_native(head: bytes, stream: IO[bytes]) -> bool:
    """Compiled code: ELF, Mach-O (thin or fat), or a PE file (``MZ`` with a ``PE`` header where it points)."""
    if head.startswith(NATIVE_MAGIC) or head.startswith(b"\xca\xfe\xba\xbe"):
        return True
    if not head.startswith(b"MZ"):
        return False
    dos = head + stream.read(60)
    if len(dos) < 64:
        return False
    offset = int.from_bytes(dos[60:64], "little")
    if offset > 1 << 16:
        return False
    rest = stream.read(max(0, offset - 64) + 4)
    return rest[offset - 64 : offset - 60] == b"PE\x00\x00" if offset >= 64 else False


def judge_bytes(name: str, stream: IO[bytes], depth: int = 0) -> list[str]:
    """Why the entry ``name`` (read from the rewindable ``stream``) could run code when loaded; [] if it cannot."""
    head = stream.read(4)
    if head.startswith(_ZIP_MAGIC):
        stream.seek(0)
        return judge_zip(stream, name, depth + 1)
    if _is_native(head, stream):
        return [f"{name} (compiled code)"]
    stream.seek(0)
    found, is_pickle = pickle_globals(stream)
    if not is_pickle:
        return []
    unsafe = sorted(set(found) - _allowed_globals())
    return [f"{name} (a pickle naming {', '.join(unsafe[:3])})"] if unsafe else []


def is_torchscript_zip(archive: zipfile.ZipFile) -> bool:
    """A TorchScript archive: ``constants.pkl`` or a ``code/`` folder, at the top or in the archive's folder."""
    for entry in archive.namelist():
        inner = entry.split("/", 1)[1] if "/" in entry else entry
        if inner == "constants.pkl" or inner.startswith("code/") or entry == "constants.pkl":
            return True
    return False


def judge_zip(source: str | IO[bytes], where: str = "", depth: int = 0) -> list[str]:
    """Every entry of the zip ``source`` that could run code when a torch loader reads it (judged by content)."""
    label = f"{where}:" if where else ""
    if depth > _MAX_DEPTH:
        return [f"{where} (zip files nested more than {_MAX_DEPTH} deep)"]
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return [f"{where or source} (an unreadable zip: {exc})"] if depth else []
    reasons: list[str] = []
    with archive:
        if depth and is_torchscript_zip(archive):
            return [f"{where} (a TorchScript archive, whose code runs when it is loaded)"]
        for info in archive.infolist():
            if info.is_dir():
                continue
            try:
                with archive.open(info) as member:
                    head = member.read(4)
                if head.startswith(_ZIP_MAGIC):
                    stream: IO[bytes] = io.BytesIO(archive.read(info))  # a zip reader needs to seek
                else:
                    stream = _Rewindable(archive, info)  # type: ignore[assignment]
                reasons += judge_bytes(label + info.filename, stream, depth)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
                reasons.append(f"{label}{info.filename} (unreadable: {exc})")
    return reasons


class _Rewindable(io.RawIOBase):
    """A zip member read as a stream that can go back to its start (by opening it again)."""

    def __init__(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
        self._archive, self._info = archive, info
        self._fh = archive.open(info)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._fh.read(size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._fh.readline(-1 if size is None else size)

    def seek(self, offset: int, whence: int = 0) -> int:
        if (offset, whence) != (0, 0):
            raise io.UnsupportedOperation("only a rewind")
        self._fh.close()
        self._fh = self._archive.open(self._info)
        return 0

    def close(self) -> None:
        self._fh.close()
        super().close()


@contextlib.contextmanager
def no_unsafe_loads(what: str) -> Iterator[list[str]]:
    """While active, torch cannot unpickle code or load compiled code; yields the list of attempts refused.

    ``torch.load`` runs with ``weights_only=True`` whatever its caller asked (a caller that asked for
    ``weights_only=False`` gets :class:`UnsafeLoadRefused`); ``pickle.loads`` and torch's own object
    unpickler inside the archive loader, and the AOTInductor package loader, raise it too. ``what`` names
    the file in the refusal.
    """
    import torch
    import torch.export.pt2_archive._package as package

    attempts: list[str] = []
    real_load = torch.load

    def refuse(kind: str) -> UnsafeLoadRefused:
        attempts.append(kind)
        return UnsafeLoadRefused(f"{what}: refused {kind}")

    def safe_load(f: Any, *args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:
        if weights_only is False:
            raise refuse("an unpickling torch.load(weights_only=False)")
        kwargs.pop("pickle_module", None)
        return real_load(f, *args, weights_only=True, **kwargs)

    def refuse_pickle(*_: Any, **__: Any) -> Any:
        raise refuse("pickle.loads of an archive object")

    def refuse_native(*_: Any, **__: Any) -> Any:
        raise refuse("loading compiled AOTInductor code")

    class _NoPickle:
        loads = staticmethod(refuse_pickle)
        load = staticmethod(refuse_pickle)

        def __getattr__(self, item: str) -> Any:
            import pickle

            return getattr(pickle, item)

    patches: list[tuple[Any, str, Any]] = [
        (torch, "load", safe_load),
        (torch.serialization, "load", safe_load),
        (torch._C, "_pickle_load_obj", refuse_pickle),
        (package, "pickle", _NoPickle()),
        (package, "_load_aoti", refuse_native),
    ]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches if hasattr(obj, attr)]
    try:
        for obj, attr, value in patches:
            if hasattr(obj, attr):
                setattr(obj, attr, value)
        yield attempts
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


__all__ = ["UnsafeLoadRefused", "is_torchscript_zip", "judge_bytes", "judge_zip", "no_unsafe_loads", "pickle_globals"]
