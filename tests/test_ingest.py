"""Streaming readers: every file type, malformed input never aborts a file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selection.data.formats import reason_code
from selection.data.ingest import (
    RAW_LIMIT,
    Accepted,
    RecordsSource,
    Rejected,
    SourceSpec,
    detect_file_type,
    iter_outcomes,
    read_json,
    read_jsonl,
    read_records,
)

QA = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
RECORDS: list[dict[str, Any]] = [
    {"messages": QA},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {"prompt": 'Say [x] {y} "z"', "completion": "ok ] } ,"},
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def outcomes(path: Path, **kwargs: Any) -> list[Accepted | Rejected]:
    return list(iter_outcomes(SourceSpec(path, **kwargs)))


def summary(results: list[Accepted | Rejected]) -> list[tuple[int, str]]:
    """(line_no, "ok" or reject code) per outcome."""
    return [(r.line_no, "ok" if isinstance(r, Accepted) else reason_code(r.reason)) for r in results]


def test_source_spec_defaults_and_validation(tmp_path: Path) -> None:
    assert SourceSpec(tmp_path / "tulu_v2.jsonl").name == "tulu_v2"
    assert SourceSpec(tmp_path / "hh.jsonl.gz").name == "hh"
    assert SourceSpec(tmp_path / "saved_ds").name == "saved_ds"
    assert SourceSpec("x.jsonl", name="mine").name == "mine"
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        SourceSpec("x.jsonl", format="csv")


def test_detect_file_type(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", ["{}"])
    write_jsonl(tmp_path / "a.ndjson", ["{}"])
    write_jsonl(tmp_path / "lines.json", [json.dumps(r) for r in RECORDS])
    (tmp_path / "array.json").write_text(json.dumps(RECORDS, indent=2))
    (tmp_path / "object.json").write_text(json.dumps(RECORDS[0], indent=2))
    pq.write_table(pa.Table.from_pylist(RECORDS[:1]), tmp_path / "a.parquet")
    (tmp_path / "a.csv").write_text("a,b\n")
    (tmp_path / "plain_dir").mkdir()
    assert [
        detect_file_type(tmp_path / name)
        for name in ("a.jsonl", "a.ndjson", "lines.json", "array.json", "object.json", "a.parquet")
    ] == ["jsonl", "jsonl", "jsonl", "json", "json", "parquet"]
    with pytest.raises(ValueError, match="unsupported file type"):
        detect_file_type(tmp_path / "a.csv")
    with pytest.raises(ValueError, match="without state.json"):
        detect_file_type(tmp_path / "plain_dir")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_file_type(tmp_path / "missing.jsonl")


def test_jsonl_mixed_formats_malformed_and_blank_lines(tmp_path: Path) -> None:
    lines = [
        json.dumps(RECORDS[0]),
        "",
        "   ",
        "{not json",
        json.dumps(RECORDS[1]),
        "[1, 2]",
        '{"messages": [',
        json.dumps(RECORDS[2]),
        "",
        json.dumps(RECORDS[3]),
    ]
    results = outcomes(write_jsonl(tmp_path / "mixed.jsonl", lines))
    # Blank lines are skipped and not counted: line_no is the non-blank record number.
    assert summary(results) == [
        (1, "ok"),
        (2, "malformed_json"),
        (3, "ok"),
        (4, "not_object"),
        (5, "malformed_json"),
        (6, "ok"),
        (7, "ok"),
    ]
    bad = results[1]
    assert isinstance(bad, Rejected) and bad.raw == "{not json" and bad.source == "mixed"
    assert "column" in bad.reason
    assert [r.format for r in results if isinstance(r, Accepted)] == [
        "messages",
        "alpaca",
        "sharegpt",
        "prompt_completion",
    ]


def test_jsonl_invalid_utf8_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "bytes.jsonl"
    good = json.dumps(RECORDS[0]).encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + b'{"prompt": "caf\xe9", "completion": "x"}\n' + good + b"\n")
    results = outcomes(path)
    assert summary(results) == [(1, "ok"), (2, "invalid_utf8"), (3, "ok")]
    assert "caf" in results[1].raw


def test_jsonl_gz_and_explicit_format(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(RECORDS[1]) + "\n" + json.dumps(RECORDS[0]) + "\n")
    assert summary(outcomes(path, format="alpaca")) == [(1, "ok"), (2, "missing_field")]


def test_raw_text_is_truncated(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "long.jsonl", [json.dumps({"text": "x" * 5000})])
    (result,) = outcomes(path)
    assert isinstance(result, Rejected) and len(result.raw) == RAW_LIMIT


def test_max_chars_is_passed_through(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [json.dumps({"prompt": "x" * 100, "completion": "y"})])
    assert summary(list(iter_outcomes(SourceSpec(path), max_chars=50))) == [(1, "too_large")]


def json_elements(path: Path, chunk: int, **kwargs: Any) -> list[tuple[int, Any, str | None]]:
    return [
        (r.line_no, r.value, r.parse_error and reason_code(r.parse_error))
        for r in read_json(path, chunk=chunk, **kwargs)
    ]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_json_array_streams_like_json_load(tmp_path: Path, chunk: int) -> None:
    values = RECORDS + [12345678, 'a string with ] and \\" inside', [1, [2, {"x": 3}]], None, 1.5e10]
    path = tmp_path / "array.json"
    path.write_text(json.dumps(values, indent=1), encoding="utf-8")
    assert [value for _, value, _ in json_elements(path, chunk)] == json.loads(path.read_text())


@pytest.mark.parametrize("chunk", [2, 5, 1 << 20])
def test_json_array_bad_elements_are_rejected_and_reading_resumes(tmp_path: Path, chunk: int) -> None:
    good = json.dumps(RECORDS[0])
    text = (
        f'[{good}, {{"a": tru, "b": "[}}{{"}}, {json.dumps(RECORDS[3])}, {{"k": 1,}}, 7, \n'
        f"{{'single': 'quotes'}}, , [1, bad], {good}]"
    )
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    assert json_elements(path, chunk) == [
        (1, RECORDS[0], None),
        (2, None, "malformed_json"),
        (3, RECORDS[3], None),
        (4, None, "malformed_json"),
        (5, 7, None),
        (6, None, "malformed_json"),
        (7, None, "malformed_json"),
        (8, None, "malformed_json"),
        (9, RECORDS[0], None),
    ]
    records = list(read_json(path, chunk=chunk))
    assert records[1].raw == '{"a": tru, "b": "[}{"}'
    assert "element 7 is empty" in records[6].parse_error


def test_json_array_truncated_file_rejects_the_rest(tmp_path: Path) -> None:
    # Like a dump cut off mid-element: everything before the cut is kept.
    text = json.dumps(RECORDS, indent=1)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex('"Say')], encoding="utf-8")
    records = list(read_json(path, chunk=16))
    assert [r.value for r in records[:3]] == RECORDS[:3]
    assert len(records) == 4 and records[3].line_no == 4
    assert "could not be found" in records[3].parse_error and "not read" in records[3].parse_error


def test_json_array_not_closed_and_trailing_data(tmp_path: Path) -> None:
    (tmp_path / "open.json").write_text(f"[{json.dumps(RECORDS[0])}, ")
    (tmp_path / "trailing.json").write_text(f"[{json.dumps(RECORDS[0])}] junk")
    (tmp_path / "nocomma.json").write_text(f"[{json.dumps(RECORDS[0])} {json.dumps(RECORDS[1])}]")
    for name, fragment in [
        ("open", "array is not closed"),
        ("trailing", "after the closing ']'"),
        ("nocomma", "expected ',' or ']' after element 1"),
    ]:
        records = list(read_json(tmp_path / f"{name}.json", chunk=8))
        assert records[0].value == RECORDS[0]
        assert len(records) == 2 and fragment in records[1].parse_error, name


def test_json_unresyncable_element_rejects_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "unterminated.json"
    path.write_text(f'[{json.dumps(RECORDS[0])}, {{"a": "never closed, {json.dumps(RECORDS[1])}]')
    records = list(read_json(path, chunk=4))
    assert records[0].value == RECORDS[0]
    assert len(records) == 2 and "could not be found" in records[1].parse_error


def test_json_element_larger_than_the_limit(tmp_path: Path) -> None:
    big = {"prompt": "p" * 500, "completion": "c"}
    path = tmp_path / "big.json"
    path.write_text(json.dumps([big, RECORDS[0]]))
    assert [v for _, v, _ in json_elements(path, chunk=16, max_element=4096)] == [big, RECORDS[0]]
    records = list(read_json(path, chunk=16, max_element=64))
    assert len(records) == 1 and "could not be found" in records[0].parse_error


def test_json_invalid_utf8_element(tmp_path: Path) -> None:
    path = tmp_path / "bytes.json"
    path.write_bytes(b'[{"prompt": "caf\xe9", "completion": "x"}, ' + json.dumps(RECORDS[0]).encode() + b"]")
    assert json_elements(path, chunk=5) == [(1, None, "invalid_utf8"), (2, RECORDS[0], None)]


def test_json_document_and_sequence_and_empty(tmp_path: Path) -> None:
    (tmp_path / "one.json").write_text(json.dumps(RECORDS[0], indent=2))
    (tmp_path / "seq.json").write_text("\n".join(json.dumps(r, indent=2) for r in RECORDS[:2]))
    (tmp_path / "empty.json").write_text("[ ]")
    (tmp_path / "blank.json").write_text("\n")
    assert summary(outcomes(tmp_path / "one.json")) == [(1, "ok")]
    assert summary(outcomes(tmp_path / "seq.json")) == [(1, "ok"), (2, "ok")]
    assert outcomes(tmp_path / "empty.json") == [] and outcomes(tmp_path / "blank.json") == []


def test_parquet_mixed_formats_with_null_columns(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Name a colour.", "input": None, "output": "Blue.", "messages": None},
        {"instruction": None, "input": None, "output": None, "messages": QA},
        {"instruction": None, "input": None, "output": None, "messages": None},
        {"instruction": "No answer", "input": "", "output": None, "messages": None},
    ]
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(rows * 2000), path, row_group_size=1500)
    results = outcomes(path)
    assert len(results) == 8000
    assert summary(results[:4]) == [(1, "ok"), (2, "ok"), (3, "unknown_schema"), (4, "missing_response")]
    assert results[-1].line_no == 8000
    assert json.loads(results[2].raw) == rows[2]


def write_hf_dataset(directory: Path, rows: list[dict[str, Any]], shards: int = 2) -> Path:
    """The layout datasets' save_to_disk writes: Arrow stream shards, state.json, dataset_info.json."""
    directory.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    features = {
        "messages": {
            "feature": {
                "role": {"dtype": "string", "_type": "Value"},
                "content": {"dtype": "string", "_type": "Value"},
            },
            "_type": "List",
        }
    }
    schema = table.schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    per_shard = -(-len(rows) // shards)
    names = []
    for index in range(shards):
        name = f"data-{index:05d}-of-{shards:05d}.arrow"
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(
                table.slice(index * per_shard, per_shard).replace_schema_metadata(schema.metadata), max_chunksize=3
            )
        names.append(name)
    (directory / "dataset_info.json").write_text(json.dumps({"features": features, "citation": "", "description": ""}))
    (directory / "state.json").write_text(
        json.dumps(
            {
                "_data_files": [{"filename": name} for name in names],
                "_fingerprint": "0123456789abcdef",
                "_format_columns": None,
                "_format_kwargs": {},
                "_format_type": None,
                "_output_all_columns": False,
                "_split": None,
            }
        )
    )
    return directory


HF_ROWS = [
    {"messages": QA},
    {"messages": [QA[0]]},
    {"messages": [QA[1], QA[0], QA[1]]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
] * 5


def test_hf_dataset_saved_to_disk_layout(tmp_path: Path) -> None:
    path = write_hf_dataset(tmp_path / "ds", HF_ROWS, shards=3)
    assert detect_file_type(path) == "hf_dataset"
    results = outcomes(path)
    assert [r.line_no for r in results] == list(range(1, 21))
    assert summary(results[:4]) == [(1, "ok"), (2, "missing_response"), (3, "bad_order"), (4, "ok")]
    assert results[0].source == "ds" and results[0].messages == QA


def test_hf_dataset_state_errors(tmp_path: Path) -> None:
    path = write_hf_dataset(tmp_path / "ds", HF_ROWS[:2], shards=1)
    (path / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(ValueError, match="does not exist"):
        list(read_records(SourceSpec(path)))


def test_real_datasets_save_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": QA, "n": 1}, {"instruction": "", "messages": [QA[0]], "n": 2}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}] * 3),
            "test": datasets.Dataset.from_list([{"prompt": "c", "completion": ""}]),
        }
    ).save_to_disk(str(tmp_path / "splits"))
    assert summary(outcomes(tmp_path / "single")) == [(1, "ok"), (2, "missing_response")]
    assert summary(outcomes(tmp_path / "splits")) == [(1, "ok"), (2, "ok"), (3, "ok"), (4, "missing_response")]


def test_arrow_stream_file(tmp_path: Path) -> None:
    path = write_hf_dataset(tmp_path / "ds", HF_ROWS[:4], shards=1) / "data-00000-of-00001.arrow"
    assert detect_file_type(path) == "arrow"
    assert summary(outcomes(path))[0] == (1, "ok")


def test_records_source() -> None:
    source = RecordsSource("generated", iter(RECORDS + [{"text": "x"}]), fingerprint="v1")
    assert summary(list(iter_outcomes(source))) == [(1, "ok"), (2, "ok"), (3, "ok"), (4, "ok"), (5, "unknown_schema")]


def test_overlong_jsonl_line_is_rejected_without_stopping(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "long.jsonl", [json.dumps(RECORDS[0]), json.dumps({"prompt": "p" * 500}), json.dumps(RECORDS[1])]
    )
    records = list(read_jsonl(path, max_line_bytes=128))
    assert [(r.line_no, r.value is not None) for r in records] == [(1, True), (2, False), (3, True)]
    assert records[1].parse_error == "too_large: the line is longer than 128 bytes"


def test_bom_then_blank_line_and_minified_array(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf\n" + json.dumps(RECORDS[0]).encode() + b"\n")
    assert summary(outcomes(path)) == [(1, "ok")]
    minified = tmp_path / "min.json"
    minified.write_text(json.dumps(RECORDS * 3), encoding="utf-8")
    assert detect_file_type(minified) == "json"
    assert summary(outcomes(minified)) == [(i, "ok") for i in range(1, 13)]


def test_json_array_reader_holds_a_bounded_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selection.data import ingest

    path = tmp_path / "many.json"
    path.write_text(json.dumps(RECORDS * 500), encoding="utf-8")  # ~75 KB
    buffer_sizes: list[int] = []
    original_fill = ingest._JsonStream.fill

    def recording_fill(self: Any, need: int) -> None:
        original_fill(self, need)
        buffer_sizes.append(len(self.buf))

    monkeypatch.setattr(ingest._JsonStream, "fill", recording_fill)
    assert sum(1 for _ in read_json(path, chunk=1024)) == 2000
    assert path.stat().st_size > 50_000 and max(buffer_sizes) <= 2 * 1024
