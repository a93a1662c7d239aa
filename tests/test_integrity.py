"""selection.common.integrity: named errors for bad .npy files and records, digests cached per file version."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from selection.common import integrity
from selection.common.integrity import ArtifactIntegrityError


def test_open_npy_names_truncated_garbage_and_changed_files(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    np.save(path, np.arange(12, dtype=np.float32).reshape(3, 4))
    record = integrity.file_record(path)
    good = integrity.open_npy(path, asset="some_asset", **record)
    np.testing.assert_array_equal(good, np.arange(12).reshape(3, 4))

    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 8)
    with pytest.raises(ArtifactIntegrityError, match=r"a\.npy: is \d+ bytes but its header .* needs") as error:
        integrity.open_npy(path, asset="some_asset")
    assert "rematerialize some_asset" in str(error.value) and error.value.path == path
    with pytest.raises(ArtifactIntegrityError, match="was .* bytes when committed"):
        integrity.open_npy(path, asset="some_asset", **record)

    path.write_bytes(b"not an npy file at all")
    with pytest.raises(ArtifactIntegrityError, match=r"a\.npy: is not a readable \.npy"):
        integrity.open_npy(path, asset=None)

    np.save(path, np.arange(12, dtype=np.float32).reshape(3, 4)[::-1].copy())  # same size, other values
    integrity.forget_digests()
    with pytest.raises(ArtifactIntegrityError, match="differs from the .* recorded at commit"):
        integrity.open_npy(path, asset="some_asset", **record)
    with pytest.raises(ArtifactIntegrityError, match="is missing"):
        integrity.verify_file(tmp_path / "gone.npy", sha256=None, asset="x")


def test_digest_is_computed_once_per_file_version(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 100)
    calls = []
    real = integrity.hashlib.sha256
    monkeypatch.setattr(integrity.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    first = integrity.file_sha256(path)
    assert integrity.file_sha256(path) == first and len(calls) == 1
    stat = path.stat()
    path.write_bytes(b"b" * 100)  # same size; a later mtime marks the new version
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert integrity.file_sha256(path) != first and len(calls) == 2
