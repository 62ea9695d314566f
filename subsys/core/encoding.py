"""JSON-safe encoding of PostgreSQL values (the mapping is part of protocol v1).

| PostgreSQL / Python value            | JSON                                        |
| ------------------------------------ | ------------------------------------------- |
| NULL                                 | null                                        |
| boolean                              | true / false                                |
| integer within +-(2**53 - 1)         | number                                      |
| integer outside that range           | string of decimal digits (JS would round it)|
| real / double                        | number; NaN and +-Infinity as strings       |
| numeric (Decimal)                    | string, exact, plain digits ("12.50",       |
|                                      | "0.00000001"); "NaN", "Infinity"            |
| timestamp / timestamptz              | ISO 8601 string (timestamptz with offset);  |
|                                      | "infinity" / "-infinity"                    |
| date, time, timetz                   | ISO 8601 string; dates also +-infinity      |
| interval                             | number of seconds (float)                   |
| uuid                                 | string, canonical lowercase                 |
| bytea                                | string, standard base64                     |
| json / jsonb                         | the JSON value itself                       |
| arrays                               | array of the element mapping                |
| geometric types (point, line, lseg,  | array of their components, by this mapping  |
| box, circle, path, polygon)          | (a path's open/closed flag is not sent)     |
| anonymous records (row(...))         | array of the field mapping                  |
| composite types                      | object of the field mapping                 |
| ranges                               | {"lower","upper","lower_inc","upper_inc",   |
|                                      |  "empty"}, bounds by this mapping (null:    |
|                                      |  unbounded)                                 |
| bit / varbit                         | string of 0 and 1                           |
| anything else (inet, cidr, macaddr)  | its text form                               |
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
import uuid
from typing import Any, Iterable, Mapping

import asyncpg

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
        if value.is_nan():
            return "NaN"
        if value.is_infinite():
            return "Infinity" if value > 0 else "-Infinity"
        return format(value, "f")  # plain digits: "0.00000001", never "1E-8"
    if isinstance(value, dt.datetime):
        if value.replace(tzinfo=None) == dt.datetime.max:
            return "infinity"
        if value.replace(tzinfo=None) == dt.datetime.min:
            return "-infinity"
        return value.isoformat()
    if isinstance(value, dt.date):
        if value == dt.date.max:
            return "infinity"
        if value == dt.date.min:
            return "-infinity"
        return value.isoformat()
    if isinstance(value, dt.time):
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
    if isinstance(value, asyncpg.Record):  # a composite type
        return {str(k): encode_value(v) for k, v in value.items()}
    if isinstance(value, asyncpg.Range):
        return {
            "lower": encode_value(value.lower),
            "upper": encode_value(value.upper),
            "lower_inc": value.lower_inc,
            "upper_inc": value.upper_inc,
            "empty": value.isempty,
        }
    if isinstance(value, asyncpg.BitString):
        return value.as_string()
    if isinstance(value, asyncpg.Path):  # and Polygon: the geometric types that are not tuples
        return [encode_value(point) for point in value.points]
    return str(value)


def encode_row(record: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, Any]:
    items = record.items() if hasattr(record, "items") else record
    return {name: encode_value(value) for name, value in items}


def dumps(message: Mapping[str, Any]) -> str:
    """Compact JSON for the wire; values must already be JSON-safe."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
