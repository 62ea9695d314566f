"""JSON-safe encoding of PostgreSQL values (the mapping is part of protocol v1).

| PostgreSQL / Python value            | JSON                                        |
| ------------------------------------ | ------------------------------------------- |
| NULL                                 | null                                        |
| boolean                              | true / false                                |
| integer within +-(2**53 - 1)         | number                                      |
| integer outside that range           | string of decimal digits (JS would round it)|
| real / double                        | number; NaN and +-Infinity as strings       |
| numeric (Decimal)                    | string, exact ("12.50"); NaN as "NaN"       |
| timestamp / timestamptz              | ISO 8601 string (timestamptz with offset)   |
| date, time, timetz                   | ISO 8601 string                             |
| interval                             | number of seconds (float)                   |
| uuid                                 | string, canonical lowercase                 |
| bytea                                | string, standard base64                     |
| json / jsonb                         | the JSON value itself                       |
| arrays                               | array of the element mapping                |
| anything else (inet, ranges, ...)    | its text form                               |
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
import uuid
from typing import Any, Iterable, Mapping

__all__ = ["encode_value", "encode_row", "dumps"]

_MAX_SAFE_INT = 2**53 - 1


def encode_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (list, tuple)):
        return [encode_value(item) for item in value]
    if isinstance(value, dict):
        return {str(k): encode_value(v) for k, v in value.items()}
    return str(value)


def encode_row(record: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, Any]:
    items = record.items() if hasattr(record, "items") else record
    return {name: encode_value(value) for name, value in items}


def dumps(message: Mapping[str, Any]) -> str:
    """Compact JSON for the wire; values must already be JSON-safe."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
