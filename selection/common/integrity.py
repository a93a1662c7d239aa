"""Verify stored artifacts against the sha256 and size recorded when they were committed.

Every artifact a later step reads (gradient feature chunks, embedding cache chunks,
influence matrices, warmup adapters and Adam moments) has its sha256 and size written
next to it at commit time (:func:`file_record` / :func:`directory_record`). Readers call
:func:`verify_file` / :func:`verify_record` or open arrays with :func:`open_npy`; a
mismatch, a truncated file or an unreadable ``.npy`` raises :class:`ArtifactIntegrityError`,
whose message names the file and the asset whose rematerialization rewrites it.

Hashing is done once per process per file version: digests are cached by (path, device,
inode, size, mtime_ns, ctime_ns), so a step that opens the same chunk many times, or the
commit that just wrote it, pays for one read. Size is checked before hashing (free).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

_HASH_CHUNK = 1 << 22
_digests: dict[tuple, str] = {}
_digests_lock = threading.Lock()
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


class ArtifactIntegrityError(ValueError):
    """A stored artifact is missing, truncated, unreadable or differs from its commit record.

    The message names the file, the problem and the fix: ``fix`` when given, else rematerializing
    ``asset``."""

    def __init__(self, path: str | os.PathLike, problem: str, asset: str | None, fix: str | None = None) -> None:
        self.path = Path(path)
        self.problem = problem
        self.asset = asset
        if fix is None:
            fix = f"rematerialize {asset} to recompute it" if asset else ""
        super().__init__(f"{self.path}: {problem}" + (f"; {fix}" if fix else ""))


def _cache_key(path: Path, stat: os.stat_result) -> tuple:
    return (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, computed once per file version in this process."""
    path = Path(path)
    key = _cache_key(path, path.stat())
    with _digests_lock:
        cached = _digests.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    # A file rewritten while we read it has another stat now: do not cache that digest under either version.
    if _cache_key(path, path.stat()) == key:
        with _digests_lock:
            _digests[key] = value
    return value


def remember_digest(path: str | os.PathLike, sha256: str) -> None:
    """Cache the digest a writer computed from the bytes it just committed (saves one read)."""
    path = Path(path)
    with _digests_lock:
        _digests[_cache_key(path, path.stat())] = sha256


def forget_digests() -> None:
    """Drop every cached digest (e.g. after files were changed by hand in this process)."""
    with _digests_lock:
        _digests.clear()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"sha256", "size"}`` of a file, to store in its commit record."""
    path = Path(path)
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def directory_record(directory: str | os.PathLike, files: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Records of ``files`` (relative names; default every file under ``directory``), keyed by relative name."""
    directory = Path(directory)
    if files is None:
        files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    return {name: file_record(directory / name) for name in files}


def verify_file(path: str | os.PathLike, *, sha256: str | None, size: int | None = None, asset: str | None) -> None:
    """Raise :class:`ArtifactIntegrityError` unless ``path`` exists with the recorded size and sha256."""
    path = Path(path)
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError:
        raise ArtifactIntegrityError(path, "is missing", asset) from None
    if size is not None and actual_size != int(size):
        raise ArtifactIntegrityError(
            path, f"is {actual_size} bytes but was {int(size)} bytes when committed (truncated or rewritten)", asset
        )
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256:
            raise ArtifactIntegrityError(
                path,
                f"sha256 {actual[:16]}... differs from the {sha256[:16]}... recorded at commit "
                "(the file was changed after it was written)",
                asset,
            )


def verify_record(directory: str | os.PathLike, record: Mapping[str, Mapping[str, Any]], *, asset: str | None) -> None:
    """Check every file of a :func:`directory_record` under ``directory``; an entry without its
    sha256 and size is refused, never trusted unchecked."""
    for name, entry in record.items():
        path = Path(directory) / name
        sha256, size = recorded(path, entry, asset)
        verify_file(path, sha256=sha256, size=size, asset=asset)


def recorded(path: str | os.PathLike, entry: Any, asset: str | None) -> tuple[str, int]:
    """``(sha256, size)`` of a :func:`file_record` entry of ``path``; an entry without them (edited, or
    written before records had them) is an :class:`ArtifactIntegrityError`: never trusted unchecked."""
    if not (isinstance(entry, Mapping) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)):
        raise ArtifactIntegrityError(path, "its commit record gives no sha256 and size, so it cannot be checked", asset)
    return entry["sha256"], entry["size"]


def read_json(path: str | os.PathLike, *, asset: str | None, fix: str | None = None, expect: type = dict) -> Any:
    """The JSON value (of type ``expect``) of a metadata file the pipeline wrote. A file that is
    not valid JSON (truncated, edited) or holds another type is an :class:`ArtifactIntegrityError`
    naming it and the fix (``fix``, else rematerializing ``asset``); a missing file is left to the
    caller (``FileNotFoundError``), since what that means differs."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ArtifactIntegrityError(path, f"is not valid JSON, truncated or edited ({error})", asset, fix) from error
    if not isinstance(value, expect):
        found, wanted = (_JSON_TYPES.get(t, t.__name__) for t in (type(value), expect))
        raise ArtifactIntegrityError(path, f"holds a JSON {found}, not the {wanted} it was written as", asset, fix)
    return value


def first_problem(check: Any) -> str | None:
    """Run a verification callable; the error message if it raised :class:`ArtifactIntegrityError`, else None."""
    try:
        check()
    except ArtifactIntegrityError as error:
        return str(error)
    return None


def open_npy(
    path: str | os.PathLike,
    *,
    asset: str | None,
    sha256: str | None = None,
    size: int | None = None,
    mmap: bool = True,
) -> np.ndarray:
    """Load a ``.npy`` (memory-mapped by default) after checking its record and that its
    header and length agree; any failure names the file (numpy's own errors do not)."""
    path = Path(path)
    verify_file(path, sha256=None, size=size, asset=asset)
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(handle)
            data_offset = handle.tell()
    except Exception as error:  # numpy raises ValueError, EOFError, SyntaxError... for a bad header
        raise ArtifactIntegrityError(path, f"is not a readable .npy file ({error})", asset) from error
    if dtype.hasobject:
        raise ArtifactIntegrityError(path, f"holds Python objects ({dtype}), not numbers", asset)
    expected = data_offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise ArtifactIntegrityError(
            path, f"is {actual} bytes but its header ({dtype} {shape}) needs {expected} (truncated or damaged)", asset
        )
    if sha256 is not None:
        verify_file(path, sha256=sha256, asset=asset)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as error:
        raise ArtifactIntegrityError(path, f"cannot be read ({error})", asset) from error
