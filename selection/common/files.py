"""Atomic, confined writes: a reader sees a file or folder complete, or not at all, and no write
leaves the storage root.

A new version is built under a temporary sibling name, flushed to disk and renamed over the
final name (a rename within one file system is atomic); on error the temporary is removed.
Temporary names start with :data:`TEMP_PREFIX` and carry the writer's host and pid, so
:func:`remove_stale_temp_dirs` can clear what killed writers left without touching a live
writer's.

Confinement. A storage root registers itself (:func:`register_root`); from then on every file
or folder this module creates or replaces under it is resolved at the moment of the write and
refused (:class:`OutsideRootError`) if a symlink at any depth sends it outside that root. A
path that lies under no registered root (a user's export folder, a test's scratch) is written
as given. Code that writes by other means (DuckDB, torch, safetensors) first passes its target
through :func:`confined`, or writes into a folder made by :func:`make_dirs` or
:func:`atomic_directory`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"
# Resolved storage roots of this process (StorageSettings registers its root when first used).
_ROOTS: set[Path] = set()


class OutsideRootError(ValueError):
    """A write under the storage root that a symlink would send outside it."""


def register_root(root: str | os.PathLike) -> Path:
    """Confine every later write under ``root`` (resolved) to ``root``; returns the resolved root."""
    resolved = Path(root).resolve()
    _ROOTS.add(resolved)
    return resolved


def confined(path: str | os.PathLike) -> Path:
    """``path``, refused if it lies under a registered root but resolves outside it.

    Checked when called, so call it right before the write: a symlink planted at any depth
    (the file itself, or any folder between the root and it) that points outside is refused.
    """
    path = Path(path)
    absolute = Path(os.path.abspath(path))
    owners = [root for root in _ROOTS if absolute == root or absolute.is_relative_to(root)]
    if owners:
        root = max(owners, key=lambda r: len(r.parts))  # the innermost root owns it
        resolved = absolute.resolve()
        if resolved != root and not resolved.is_relative_to(root):
            raise OutsideRootError(
                f"refusing to write {absolute}: a symlink sends it to {resolved}, outside the storage root "
                f"{root}; remove the symlink (every write must stay under the storage root)"
            )
    return path


def make_dirs(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` and its parents, confined to the storage root (checked before
    and after creating, so a symlink at any depth is refused)."""
    path = confined(path)
    path.mkdir(parents=True, exist_ok=True)
    return confined(path)


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A fresh hidden name next to ``path``: ``.tmp-<name>-<host>.<pid>-<8 hex>``."""
    path = Path(path)
    return path.with_name(f"{TEMP_PREFIX}{path.name}-{socket.gethostname()}.{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temporary(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete the folder ``path`` and what it holds, refused if a symlink sends it outside the root."""
    shutil.rmtree(confined(path))


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to create the new file at (by any means, e.g. a
    database engine); on success it is synced to disk and renamed over ``path``."""
    path = confined(path)  # its folder resolved too: the random sibling name cannot be a planted link
    temporary = temporary_sibling(path)
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, confined(path))
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_with(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` atomically with what ``write`` writes to the binary handle it is given."""
    with replacing(path) as temporary, open(temporary, "wb") as handle:
        write(handle)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    write_with(path, lambda handle: handle.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to ``final_path``.

    If another process completed ``final_path`` first, its copy wins and ours is discarded.
    """
    final_path = confined(final_path)
    make_dirs(final_path.parent)
    temp_path = temporary_sibling(final_path)  # in the folder just confined, under a random name
    temp_path.mkdir()
    try:
        yield temp_path
        try:
            os.rename(temp_path, confined(final_path))
        except OSError:
            if not final_path.is_dir():
                raise
            shutil.rmtree(temp_path)
    except BaseException:
        shutil.rmtree(temp_path, ignore_errors=True)
        raise


def _writer_is_alive(temp_name: str) -> bool:
    """False only for temporaries this host's exited processes (or unknown writers) left."""
    own_host = re.search(rf"-{re.escape(socket.gethostname())}\.(\d+)-[0-9a-f]{{8}}$", temp_name)
    if own_host is None:
        # Another host's writer (shared storage) may be alive; a name without a tag is not ours.
        return re.search(r"\.\d+-[0-9a-f]{8}$", temp_name) is not None
    try:
        os.kill(int(own_host.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs(parent: str | os.PathLike) -> list[Path]:
    """Delete temporary folders under ``parent`` left by killed writers (not live ones)."""
    parent = Path(parent)
    candidates = sorted(parent.glob(f"{TEMP_PREFIX}*")) if parent.is_dir() else []
    stale = [path for path in candidates if path.is_dir() and not _writer_is_alive(path.name)]
    for path in stale:
        shutil.rmtree(path)
    return stale
