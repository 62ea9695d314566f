"""Diffing by key: examples and properties (hypothesis)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from subsys.client.ws import TopicView
from subsys.config import Feed
from subsys.core.diff import Diff, apply_diff, compute_diff, index_rows, key_object, row_key
from subsys.core.errors import PollError
from subsys.node.stream import TopicStream


def canonical(rows) -> str:
    """Type-exact comparison: JSON tells 1, 1.0 and true apart; Python's == does not."""
    return json.dumps(rows, sort_keys=True)


# -- examples ------------------------------------------------------------------


def test_example_insert_update_delete():
    old = index_rows([{"id": 1, "v": "a"}, {"id": 2, "v": "b"}, {"id": 3, "v": "c"}], ["id"])
    new = index_rows([{"id": 1, "v": "a"}, {"id": 2, "v": "B"}, {"id": 4, "v": "d"}], ["id"])
    diff = compute_diff(old, new, ["id"])
    assert diff.inserted == [{"id": 4, "v": "d"}]
    assert diff.updated == [{"id": 2, "v": "B"}]
    assert [key_object(k, ["id"]) for k in diff.deleted] == [{"id": 3}]
    assert apply_diff(old, diff, ["id"]) == new


def test_no_change_is_an_empty_diff():
    rows = index_rows([{"id": 1, "v": [1, {"x": None}]}], ["id"])
    diff = compute_diff(rows, index_rows([{"id": 1, "v": [1, {"x": None}]}], ["id"]), ["id"])
    assert not diff
    assert diff == Diff()


def test_composite_key_and_key_objects():
    cols = ["region", "n"]
    old = index_rows([{"region": "eu", "n": 1, "v": 0}, {"region": "us", "n": 1, "v": 0}], cols)
    new = index_rows([{"region": "eu", "n": 1, "v": 5}], cols)
    diff = compute_diff(old, new, cols)
    assert diff.updated == [{"region": "eu", "n": 1, "v": 5}]
    assert [key_object(k, cols) for k in diff.deleted] == [{"region": "us", "n": 1}]


def test_key_order_in_row_does_not_matter():
    a = {"id": 1, "x": 2}
    b = {"x": 2, "id": 1}
    assert row_key(a, ["id"]) == row_key(b, ["id"])
    assert not compute_diff(index_rows([a], ["id"]), index_rows([b], ["id"]), ["id"])


def test_duplicate_and_missing_keys_are_errors():
    with pytest.raises(PollError) as exc:
        index_rows([{"id": 1}, {"id": 1}], ["id"])
    assert exc.value.code == "duplicate_key"
    with pytest.raises(PollError) as exc:
        index_rows([{"other": 1}], ["id"])
    assert exc.value.code == "bad_feed"


@pytest.mark.parametrize(
    "before, after",
    [
        (1, True),  # a jsonb value flipping from 1 to true
        (0, False),
        (1, 1.0),
        ({"flag": 1}, {"flag": True}),
        ([1, 2], [1.0, 2]),
    ],
)
def test_a_change_of_json_type_is_a_change(before, after):
    """Python says 1 == True == 1.0; clients (JSON) see different values."""
    old = index_rows([{"id": 1, "doc": before}], ["id"])
    new = index_rows([{"id": 1, "doc": after}], ["id"])
    diff = compute_diff(old, new, ["id"])
    assert diff.updated == [{"id": 1, "doc": after}]
    assert canonical(apply_diff(old, diff, ["id"])) == canonical(new)


# -- properties ----------------------------------------------------------------

# Values as they come out of subsys.encoding: JSON-safe. Small, colliding values on purpose,
# including Python-equal ones of different JSON types (1, 1.0, True).
json_scalars = st.one_of(
    st.sampled_from([None, True, False, 0, 1, 0.0, 1.0, -1, "", "a", "1"]),
    st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from("abc"), inner, max_size=3)),
    max_leaves=4,
)
int_keys = st.integers(min_value=-20, max_value=20).map(lambda i: {"id": i})
composite_keys = st.tuples(st.sampled_from(["eu", "us", "é"]), st.integers(min_value=0, max_value=4)).map(
    lambda t: {"region": t[0], "n": t[1]}
)
bodies = st.fixed_dictionaries({"a": json_scalars, "doc": json_values})


def _retyped(value):
    """A value Python considers equal but JSON does not (1 -> 1.0 -> True ...), where there is one."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and abs(value) < 2**53:
        return float(value) if value not in (0, 1) else bool(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_retyped(item) for item in value]
    if isinstance(value, dict):
        return {key: _retyped(item) for key, item in value.items()}
    return value


@st.composite
def old_and_new(draw, keys):
    """Two results of one feed: rows kept, changed, dropped, and new rows."""

    def rows(max_size: int) -> dict[str, dict]:
        drawn = draw(st.lists(st.tuples(keys, bodies), max_size=max_size))
        return {json.dumps(key, sort_keys=True): {**key, **body} for key, body in drawn}

    old = rows(10)
    new = {}
    for key, row in old.items():
        action = draw(st.sampled_from(["keep", "change", "retype", "drop"]))
        if action == "keep":
            new[key] = dict(row)
        elif action == "change":
            new[key] = {**row, **draw(bodies)}
        elif action == "retype":
            new[key] = {**row, "a": _retyped(row["a"]), "doc": _retyped(row["doc"])}
    new.update(rows(4))
    return list(old.values()), list(new.values())


def _check_property(old_rows, new_rows, cols):
    old = index_rows(old_rows, cols)
    new = index_rows(new_rows, cols)
    diff = compute_diff(old, new, cols)
    assert canonical(apply_diff(old, diff, cols)) == canonical(new)
    # Minimal and disjoint: inserts are new keys, deletes are gone keys, updates really changed.
    inserted = {row_key(r, cols) for r in diff.inserted}
    updated = {row_key(r, cols) for r in diff.updated}
    assert inserted == set(new) - set(old)
    assert set(diff.deleted) == set(old) - set(new)
    assert updated <= set(old) & set(new)
    for key in set(old) & set(new):
        assert (key in updated) == (canonical(old[key]) != canonical(new[key]))
    # Deleted keys survive the wire form the clients get.
    for key in diff.deleted:
        assert row_key(key_object(key, cols), cols) == key
    assert bool(diff) == (canonical(old) != canonical(new))


@settings(max_examples=150, deadline=None)
@given(old_and_new(int_keys))
def test_property_apply_diff_rebuilds_new_rows_int_keys(pair):
    _check_property(*pair, ["id"])


@settings(max_examples=150, deadline=None)
@given(old_and_new(composite_keys))
def test_property_apply_diff_rebuilds_new_rows_composite_keys(pair):
    _check_property(*pair, ["region", "n"])


@settings(max_examples=60, deadline=None)
@given(st.lists(old_and_new(int_keys).map(lambda pair: pair[1]), min_size=1, max_size=5))
def test_property_client_view_follows_published_frames(results):
    """The owner's publications, as JSON on the wire, rebuild every poll result in a client's TopicView."""
    feed = Feed(name="t", sql="select $1", key=("id",))
    state = TopicStream(topic="t:1", feed=feed, param="1")
    received: list[dict] = []

    class Receiver:
        def deliver(self, publication):
            received.append(json.loads(publication.wire()))

    state.local.add(Receiver())
    view = TopicView()
    for rows in results:
        state.publish_rows(index_rows(rows, ["id"]), epoch=1)
        for frame in received:
            view.apply(frame)
        received.clear()
        assert canonical(sorted(view.rows.values(), key=lambda r: r["id"])) == canonical(
            sorted(rows, key=lambda r: r["id"])
        )
        assert view.seq == state.seq
