"""Streaming readers for raw pool sources and target files, yielding one outcome per record.

Source file types (detected from the path, see :func:`detect_file_type`):

- ``jsonl``: ``.jsonl`` / ``.ndjson`` (optionally ``.gz``), and ``.json`` files whose first
  non-blank line is a complete JSON value. One record per non-blank line; blank lines are
  skipped and not counted, so ``line_no`` is the 1-based number of the non-blank line. A line
  over ``MAX_LINE_BYTES`` is rejected (``too_large``) without being held in memory.
- ``json``: other ``.json`` (optionally ``.gz``) files: a top-level array of records, or a
  sequence of whitespace-separated JSON values (e.g. one pretty-printed object). Parsed
  incrementally with ``json.JSONDecoder.raw_decode`` over chunks, never loaded whole;
  ``line_no`` is the 1-based element number.
- ``parquet``: ``.parquet``, read batch by batch; ``line_no`` is the 1-based row number.
- ``arrow``: ``.arrow`` Arrow IPC stream files (what ``datasets`` writes).
- ``hf_dataset``: a directory written by ``datasets`` ``save_to_disk``: ``state.json``
  lists the ``_data_files`` (Arrow stream files), or ``dataset_dict.json`` lists splits,
  which are read in that order with row numbers running on across splits.

Nothing is dropped: malformed JSON and invalid UTF-8 become records with a
``parse_error``, which :func:`iter_outcomes` turns into rejects, and the reader moves on.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import re
import stat
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from selection.common.names import check_name
from selection.data.formats import (
    DEFAULT_MAX_CHARS,
    FORMATS,
    INVALID_UTF8,
    MALFORMED_JSON,
    TOO_LARGE,
    RecordRejected,
    canonical_json,
    canonicalize,
    detect_format,
    example_id_of_json,
)

RAW_LIMIT = 2000  # characters of offending text kept with a reject
ROW_BATCH = 2048  # rows per Arrow/Parquet batch
JSON_CHUNK = 1 << 20  # characters read per step by the streaming JSON reader
MAX_JSON_ELEMENT = 64 << 20  # a JSON element larger than this cannot be resynchronised past
MAX_LINE_BYTES = 64 << 20  # a JSON line longer than this is rejected without being held in memory
_SNIFF_BYTES = 1 << 20  # how much of a .json file's first line is read to tell JSON lines from a document
FILE_TYPES = ("jsonl", "json", "parquet", "arrow", "hf_dataset")
_LINE_SUFFIXES = {".jsonl", ".ndjson"}


def _check_format(fmt: str, source: str) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"source {source}: unknown format {fmt!r}; expected 'auto' or one of {list(FORMATS)}")


@dataclass(frozen=True)
class SourceSpec:
    """One file or directory to ingest. ``name`` defaults to the file or directory stem."""

    path: str | Path
    name: str | None = None
    format: str = "auto"
    # True when this path is the new home of the source already ingested under ``name`` from
    # another path (its rows are then compared as edits); otherwise that is refused.
    replaces: bool = False

    def __post_init__(self) -> None:
        _check_format(self.format, str(self.path))
        name = _stem(Path(self.path)) if self.name is None else self.name
        object.__setattr__(self, "name", check_name(name, "source", f"source {self.path}"))

    @property
    def source_name(self) -> str:
        assert self.name is not None  # set in __post_init__
        return self.name


@dataclass(frozen=True)
class RecordsSource:
    """An in-memory source (e.g. generated data): ``records`` is iterated once.

    ``fingerprint`` identifies the content (e.g. a hash of the generator's settings) so an
    unchanged source can be skipped on a later ingest.
    """

    name: str
    records: Iterable[Any]
    fingerprint: str
    format: str = "auto"
    path: str = ""

    def __post_init__(self) -> None:
        _check_format(self.format, self.name)
        object.__setattr__(self, "name", check_name(self.name, "source", "RecordsSource"))

    @property
    def source_name(self) -> str:
        return self.name


Source = SourceSpec | RecordsSource


@dataclass(slots=True)
class RawRecord:
    """One record as read: a parsed ``value`` or a ``parse_error`` (``"<code>: <detail>"``).

    ``raw`` is the record's text, truncated; tabular readers leave it ``None`` and it is
    rendered from ``value`` only when needed (see :meth:`raw_text`).
    """

    line_no: int
    raw: str | None
    value: Any = None
    parse_error: str | None = None

    def raw_text(self) -> str:
        text = self.raw if self.raw is not None else json.dumps(self.value, ensure_ascii=False, default=str)
        # Kept as UTF-8 text: a lone surrogate (valid in JSON, not in UTF-8) is shown escaped.
        return text[:RAW_LIMIT].encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(slots=True)
class Accepted:
    source: str
    line_no: int
    example_id: str
    messages: list[dict[str, str]]
    messages_json: str  # canonical JSON, the text example_id hashes
    format: str  # the record format it was read as


@dataclass(slots=True)
class Rejected:
    source: str
    line_no: int
    reason: str
    raw: str


Outcome = Accepted | Rejected


def _stem(path: Path) -> str:
    name = path.name
    name = name.removesuffix(".gz")
    return Path(name).stem if Path(name).suffix else name


# What a file that is not what its name says raises (a fake .gz, random bytes named .parquet):
# these messages do not say which file, so they are re-raised naming it.
_UNREADABLE = (OSError, EOFError, zlib.error, pa.ArrowException, json.JSONDecodeError)


class SourceReadError(ValueError):
    """A source file that cannot be read as its type; the message names the file."""


def _unreadable(path: Path, file_type: str, error: BaseException, after: int | None = None) -> SourceReadError:
    where = "" if after is None else f" after {after} record(s)"
    return SourceReadError(f"source {path}: cannot be read as {file_type}{where}: {type(error).__name__}: {error}")


def file_type_of(path: str | Path) -> str | None:
    """What ingestion makes of ``path`` by its name (or, for a directory, the marker files
    ``save_to_disk`` writes): one of :data:`FILE_TYPES`, or None when it cannot ingest it.
    ``.json`` reads as ``json`` here; :func:`detect_file_type` tells JSON lines apart by content."""
    path = Path(path)
    if path.is_dir():
        return "hf_dataset" if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file() else None
    name = path.name.lower()
    compressed = name.endswith(".gz")
    suffix = Path(name.removesuffix(".gz")).suffix
    if suffix in _LINE_SUFFIXES:
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".parquet", ".arrow") and not compressed:
        return suffix[1:]
    return None


# Kernel pseudo-file systems: their "files" look regular but never end, block or fail on read.
_PSEUDO_FILE_SYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))
_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def check_source_path(path: str | Path) -> Path:
    """``path`` if it is a regular file or a folder; else SourceReadError naming it and the fix.

    Checked before anything opens it, so a FIFO, a device or a /proc file (which may block
    forever or never end) fails at once instead of hanging a run."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"source {path} does not exist") from None
    except OSError as error:
        raise SourceReadError(f"source {path}: cannot be inspected: {error}") from error
    resolved = path.resolve()
    if any(resolved == system or resolved.is_relative_to(system) for system in _PSEUDO_FILE_SYSTEMS):
        raise SourceReadError(
            f"source {path} (resolves to {resolved}) is a kernel pseudo-file, not a data file; "
            "write the records to a regular file and ingest that"
        )
    for is_kind, kind in _SPECIAL_KINDS:
        if is_kind(mode):
            raise SourceReadError(
                f"source {path} is a {kind}, not a regular file: reading it could block forever or never end; "
                "write the records to a regular file and ingest that"
            )
    return path


def detect_file_type(path: str | Path) -> str:
    """The reader for ``path`` (one of :data:`FILE_TYPES`); ``ValueError`` if unsupported."""
    path = check_source_path(path)
    file_type = file_type_of(path)
    if file_type is None and path.is_dir():
        raise ValueError(
            f"source {path} is a directory without state.json or dataset_dict.json; "
            "only directories written by datasets' save_to_disk are supported"
        )
    if file_type is None:
        raise ValueError(
            f"source {path}: unsupported file type; expected .jsonl, .ndjson, .json (optionally .gz), "
            ".parquet, .arrow, or a directory written by datasets' save_to_disk"
        )
    if file_type == "json":
        try:
            return "jsonl" if _first_line_is_json(path) else "json"
        except _UNREADABLE as error:
            raise _unreadable(path, "json", error) from error
    return file_type


def _open_binary(path: Path) -> IO[bytes]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _first_line_is_json(path: Path) -> bool:
    """Whether the first non-blank line parses alone: then the file is JSON lines.

    Reads at most ``_SNIFF_BYTES`` of that line, so a minified one-line array is not loaded.
    A longer first line is read as a JSON document (whose reader also accepts JSON lines).
    """
    with _open_binary(path) as handle:
        line = handle.readline(_SNIFF_BYTES)
        line = line.removeprefix(codecs.BOM_UTF8)
        while line and not line.strip():
            line = handle.readline(_SNIFF_BYTES)
    text = line.strip()
    if not text:
        return True  # empty file: no records either way
    if text.startswith(b"[") or (len(line) >= _SNIFF_BYTES and not line.endswith(b"\n")):
        return False
    try:
        json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        # An object spread over lines (or a malformed first line): read as one JSON document.
        return not text.startswith(b"{") or text.endswith(b"}")
    return True


def read_jsonl(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RawRecord]:
    line_no = 0
    with _open_binary(path) as handle:
        line = handle.readline(max_line_bytes)
        line = line.removeprefix(codecs.BOM_UTF8)
        while line:
            if not line.strip():
                line = handle.readline(max_line_bytes)
                continue
            line_no += 1
            yield _parse_line(handle, line, line_no, max_line_bytes)
            line = handle.readline(max_line_bytes)


def _parse_line(handle: IO[bytes], line: bytes, line_no: int, max_line_bytes: int) -> RawRecord:
    if len(line) >= max_line_bytes and not line.endswith(b"\n"):
        head = line[:RAW_LIMIT].decode("utf-8", "replace")
        while line and not line.endswith(b"\n"):  # skip the rest of the line without holding it
            line = handle.readline(max_line_bytes)
        return RawRecord(line_no, head, parse_error=f"{TOO_LARGE}: the line is longer than {max_line_bytes} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return RawRecord(
            line_no,
            line.decode("utf-8", "replace").strip()[:RAW_LIMIT],
            parse_error=f"{INVALID_UTF8}: byte {error.start} of the line is not valid UTF-8 ({error.reason})",
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return RawRecord(
            line_no, text.strip()[:RAW_LIMIT], parse_error=f"{MALFORMED_JSON}: {error.msg} at column {error.colno}"
        )
    return RawRecord(line_no, text[:RAW_LIMIT].strip(), value)


_WHITESPACE = re.compile(r"[ \t\n\r]*")
# Tokens that matter when skipping a malformed element: whole strings (so brackets inside
# them are ignored), a string still open at the buffer end, brackets and commas.
_SCAN_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|"|[\[\]{},]', re.DOTALL)
# Files are decoded with surrogateescape: undecodable bytes become lone surrogates.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
# How close to the buffer end a decode error must be to mean "cut short" rather than "malformed".
_TRUNCATION_SLACK = 16


def _printable(text: str) -> str:
    """``text`` with escaped undecodable bytes replaced, so it can be stored."""
    return text.encode("utf-8", "replace").decode("utf-8")


class _JsonStream:
    """Incremental JSON value reader over a text stream with a sliding buffer.

    ``buf[pos:]`` is unread; characters before ``pos`` may be dropped at any refill, and
    ``offset`` counts the dropped ones so absolute positions can be reported.
    """

    def __init__(self, handle: IO[str], chunk: int, max_element: int) -> None:
        self.handle = handle
        self.chunk = chunk
        self.max_element = max_element
        self.buf = ""
        self.pos = 0
        self.offset = 0
        self.eof = False
        self.decoder = json.JSONDecoder()

    @property
    def position(self) -> int:
        return self.offset + self.pos

    def fill(self, need: int) -> None:
        """Make at least ``need`` characters available after ``pos``, unless the file ends first."""
        if len(self.buf) - self.pos >= need:
            return
        if self.pos:
            self.offset += self.pos
            self.buf = self.buf[self.pos :]
            self.pos = 0
        while not self.eof and len(self.buf) < need:
            data = self.handle.read(max(self.chunk, need - len(self.buf)))
            self.eof = not data
            self.buf += data

    def peek(self) -> str:
        """Skip whitespace; the next character, or '' at the end of the file."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            self.fill(1)
            if self.pos >= len(self.buf):
                return ""

    def take(self, start: int) -> str:
        """The text from absolute position ``start`` to ``pos`` (still in the buffer)."""
        return self.buf[start - self.offset : self.pos]

    def _may_be_cut(self) -> bool:
        return not self.eof and len(self.buf) - self.pos < self.max_element

    def decode(self) -> tuple[Any, bool]:
        """(value, True) and advance past it, or (None, False) if the value at ``pos`` is malformed."""
        window = self.chunk
        while True:
            self.fill(window)
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as error:
                cut = error.msg.startswith("Unterminated string") or error.pos >= len(self.buf) - _TRUNCATION_SLACK
                if not (cut and self._may_be_cut()):
                    return None, False
            else:
                # A value ending exactly at the buffer end may be cut short (e.g. a number).
                if end < len(self.buf) or not self._may_be_cut():
                    self.pos = end
                    return value, True
            window = 2 * max(window, len(self.buf) - self.pos)

    def skip_malformed(self, in_array: bool) -> bool:
        """Move ``pos`` to the end of a malformed element; False if its end cannot be found.

        In an array the element ends before a ',' or the closing ']' at bracket depth 0, or
        after the bracket that closes it; elsewhere only a bracketed element can be skipped.
        """
        if not in_array and self.buf[self.pos] not in "[{":
            return False
        depth = 0
        cursor = self.pos
        while True:
            match = _SCAN_TOKEN.search(self.buf, cursor)
            if match is None or match.group() == '"':
                if not self._may_be_cut():
                    return False
                consumed = cursor - self.pos
                self.fill(len(self.buf) - self.pos + self.chunk)
                cursor = self.pos + consumed
                continue
            token = match.group()
            if depth == 0 and token in ",]}":
                if not in_array or token == "}":
                    return False
                self.pos = match.start()
                return True
            if token in "[{":
                depth += 1
            elif token in "]}":
                depth -= 1
                if depth == 0:
                    self.pos = match.end()
                    return True
            cursor = match.end()


def read_json(path: Path, chunk: int = JSON_CHUNK, max_element: int = MAX_JSON_ELEMENT) -> Iterator[RawRecord]:
    """Elements of a JSON array, or of a whitespace-separated sequence of JSON values."""
    with _open_binary(path) as binary:
        stream = _JsonStream(
            io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape"), chunk, max_element
        )
        in_array = stream.peek() == "["
        if in_array:
            stream.pos += 1
        record_no = 0
        after_element = False  # in an array: an element was read, so ',' or ']' must follow
        while True:
            char = stream.peek()
            if char == "" and not in_array:
                return
            if char == "":
                yield _rest_rejected(
                    stream, record_no + 1, f"the array is not closed (the file ends after element {record_no})"
                )
                return
            if in_array and char == "]" and (after_element or record_no == 0):
                stream.pos += 1
                if stream.peek():
                    yield _rest_rejected(stream, record_no + 1, "unexpected data after the closing ']'")
                return
            if after_element:
                if char != ",":
                    yield _rest_rejected(stream, record_no + 1, f"expected ',' or ']' after element {record_no}")
                    return
                stream.pos += 1
                after_element = False
                continue
            record_no += 1
            after_element = in_array
            start = stream.position
            value, ok = stream.decode()
            if ok:
                raw = stream.take(start)
                if _ESCAPED_BYTE.search(raw):
                    yield RawRecord(
                        record_no,
                        _printable(raw[:RAW_LIMIT]),
                        parse_error=f"{INVALID_UTF8}: element {record_no} contains bytes that are not valid UTF-8",
                    )
                else:
                    yield RawRecord(record_no, raw[:RAW_LIMIT], value)
            elif stream.skip_malformed(in_array):
                raw = stream.take(start)
                detail = (
                    f"element {record_no} is not valid JSON"
                    if raw.strip()
                    else f"element {record_no} is empty (stray ',')"
                )
                yield RawRecord(
                    record_no,
                    _printable(raw[:RAW_LIMIT]),
                    parse_error=f"{MALFORMED_JSON}: {detail} (character {start})",
                )
            else:
                yield _rest_rejected(
                    stream, record_no, f"element {record_no} is malformed and its end could not be found"
                )
                return


def _rest_rejected(stream: _JsonStream, record_no: int, why: str) -> RawRecord:
    """One reject standing for the unreadable rest of the file (how many records it held is unknown)."""
    start = stream.position
    stream.fill(RAW_LIMIT)
    raw = stream.buf[stream.pos : stream.pos + RAW_LIMIT]
    return RawRecord(
        record_no,
        _printable(raw),
        parse_error=f"{MALFORMED_JSON}: {why}; the rest of the file from character {start} was not read",
    )


def _iter_batches_rows(batches: Iterable[pa.RecordBatch], start: int = 0) -> Iterator[RawRecord]:
    line_no = start
    for batch in batches:
        for row in batch.to_pylist():
            line_no += 1
            yield RawRecord(line_no, None, row)


def read_parquet(path: Path) -> Iterator[RawRecord]:
    parquet = pq.ParquetFile(path)
    try:
        yield from _iter_batches_rows(parquet.iter_batches(batch_size=ROW_BATCH))
    finally:
        parquet.close()


def _arrow_stream_batches(path: Path) -> Iterator[pa.RecordBatch]:
    with pa.memory_map(str(path), "r") as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid as error:
            raise ValueError(f"{path} is not an Arrow IPC stream file: {error}") from error
        for batch in reader:
            # Long rows in one big batch: slice to bound the Python objects alive at once.
            for offset in range(0, batch.num_rows, ROW_BATCH):
                yield batch.slice(offset, ROW_BATCH)


def read_arrow(path: Path) -> Iterator[RawRecord]:
    yield from _iter_batches_rows(_arrow_stream_batches(path))


def hf_dataset_files(path: Path) -> list[Path]:
    """Arrow files of a ``save_to_disk`` directory, in order (splits in ``dataset_dict.json`` order)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits")
        if not isinstance(splits, list) or not splits:
            raise ValueError(f"{path}/dataset_dict.json has no 'splits' list")
        return [file for split in splits for file in hf_dataset_files(path / str(split))]
    state_path = path / "state.json"
    if not state_path.is_file():
        raise ValueError(f"{path} has no state.json (not written by datasets' save_to_disk)")
    state = json.loads(state_path.read_text(encoding="utf-8"))
    data_files = state.get("_data_files")
    if not isinstance(data_files, list) or not data_files:
        raise ValueError(f"{state_path} has no '_data_files' list")
    files = []
    for entry in data_files:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("filename"), str):
            raise ValueError(f"{state_path}: bad _data_files entry {entry!r}")
        file = path / entry["filename"]
        if file.exists():
            check_source_path(file)
        if not file.is_file():
            raise ValueError(f"{state_path} lists {entry['filename']}, which does not exist")
        files.append(file)
    return files


def read_hf_dataset(path: Path) -> Iterator[RawRecord]:
    def batches() -> Iterator[pa.RecordBatch]:
        for file in hf_dataset_files(path):
            yield from _arrow_stream_batches(file)

    yield from _iter_batches_rows(batches())


READERS: dict[str, Callable[[Path], Iterator[RawRecord]]] = {
    "jsonl": read_jsonl,
    "json": read_json,
    "parquet": read_parquet,
    "arrow": read_arrow,
    "hf_dataset": read_hf_dataset,
}


def _named_errors(path: Path, file_type: str, records: Iterator[RawRecord]) -> Iterator[RawRecord]:
    n_read = 0
    try:
        for record in records:
            n_read += 1
            yield record
    except _UNREADABLE as error:
        raise _unreadable(path, file_type, error, n_read or None) from error


def read_file(path: str | Path) -> Iterator[RawRecord]:
    """The raw records of a file or ``save_to_disk`` directory of any of :data:`FILE_TYPES`,
    streamed; an unreadable file raises SourceReadError naming it."""
    path = Path(path)
    file_type = detect_file_type(path)
    return _named_errors(path, file_type, READERS[file_type](path))


def read_records(spec: Source) -> Iterator[RawRecord]:
    """The raw records of a source, streamed; an unreadable file raises SourceReadError naming it."""
    if isinstance(spec, RecordsSource):
        return (RawRecord(line_no, None, value) for line_no, value in enumerate(spec.records, start=1))
    return read_file(spec.path)


def outcome(record: RawRecord, source: str, fmt: str = "auto", max_chars: int = DEFAULT_MAX_CHARS) -> Outcome:
    """``record`` canonicalized (in format ``fmt``, or the one its keys say) or rejected with its reason."""
    if record.parse_error is not None:
        return Rejected(source, record.line_no, record.parse_error, record.raw_text())
    try:
        fmt = detect_format(record.value) if fmt == "auto" else fmt
        messages = canonicalize(record.value, fmt, max_chars)
        messages_json = canonical_json(messages)
        example_id = example_id_of_json(messages_json)
    except RecordRejected as rejected:
        return Rejected(source, record.line_no, rejected.reason, record.raw_text())
    except UnicodeError as error:  # text no check above foresaw: this record is rejected, not the ingest
        return Rejected(source, record.line_no, f"{INVALID_UTF8}: {error}", record.raw_text())
    return Accepted(source, record.line_no, example_id, messages, messages_json, fmt)


def iter_outcomes(spec: Source, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[Outcome]:
    """Accepted or Rejected for every non-blank record of ``spec``, in order (no dedup)."""
    source = spec.source_name
    for record in read_records(spec):
        yield outcome(record, source, spec.format, max_chars)
