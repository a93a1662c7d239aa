"""Id-keyed rows in memory-mapped ``.npy`` chunks: the one on-disk array store.

Gradient features (``selection.influence.datastore.FeatureStore``) and text embeddings
(``selection.diversity.embeddings.EmbeddingCache``) are both kept in an :class:`ArrayStore`.

Layout of a store folder::

    manifest.json      what the rows are (written once, by the first opener; later openers
                       compare their own with it and refuse another)
    shard-00000.npy    the rows of chunk 0: [n, width] of the store's dtype
    shard-00000.json   the commit record of chunk 0: {"ids": [...] (row order), "sha256" and
                       "size" of the .npy, "excluded": {id: reason} (ids given to the store
                       but stored without a row; optional), "record_sha256": of the other fields}
    .writer.lock       locked by every writer

(Chunk files keep the ``shard-`` prefix that stores written before this module use, so
those still open.)

Commit rule: a chunk's ``.npy`` is written atomically (``selection.common.files``), then its
record, atomically too; the record is the commit. A ``.npy`` without a record (a killed
writer) does not exist for readers and is removed by the next writer. Chunks are numbered
in commit order; the next commit takes the number after the highest one.

Lock rule: every change (creating the manifest, committing, dropping chunks) holds an
exclusive ``flock`` of ``.writer.lock``; taking it rereads the records (so a writer sees
every earlier commit) and removes what killed writers left. The lock is re-entrant within
one :class:`ArrayStore`, so a writer may hold it over many commits (:meth:`ArrayStore.lock`
with ``wait=False`` refuses instead of waiting). Readers take no lock: records are renamed
into place only after their ``.npy``.

Checks: a chunk's rows are read only through ``selection.common.integrity.open_npy`` with
the recorded sha256 and size, and their shape and dtype must match the record. A record that
cannot be read, lacks its checksum or the ``.npy``'s digest, or fails its checksum makes its
chunk *damaged*: its ids read as not stored to writers (who drop the chunk and store those ids
again), and a reader asking for them gets ``ArtifactIntegrityError`` rather than "not stored".
:meth:`ArrayStore.problems` lists damaged chunks; :meth:`ArrayStore.drop` removes chunks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from selection.common import files, integrity

MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".writer.lock"
_CHUNK_FILE = re.compile(r"shard-(\d{5,})\.(npy|json)")


class StoreBusyError(RuntimeError):
    """Another process holds the store's writer lock."""


def read_manifest(directory: str | os.PathLike, asset: str | None = None) -> dict[str, Any] | None:
    """The manifest of the store in ``directory``, None if it has none. One that is not a JSON
    object is an ``ArtifactIntegrityError`` naming it and the fix: the store's identity is lost with
    it, so the folder is deleted and ``asset`` (what fills the store) rematerialized."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    return integrity.read_json(path, asset=asset, fix=rebuild_fix(directory, asset))


def rebuild_fix(directory: str | os.PathLike, asset: str | None) -> str:
    """What to do about a damaged manifest: writers never rewrite one, so the folder goes first."""
    return f"delete {Path(directory)} and rematerialize {asset or 'the asset that filled it'} to rebuild the store"


def _record_checksum(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Chunk:
    """One committed chunk, as its record describes it."""

    number: int
    ids: tuple[str, ...]
    excluded: Mapping[str, str]
    sha256: str  # of the .npy
    size: int


class ArrayStore:
    """Rows of one ``dtype`` and ``width`` keyed by id, in the folder ``directory`` (see the module docstring).

    ``manifest`` is written if the folder has none; an existing one is passed to ``check``,
    which raises to refuse opening it. ``asset`` (what to rematerialize to rewrite the store)
    is named in integrity errors.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        manifest: Mapping[str, Any],
        check: Callable[[dict[str, Any]], None],
        *,
        dtype: str | np.dtype,
        width: int,
        asset: str,
    ) -> None:
        self.directory = Path(directory)
        self.dtype = np.dtype(dtype)
        self.width = int(width)
        self.asset = asset
        self._records: dict[int, tuple[tuple[int, ...], Chunk | integrity.ArtifactIntegrityError]] = {}
        self._chunks: dict[int, Chunk] = {}
        self._damaged: dict[int, integrity.ArtifactIntegrityError] = {}
        self._where: dict[str, tuple[int, int]] = {}  # id -> (chunk number, row)
        self._excluded: dict[str, str] = {}
        self._lock_handle: TextIO | None = None
        files.make_dirs(self.directory)
        existing = read_manifest(self.directory, asset)
        if existing is None:
            with self.lock():
                existing = read_manifest(self.directory, asset)
                if existing is None:
                    text = json.dumps(dict(manifest), indent=1, sort_keys=True)
                    files.write_text(self.directory / MANIFEST_FILE, text)
        if existing is not None:
            check(existing)
        self.refresh()

    # -- reading --------------------------------------------------------------

    def paths(self, number: int) -> tuple[Path, Path]:
        """The ``.npy`` and the commit record of chunk ``number``."""
        stem = self.directory / f"shard-{number:05d}"
        return stem.with_suffix(".npy"), stem.with_suffix(".json")

    def _read_record(self, number: int, path: Path) -> Chunk:
        try:
            record = integrity.read_json(path, asset=self.asset)
            ids = tuple(record["ids"])
            excluded = dict(record.get("excluded", {}))
            if not all(isinstance(example_id, str) for example_id in (*ids, *excluded)):
                raise TypeError("ids must be strings")
        except integrity.ArtifactIntegrityError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise integrity.ArtifactIntegrityError(
                path, f"commit record is unreadable ({error})", self.asset
            ) from error
        # Every commit writes the checksum and the .npy's digest: a record without them (edited, or from
        # before checksums) cannot be told from a forged one, so its chunk is damaged and recomputed.
        checksum = record.pop("record_sha256", None)
        if checksum is None:
            raise integrity.ArtifactIntegrityError(
                path,
                "commit record has no record_sha256 checksum (edited, or written before records had one), so its "
                "chunk is not trusted",
                self.asset,
            )
        if checksum != _record_checksum(record):
            raise integrity.ArtifactIntegrityError(
                path,
                "commit record differs from the checksum written with it (it was changed after the commit)",
                self.asset,
            )
        if not isinstance(record.get("sha256"), str) or not isinstance(record.get("size"), int):
            raise integrity.ArtifactIntegrityError(
                path, "commit record has no sha256 and size of its .npy, so the rows cannot be checked", self.asset
            )
        return Chunk(number, ids, excluded, record["sha256"], record["size"])

    def refresh(self) -> None:
        """Reread the commit records (only those that changed since the last look)."""
        records = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                match = _CHUNK_FILE.fullmatch(entry.name)
                if match is None or match.group(2) != "json":
                    continue
                number = int(match.group(1))
                try:
                    stat = entry.stat()
                except FileNotFoundError:  # dropped meanwhile
                    continue
                signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
                known = self._records.get(number)
                if known is not None and known[0] == signature:
                    records[number] = known
                    continue
                try:
                    records[number] = (signature, self._read_record(number, Path(entry.path)))
                except FileNotFoundError:
                    continue
                except integrity.ArtifactIntegrityError as error:
                    records[number] = (signature, error)
        previous, self._records = self._records, dict(sorted(records.items()))
        top = max(previous, default=-1)
        if all(records.get(number) is known for number, known in previous.items()) and all(
            number > top for number in records if number not in previous
        ):
            new = [number for number in self._records if number not in previous]  # only appended: index those
        else:
            self._where, self._excluded = {}, {}
            new = list(self._records)
        self._chunks = {n: entry for n, (_, entry) in self._records.items() if isinstance(entry, Chunk)}
        self._damaged = {n: entry for n, (_, entry) in self._records.items() if not isinstance(entry, Chunk)}
        for number in new:
            chunk = self._chunks.get(number)
            if chunk is None:
                continue
            for row, example_id in enumerate(chunk.ids):
                if example_id in self._where:
                    raise ValueError(f"array store {self.directory}: id {example_id!r} stored twice")
                self._where[example_id] = (number, row)
            self._excluded.update(chunk.excluded)

    @property
    def damaged(self) -> dict[int, integrity.ArtifactIntegrityError]:
        """Chunks whose commit record cannot be used, by number."""
        return dict(self._damaged)

    def numbers(self) -> list[int]:
        """Numbers of the committed chunks, damaged ones included, in commit order."""
        return list(self._records)

    def chunk(self, number: int) -> Chunk:
        """The record of chunk ``number``; ``ArtifactIntegrityError`` if it is damaged."""
        if number in self._damaged:
            raise self._damaged[number]
        if number not in self._chunks:
            raise ValueError(f"chunk {number} does not exist in {self.directory} (it has {self.numbers()})")
        return self._chunks[number]

    def array(self, number: int) -> np.ndarray:
        """Memory-mapped rows of chunk ``number``, checked against its commit record."""
        chunk = self.chunk(number)
        path = self.paths(number)[0]
        array = integrity.open_npy(path, asset=self.asset, sha256=chunk.sha256, size=chunk.size)
        expected = (len(chunk.ids), self.width)
        if array.shape != expected or array.dtype != self.dtype:
            raise integrity.ArtifactIntegrityError(
                path, f"holds {array.dtype} {array.shape}, its commit record says {self.dtype} {expected}", self.asset
            )
        return array

    def problems(self) -> Iterator[tuple[int, str]]:
        """``(number, problem)`` of each damaged chunk, in commit order (reads every chunk it reaches)."""
        for number in self._records:
            problem = integrity.first_problem(lambda number=number: self.array(number))
            if problem is not None:
                yield number, problem

    def ids(self) -> list[str]:
        """Ids with a row, in storage order."""
        return list(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._where

    def excluded(self) -> dict[str, str]:
        return dict(self._excluded)

    def covered(self) -> set[str]:
        """Every id already dealt with: stored with a row or excluded."""
        return set(self._where) | set(self._excluded)

    def missing(self, ids: Iterable[str]) -> list[str]:
        """The ids not covered yet, in input order, without duplicates."""
        seen: set[str] = set()
        out: list[str] = []
        for example_id in ids:
            if example_id not in self._where and example_id not in self._excluded and example_id not in seen:
                seen.add(example_id)
                out.append(example_id)
        return out

    def absent(self, ids: Sequence[str]) -> list[str]:
        """The ids of ``ids`` without a row. If there are any while a chunk is damaged, the
        damage may be why: ``ArtifactIntegrityError`` naming its record instead."""
        absent = [example_id for example_id in ids if example_id not in self._where]
        if absent and self._damaged:
            error = next(iter(self._damaged.values()))
            raise integrity.ArtifactIntegrityError(
                error.path, f"{len(absent)} requested ids may be in a damaged chunk: {error.problem}", self.asset
            )
        return absent

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """``[len(ids), width]`` in the order of ``ids`` (every one must have a row: see :meth:`absent`)."""
        out = np.empty((len(ids), self.width), self.dtype)
        if not ids:
            return out
        locations = np.array([self._where[example_id] for example_id in ids], dtype=np.int64)
        for number in np.unique(locations[:, 0]):
            positions = np.flatnonzero(locations[:, 0] == number)
            rows = locations[positions, 1]
            order = np.argsort(rows, kind="stable")  # sequential reads from the memory map
            out[positions[order]] = self.array(int(number))[rows[order]]
        return out

    # -- writing --------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, wait: bool = True, busy: str = "") -> Iterator[None]:
        """Hold the writer lock (see the module docstring). With ``wait=False`` another holder is a
        :class:`StoreBusyError` (``busy`` ends its message)."""
        if self._lock_handle is not None:
            yield
            return
        with open(files.confined(self.directory / LOCK_FILE), "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError as error:
                raise StoreBusyError(f"another process is filling {self.directory}; wait for it{busy}") from error
            self._lock_handle = handle
            try:
                self.refresh()
                self._remove_leftovers()
                yield
            finally:
                self._lock_handle = None
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _remove_leftovers(self) -> None:
        """Chunk files without a record and temporary files: left by killed writers (the caller holds the lock)."""
        keep = {path.name for number in self._records for path in self.paths(number)}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                leftover = entry.name.startswith("shard-") or files.is_temporary(entry.name)
                if leftover and entry.name not in keep and entry.is_file(follow_symlinks=False):
                    Path(entry.path).unlink(missing_ok=True)

    def commit(self, ids: Sequence[str], array: np.ndarray, excluded: Mapping[str, str] | None = None) -> int:
        """Append one chunk: ``array`` (``[len(ids), width]`` of the store's dtype, possibly empty)
        and the ids given without a row (``excluded``: id -> reason). Returns its number."""
        ids, excluded = list(ids), dict(excluded or {})
        if array.dtype != self.dtype or array.shape != (len(ids), self.width):
            raise ValueError(f"expected {self.dtype} [{len(ids)}, {self.width}], got {array.dtype} {array.shape}")
        if not ids and not excluded:
            raise ValueError("a chunk needs at least one stored or excluded id")
        with self.lock():
            incoming = ids + list(excluded)
            present = [
                example_id for example_id in incoming if example_id in self._where or example_id in self._excluded
            ]
            if present or len(set(incoming)) != len(incoming):
                raise ValueError(f"ids already stored or repeated: {present[:3] or 'repeated within the chunk'}")
            number = max(self._records, default=-1) + 1
            array_path, record_path = self.paths(number)
            files.write_with(array_path, lambda handle: np.save(handle, np.ascontiguousarray(array)))
            record: dict[str, Any] = {"ids": ids, **integrity.file_record(array_path)}
            if excluded:
                record["excluded"] = excluded
            record["record_sha256"] = _record_checksum(record)
            files.write_text(record_path, json.dumps(record))
            self.refresh()
        return number

    def drop(self, numbers: Iterable[int]) -> None:
        """Remove chunks, highest number first and each record before its ``.npy``, so a kill
        midway leaves every remaining chunk whole."""
        with self.lock():
            for number in sorted(set(numbers), reverse=True):
                array_path, record_path = self.paths(number)
                record_path.unlink(missing_ok=True)
                array_path.unlink(missing_ok=True)
            self.refresh()
