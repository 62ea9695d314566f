"""The JSON mapping documented in subsys/core/encoding.py and docs/protocol.md (section 6), row by row."""

from __future__ import annotations

import datetime as dt
import decimal
import ipaddress
import json
import math
import uuid

import pytest
from hypothesis import given, strategies as st

from subsys.client.ws import connect
from subsys.core.encoding import dumps, encode_row, encode_value

from support import Subscription, db_execute, eventually

UTC = dt.timezone.utc


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        (True, True),
        (False, False),
        ("text é", "text é"),
        (0, 0),
        (2**53 - 1, 2**53 - 1),
        (-(2**53 - 1), -(2**53 - 1)),
        (2**53, "9007199254740992"),
        (-(2**53), "-9007199254740992"),
        (2**63 - 1, "9223372036854775807"),
        (1.5, 1.5),
        (float("inf"), "Infinity"),
        (float("-inf"), "-Infinity"),
        (decimal.Decimal("12.50"), "12.50"),
        (decimal.Decimal("NaN"), "NaN"),
        (decimal.Decimal("-0.000001"), "-0.000001"),
        (dt.datetime(2024, 5, 6, 7, 8, 9, 500), "2024-05-06T07:08:09.000500"),
        (dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC), "2024-05-06T07:08:09+00:00"),
        (
            dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30))),
            "2024-05-06T07:08:09-05:30",
        ),
        (dt.date(2024, 2, 29), "2024-02-29"),
        (dt.time(23, 59, 1), "23:59:01"),
        (dt.time(1, 2, 3, tzinfo=UTC), "01:02:03+00:00"),
        (dt.timedelta(days=1, seconds=1, microseconds=500000), 86401.5),
        (dt.timedelta(seconds=-30), -30.0),
        (uuid.UUID("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        (b"\x00\x01\xff", "AAH/"),
        (bytearray(b"hi"), "aGk="),
        (memoryview(b"hi"), "aGk="),
        ({"a": [1, None, {"b": decimal.Decimal("1.0")}]}, {"a": [1, None, {"b": "1.0"}]}),
        ([1, 2**60, None], [1, str(2**60), None]),
        ((1, "x"), [1, "x"]),
        (ipaddress.ip_address("10.0.0.1"), "10.0.0.1"),
        (ipaddress.ip_network("10.0.0.0/8"), "10.0.0.0/8"),
    ],
)
def test_documented_mapping(value, expected):
    encoded = encode_value(value)
    assert encoded == expected
    assert type(encoded) is type(expected)


def test_nan_float_is_a_string():
    assert encode_value(float("nan")) == "NaN"


def test_encoded_values_are_strict_json():
    row = encode_row({"a": float("nan"), "b": float("inf"), "c": 2**70, "d": b"x"})
    text = dumps({"row": row})
    assert json.loads(text) == {"row": {"a": "NaN", "b": "Infinity", "c": str(2**70), "d": "eA=="}}
    assert " " not in text  # compact


def test_encode_row_accepts_pairs_and_mappings():
    assert encode_row([("a", 1), ("b", decimal.Decimal("2"))]) == {"a": 1, "b": "2"}
    assert encode_row({"a": None}) == {"a": None}


def test_dumps_refuses_unencoded_nan():
    with pytest.raises(ValueError):
        dumps({"x": float("nan")})


json_like = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(),
        st.decimals(allow_nan=True, allow_infinity=False),
        st.datetimes(timezones=st.one_of(st.none(), st.timezones())),
        st.uuids(),
        st.binary(max_size=16),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=8,
)


@given(json_like)
def test_property_everything_encodes_to_strict_json(value):
    encoded = encode_value(value)
    text = dumps({"v": encoded})  # allow_nan=False: raises on anything not strict JSON
    assert json.loads(text)["v"] == encoded
    _check_ints_are_safe(encoded)


def _check_ints_are_safe(value) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        assert abs(value) <= 2**53 - 1
    elif isinstance(value, float):
        assert math.isfinite(value)
    elif isinstance(value, list):
        for item in value:
            _check_ints_are_safe(item)
    elif isinstance(value, dict):
        for item in value.values():
            _check_ints_are_safe(item)


def test_decimal_is_plain_digits_and_special_values():
    import decimal

    assert encode_value(decimal.Decimal("1E-8")) == "0.00000001"
    assert encode_value(decimal.Decimal("1E+20")) == "100000000000000000000"
    assert encode_value(decimal.Decimal("NaN")) == "NaN"
    assert encode_value(decimal.Decimal("-Infinity")) == "-Infinity"


async def test_ranges_composites_bits_and_infinity_from_postgres(database_url):
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("create type pair as (a int, b text)")
        row = await conn.fetchrow(
            "select int4range(1, 5) as r, 'empty'::int4range as e, numrange(null, 2.5) as open_lower,"
            " row(1, 'x')::pair as p, B'101'::bit(3) as bits,"
            " 'infinity'::timestamptz as inf, '-infinity'::timestamp as ninf, 'infinity'::date as dinf"
        )
    finally:
        await conn.close()
    encoded = {name: encode_value(value) for name, value in row.items()}
    assert encoded["r"] == {"lower": 1, "upper": 5, "lower_inc": True, "upper_inc": False, "empty": False}
    assert encoded["e"]["empty"] is True
    assert encoded["open_lower"] == {"lower": None, "upper": "2.5", "lower_inc": False, "upper_inc": False, "empty": False}
    assert encoded["p"] == {"a": 1, "b": "x"}
    assert encoded["bits"] == "101"
    assert (encoded["inf"], encoded["ninf"], encoded["dinf"]) == ("infinity", "-infinity", "infinity")


# Every row of docs/protocol.md, section 6: (SQL expression, what a client receives).
DOCUMENTED_ROWS = [
    ("null::int", None),
    ("true", True),
    ("42::smallint", 42),
    ("(2^53 - 1)::bigint", 2**53 - 1),
    ("(-(2^53 - 1))::bigint", -(2**53 - 1)),
    ("(2^53)::bigint", "9007199254740992"),
    ("(-9223372036854775808)::bigint", "-9223372036854775808"),
    ("1.5::float8", 1.5),
    ("0.1::real", 0.10000000149011612),
    ("'NaN'::float8", "NaN"),
    ("'Infinity'::real", "Infinity"),
    ("'-Infinity'::float8", "-Infinity"),
    ("12.50::numeric", "12.50"),
    ("100::numeric", "100"),
    ("0.00000001::numeric", "0.00000001"),
    ("1e20::numeric", "100000000000000000000"),
    ("'NaN'::numeric", "NaN"),
    ("'Infinity'::numeric", "Infinity"),
    ("'-Infinity'::numeric", "-Infinity"),
    ("'2024-01-02 03:04:05'::timestamp", "2024-01-02T03:04:05"),
    ("'2024-01-02 03:04:05.5'::timestamp", "2024-01-02T03:04:05.500000"),
    ("'infinity'::timestamp", "infinity"),
    ("'-infinity'::timestamp", "-infinity"),
    ("'2024-01-02 03:04:05+02'::timestamptz", "2024-01-02T01:04:05+00:00"),
    ("'infinity'::timestamptz", "infinity"),
    ("'-infinity'::timestamptz", "-infinity"),
    ("'2024-01-02'::date", "2024-01-02"),
    ("'infinity'::date", "infinity"),
    ("'-infinity'::date", "-infinity"),
    ("'12:30:00'::time", "12:30:00"),
    ("'12:30:00.25'::time", "12:30:00.250000"),
    ("'12:30:00+02'::timetz", "12:30:00+02:00"),
    ("'1 day 00:00:01.5'::interval", 86401.5),
    ("'1 month'::interval", 2592000.0),
    ("'1 year'::interval", 31536000.0),
    ("'-30 seconds'::interval", -30.0),
    ("'7D444840-9DC0-11D1-B245-5FFDCE74FAD2'::uuid", "7d444840-9dc0-11d1-b245-5ffdce74fad2"),
    ("'\\x0102'::bytea", "AQI="),
    ("""'{"a": [1, 2.5, 9007199254740993]}'::jsonb""", {"a": [1, 2.5, "9007199254740993"]}),
    ("""'"x"'::json""", "x"),
    ("array[1, 2]", [1, 2]),
    ("array[[1, 2], [3, 4]]", [[1, 2], [3, 4]]),
    ("array['a', null]", ["a", None]),
    ("'{}'::int[]", []),
    ("array['2024-01-02'::date]", ["2024-01-02"]),
    ("point(1, 2)", [1.0, 2.0]),
    ("box(point(1, 2), point(3, 4))", [[3.0, 4.0], [1.0, 2.0]]),
    ("lseg(point(1, 2), point(3, 4))", [[1.0, 2.0], [3.0, 4.0]]),
    ("'{1,2,3}'::line", [1.0, 2.0, 3.0]),
    ("circle(point(1, 2), 3)", [[1.0, 2.0], 3.0]),
    ("'((1,2),(3,4))'::path", [[1.0, 2.0], [3.0, 4.0]]),
    ("'[(1,2),(3,4)]'::path", [[1.0, 2.0], [3.0, 4.0]]),
    ("'((1,2),(3,4),(5,6))'::polygon", [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
    ("row(1, 'x')", [1, "x"]),
    ("row(1, 'x')::pair", {"a": 1, "b": "x"}),
    ("int4range(1, 5)", {"lower": 1, "upper": 5, "lower_inc": True, "upper_inc": False, "empty": False}),
    ("'empty'::int4range", {"lower": None, "upper": None, "lower_inc": False, "upper_inc": False, "empty": True}),
    ("numrange(null, 2.5)", {"lower": None, "upper": "2.5", "lower_inc": False, "upper_inc": False, "empty": False}),
    ("daterange('2024-01-01', 'infinity')",
     {"lower": "2024-01-01", "upper": "infinity", "lower_inc": True, "upper_inc": False, "empty": False}),
    ("'{[1,3), [5,7)}'::int4multirange",
     [{"lower": 1, "upper": 3, "lower_inc": True, "upper_inc": False, "empty": False},
      {"lower": 5, "upper": 7, "lower_inc": True, "upper_inc": False, "empty": False}]),
    ("B'101'", "101"),
    ("B'1'::varbit", "1"),
    ("'hello'::text", "hello"),
    ("'x'::char(3)", "x  "),
    ("'10.0.0.1/8'::inet", "10.0.0.1/8"),
    ("'10.0.0.1'::inet", "10.0.0.1"),
    ("'10.0.0.0/8'::cidr", "10.0.0.0/8"),
    ("'08:00:2b:01:02:03'::macaddr", "08:00:2b:01:02:03"),
    ("'happy'::mood", "happy"),
]  # fmt: skip


async def test_every_documented_row_reaches_a_client_as_documented(start_node, database_url):
    """Through a real node: PostgreSQL value -> asyncpg -> encoding -> WebSocket -> client."""
    await db_execute(database_url, "CREATE TYPE pair AS (a int, b text); CREATE TYPE mood AS ENUM ('happy')")
    columns = ", ".join(f"{expr} AS c{n}" for n, (expr, _) in enumerate(DOCUMENTED_ROWS))
    # money's text form follows lc_monetary: only its digits are checked.
    feed = {"sql": f"SELECT 1 AS id, {columns}, 12.5::money AS cash, $1::text AS p", "key": "id", "interval": 0.05}
    node = await start_node({"values": feed}, database_url=database_url)
    async with connect(node.ws_url) as client:
        sub = Subscription(client, "values:x")
        snapshot = await sub.next()
        assert snapshot["type"] == "snapshot", snapshot
        (row,) = snapshot["rows"]
        mismatches = {
            expr: row[f"c{n}"] for n, (expr, expected) in enumerate(DOCUMENTED_ROWS) if row[f"c{n}"] != expected
        }
        assert not mismatches, mismatches
        assert isinstance(row["cash"], str) and "12.50" in row["cash"]
        # Encodings are stable: polling the same values again publishes no change.
        stream = node.node.registry.get("values:x")
        await eventually(lambda: stream.stats.polls >= 5, message="a few more polls")
        assert stream.stats.changes == 1
        await sub.stop()
