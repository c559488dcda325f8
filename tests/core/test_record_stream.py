"""stream_records: the records and errors of read_records, read a record at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llama_pipe.core import record_stream
from llama_pipe.core.record_stream import stream_records
from llama_pipe.core.records import InvalidLine, read_records

REPO = Path(__file__).resolve().parents[2]

CASES: dict[str, str | bytes] = {
    "list.json": '[{"id":"x","v":1},{"id":"y","conversations":[]}]',
    "bom_empty_list.json": "\ufeff[ ]",
    "numbers.json": '\ufeff[1, 2.5e3 ,{"a":NaN}, 1e5, {"b":1e999}, {"c":"é \\ud83d"}]\n',
    "truncated.json": "[1,2",
    "extra.json": "[1,2]x",
    "object.json": '{"a":1}',
    "blank.json": "   ",
    "empty.jsonl": "",
    "bad_line.jsonl": '{"a":1}\n{bad\n',
    "torn.jsonl": '{"a":1}\n{bad',
    "torn_then_blank.jsonl": '{"a":1}\n{bad\n  ',
    "mixed.jsonl": '\ufeff{"a":1}\r\n\n{"b":"\\ud800"}\n' + "[" * 205 + "]" * 205 + "\n",
    "list.txt": '[{"a":1}]',
    "lines.txt": '{"a":1}\n',
    "deep.json": "[" + "[" * 5000 + "]" * 5000 + "]",
    "comma.json": "[,]",
    "no_comma.json": '["a" "b"]',
    "bad_utf8.jsonl": b'{"a":1}\n{"b":"\xff"}\n',
    "bad_utf8.json": b'[{"a":"\xc3"}]',
    "utf16.json": "[1]".encode("utf-16"),
}


def _run(it: Any) -> list[Any]:
    out: list[Any] = []
    try:
        for where, obj in it:
            out.append((where, ("invalid", obj.text, obj.error, obj.reason) if isinstance(obj, InvalidLine) else obj))
    except Exception as exc:  # noqa: BLE001 - the error is part of what is compared
        out.append(("error", type(exc).__name__, str(exc)))
    return out


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_same_records_and_errors_as_read_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Every record, InvalidLine and error equals read_records' (a 7-byte window splits values and
    characters). The one difference: a bad JSON list is found where it breaks, after its good records."""
    monkeypatch.setattr(record_stream, "CHUNK", chunk)
    for name, text in CASES.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        ours, theirs = _run(stream_records(path)), _run(read_records(path))
        if theirs and theirs[-1][0] == "error":  # the same error; a stream may first yield more records before the fault
            assert ours[-1] == theirs[-1] and ours[: len(theirs) - 1] == theirs[:-1], name
        else:
            assert ours == theirs, name
    assert _run(stream_records(tmp_path / "truncated.json"))[0][1] == 1
    for sample in ("sharegpt_sample.json", "identity_sample.json"):
        path = REPO / "data" / "sample" / sample
        assert _run(stream_records(path)) == _run(read_records(path))


def test_a_json_list_is_read_a_window_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The window holds about one chunk, not the file."""
    import json

    monkeypatch.setattr(record_stream, "CHUNK", 1000)
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"id": str(i), "text": "x" * 300} for i in range(2000)]))
    widest = 0
    real = record_stream._decode

    def spy(decoder: Any, buf: str, pos: int, more_possible: bool) -> Any:
        nonlocal widest
        widest = max(widest, len(buf))
        return real(decoder, buf, pos, more_possible)

    monkeypatch.setattr(record_stream, "_decode", spy)
    assert sum(1 for _ in stream_records(path)) == 2000
    assert 0 < widest < 3000
