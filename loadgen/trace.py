"""Trace files to replay: one request per row, with its arrival time and its lengths in tokens.

Formats: CSV with a header row (.csv), or JSON lines (any other suffix). Column names, first match:

    time     timestamp, time, arrival_time, TIMESTAMP     numbers in --trace-time-unit (s or ms),
                                                         or ISO datetimes (Azure's traces)
    input    input_length, input_len, input_tokens, prompt_tokens, ContextTokens
    output   output_length, output_len, output_tokens, completion_tokens, GeneratedTokens
    hash_ids optional (Mooncake's traces): ids of the prompt's consecutive blocks of
             --trace-block-size tokens (default 512); equal ids get equal token blocks, so the
             prefix sharing of the trace is replayed

Rows are sorted by time; offsets are the times minus the first, divided by --trace-speedup.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

TIME_KEYS = ("timestamp", "time", "arrival_time", "TIMESTAMP")
INPUT_KEYS = ("input_length", "input_len", "input_tokens", "prompt_tokens", "ContextTokens")
OUTPUT_KEYS = ("output_length", "output_len", "output_tokens", "completion_tokens", "GeneratedTokens")
TIME_UNITS_S = {"s": 1.0, "ms": 1e-3}


@dataclass(frozen=True)
class TraceRow:
    offset_s: float
    num_input_tokens: int
    num_output_tokens: int
    hash_ids: tuple[int, ...] | None = None


def _field(record: dict[str, Any], keys: tuple[str, ...], line: int) -> Any:
    for key in keys:
        if key in record and record[key] not in (None, ""):
            return record[key]
    raise ValueError(f"trace row {line}: none of {keys} found in {sorted(record)}")


def _seconds(value: Any, unit_s: float) -> float:
    if isinstance(value, (int, float)):
        return float(value) * unit_s
    text = str(value).strip()
    try:
        return float(text) * unit_s
    except ValueError:
        pass
    head, dot, fraction = text.partition(".")  # Azure writes 7 fractional digits; isoformat takes 6
    return datetime.fromisoformat(head + dot + fraction[:6] if dot else head).timestamp()


def _records(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as f:
        if path.suffix.lower() == ".csv":
            return [dict(row) for row in csv.DictReader(f)]
        return [json.loads(line) for line in f if line.strip()]


def _hash_ids(value: Any) -> tuple[int, ...] | None:
    if value in (None, ""):
        return None
    if isinstance(value, str):
        value = json.loads(value)
    return tuple(int(x) for x in value)


def read_trace(path: str | Path, time_unit: str = "s", speedup: float = 1.0) -> list[TraceRow]:
    """The trace's rows, sorted by arrival, offsets starting at 0."""
    unit_s = TIME_UNITS_S[time_unit]
    parsed = []
    for line, record in enumerate(_records(Path(path)), start=1):
        parsed.append(
            (
                _seconds(_field(record, TIME_KEYS, line), unit_s),
                int(float(_field(record, INPUT_KEYS, line))),
                int(float(_field(record, OUTPUT_KEYS, line))),
                _hash_ids(record.get("hash_ids")),
            )
        )
    parsed.sort(key=lambda row: row[0])
    first_s = parsed[0][0] if parsed else 0.0
    return [TraceRow((t - first_s) / speedup, max(1, n_in), max(1, n_out), ids) for t, n_in, n_out, ids in parsed]
