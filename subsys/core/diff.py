"""Diffing query results by key.

A result is an ordered mapping ``row key -> row`` where a row is a dict of
JSON-safe values. ``compute_diff(old, new)`` says which keys were inserted,
which rows changed and which keys disappeared; ``apply_diff(old, diff)``
rebuilds ``new`` from ``old`` (the property the tests check).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from subsys.core.errors import PollError

__all__ = ["RowKey", "Rows", "Diff", "row_key", "index_rows", "compute_diff", "apply_diff", "key_object"]

RowKey = str  # canonical JSON of the key column values: hashable and stable
Rows = dict[RowKey, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Diff:
    inserted: list[dict[str, Any]] = field(default_factory=list)
    updated: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[RowKey] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.inserted or self.updated or self.deleted)


def row_key(row: Mapping[str, Any], key_columns: Sequence[str]) -> RowKey:
    return json.dumps([row[column] for column in key_columns], separators=(",", ":"), sort_keys=True)


def key_object(key: RowKey, key_columns: Sequence[str]) -> dict[str, Any]:
    """The wire form of a deleted key: ``{"id": 5}``."""
    return dict(zip(key_columns, json.loads(key)))


def index_rows(rows: Iterable[Mapping[str, Any]], key_columns: Sequence[str]) -> Rows:
    indexed: Rows = {}
    for row in rows:
        missing = [column for column in key_columns if column not in row]
        if missing:
            raise PollError(f"result has no key column(s) {', '.join(missing)}", code="bad_feed")
        key = row_key(row, key_columns)
        if key in indexed:
            raise PollError(f"duplicate key {key} in result", code="duplicate_key")
        indexed[key] = dict(row)
    return indexed


def compute_diff(old: Rows, new: Rows, key_columns: Sequence[str]) -> Diff:
    inserted: list[dict[str, Any]] = []
    updated: list[dict[str, Any]] = []
    for key, row in new.items():
        previous = old.get(key)
        if previous is None:
            inserted.append(row)
        elif previous != row or not _same_types(previous, row):
            updated.append(row)
    deleted = [key for key in old if key not in new]
    return Diff(inserted=inserted, updated=updated, deleted=deleted)


_CONTAINERS = (dict, list)


def _json_equal(a: Any, b: Any) -> bool:
    """Given ``a == b`` in Python, are they also equal as JSON? Only the types can differ."""
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is dict:
        return all(_json_equal(value, b[key]) for key, value in a.items())
    if kind is list:
        return all(map(_json_equal, a, b))
    return True


def _same_types(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Python equates True, 1 and 1.0; JSON clients do not. A json/jsonb value that flips
    between them is a change (called only on rows that are already ``==``)."""
    for column, value in old.items():
        kind = type(value)
        other = new[column]
        if kind is not type(other) or (kind in _CONTAINERS and not _json_equal(value, other)):
            return False
    return True


def apply_diff(old: Rows, diff: Diff, key_columns: Sequence[str]) -> Rows:
    result = dict(old)
    for key in diff.deleted:
        result.pop(key, None)
    for row in diff.updated:
        result[row_key(row, key_columns)] = row
    for row in diff.inserted:
        result[row_key(row, key_columns)] = row
    return result
