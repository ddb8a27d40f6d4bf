"""Remembered SHA-256 digests: right the first time, reused for an unchanged file, recomputed otherwise."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from cka_offline import digests


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CKA_OFFLINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CKA_OFFLINE_HASH_CACHE", raising=False)
    return tmp_path / "cache" / "sha256.json"


def test_digest_is_sha256_and_is_remembered(tmp_path, cache):
    path = tmp_path / "a.h5"
    path.write_bytes(b"x" * 10_000_000)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digests.file_sha256(str(path), block=1 << 20) == want
    entries = json.loads(cache.read_text())
    assert list(entries.values()) == [want]
    # a remembered digest is returned without reading the file: prove it by planting another value
    (key,) = entries
    cache.write_text(json.dumps({key: "planted"}))
    assert digests.file_sha256(str(path)) == "planted"


def test_same_size_same_mtime_rewrite_is_hashed_again(tmp_path, cache):
    """Content changed in place with the size and mtime put back: the status-change time still differs."""
    path = tmp_path / "a.h5"
    path.write_bytes(b"a" * 1000)
    first = digests.file_sha256(str(path))
    st = os.stat(path)
    with open(path, "r+b") as fh:
        fh.write(b"b")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = digests.file_sha256(str(path))
    assert second == hashlib.sha256(b"b" + b"a" * 999).hexdigest() != first


def test_replaced_file_is_hashed_again(tmp_path, cache):
    path = tmp_path / "a.h5"
    path.write_bytes(b"one")
    assert digests.file_sha256(str(path)) == hashlib.sha256(b"one").hexdigest()
    other = tmp_path / "b.h5"
    other.write_bytes(b"two")
    os.replace(other, path)
    assert digests.file_sha256(str(path)) == hashlib.sha256(b"two").hexdigest()


def test_cache_off_unwritable_or_corrupt_changes_nothing(tmp_path, cache, monkeypatch):
    path = tmp_path / "a.h5"
    path.write_bytes(b"data")
    want = hashlib.sha256(b"data").hexdigest()
    monkeypatch.setenv("CKA_OFFLINE_HASH_CACHE", "0")
    assert digests.cache_path() is None and digests.file_sha256(str(path)) == want and not cache.exists()
    monkeypatch.delenv("CKA_OFFLINE_HASH_CACHE")
    cache.parent.mkdir()
    cache.write_text("{not json")
    assert digests.file_sha256(str(path)) == want
    assert json.loads(cache.read_text()) != {}  # rewritten as a valid cache
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    monkeypatch.setenv("CKA_OFFLINE_CACHE_DIR", str(blocker / "sub"))
    assert digests.file_sha256(str(path)) == want


def test_cancelled_hash_returns_none_and_remembers_nothing(tmp_path, cache):
    path = tmp_path / "a.h5"
    path.write_bytes(b"z" * 3000)
    assert digests.file_sha256(str(path), cancelled=lambda: True, block=1000) is None
    assert not cache.exists()


def test_old_entries_are_dropped(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(digests, "MAX_ENTRIES", 3)
    paths = []
    for i in range(5):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes([i]))
        paths.append(p)
        digests.file_sha256(str(p))
    entries = json.loads(cache.read_text())
    assert len(entries) == 3
    assert any(json.loads(k)[0] == os.path.realpath(paths[-1]) for k in entries)
    assert not any(json.loads(k)[0] == os.path.realpath(paths[0]) for k in entries)


def test_cache_folder_is_the_platforms_unless_overridden(tmp_path, monkeypatch):
    import platformdirs

    monkeypatch.delenv("CKA_OFFLINE_HASH_CACHE", raising=False)
    monkeypatch.setenv("CKA_OFFLINE_CACHE_DIR", str(tmp_path / "mine"))
    assert digests.cache_path() == str(tmp_path / "mine" / "sha256.json")
    monkeypatch.delenv("CKA_OFFLINE_CACHE_DIR")
    assert digests.cache_dir() == platformdirs.user_cache_dir("cka-offline", appauthor=False)
    if os.name == "posix" and not platformdirs.user_cache_dir().startswith(os.path.expanduser("~/Library")):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert digests.cache_path() == str(tmp_path / "xdg" / "cka-offline" / "sha256.json")


def test_files_sha256_counts_content_not_names_or_order(tmp_path):
    import hashlib

    from cka_offline.digests import files_sha256

    a, b = tmp_path / "a.py", tmp_path / "sub" / "b.py"
    b.parent.mkdir()
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    each = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b))
    assert files_sha256([str(a), str(b)]) == hashlib.sha256("\n".join(each).encode()).hexdigest()
    assert files_sha256([str(b), str(a), str(a)]) == files_sha256([str(a), str(b)])  # order, repeats
    moved = tmp_path / "elsewhere.py"
    moved.write_text("x = 1\n")
    assert files_sha256([str(moved), str(b)]) == files_sha256([str(a), str(b)])  # location
    b.write_text("y = 3\n")
    assert files_sha256([str(a), str(b)]) != files_sha256([str(moved), str(tmp_path / "missing.py")])
