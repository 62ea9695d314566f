"""Merging a feed's query: one statement for many topics of the feed (pure: no I/O).

``plan_feed(sql)`` parses the feed's SQL with PostgreSQL's own parser (pglast)
and returns either a :class:`MergeTemplate` or a :class:`Refusal` saying why
the feed must be polled per topic. A template renders, for a parameter type,
the statement that runs the feed once per parameter of an array::

    SELECT p.ord, f.* FROM unnest($1::integer[]) WITH ORDINALITY AS p("?column?", ord)
    CROSS JOIN LATERAL (SELECT *, row_number() OVER () AS rn
                        FROM (<the feed, $1 -> (p."?column?")>) AS x LIMIT <max_rows + 1>) AS f

Column 0 of a result row is the parameter's ordinal (1-based), the last is the
row's place in that topic's result, the ones between are the feed's own columns
(split by position, never by name: a feed may have columns called ``ord``).
The names ``p``, ``f``, ``x``, ``rn`` are chosen so that they occur nowhere in
the feed's text, so no scope of the feed can capture them. The parameter's
column is called ``?column?`` because that is the name PostgreSQL gives an
unnamed ``$1`` in a select list: ``SELECT $1`` and ``SELECT (p."?column?")``
yield a column of the same name, so a feed's columns are the same merged or not.

Why text splicing at the parser's locations rather than deparsing the tree:
every ``$1`` the parser found (a ParamRef, never one in a string, comment or
dollar-quoted body) is replaced where it stands by ``(p."?column?")`` and the rest
of the feed is kept byte for byte, so no deparser quirk can change a feed's
meaning. A parenthesised column reference is a ``c_expr`` like ``$1`` is, so
``$1::int``, ``$1[1]`` and ``-$1`` keep their parse. The result is parsed
again and checked before use.

What cannot be decided from the text (the type PostgreSQL infers for ``$1``,
an aggregate nobody here knows by name) is checked by the server when the
node prepares the statement (:mod:`subsys.node.feedpoller`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

import pglast
from pglast import ast
from pglast.parser import ParseError

__all__ = ["MergeTemplate", "Refusal", "plan_feed"]

# Built-in aggregates: an aggregate whose arguments hold $1 and no column of its own query would,
# with $1 as an outer column, belong to the outer (merging) query, where PostgreSQL refuses it.
_AGGREGATES = frozenset("""
    count sum min max avg array_agg string_agg bool_and bool_or every bit_and bit_or bit_xor
    json_agg jsonb_agg json_object_agg jsonb_object_agg xmlagg range_agg range_intersect_agg
    stddev stddev_pop stddev_samp variance var_pop var_samp corr covar_pop covar_samp
    regr_avgx regr_avgy regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy
    mode percentile_cont percentile_disc rank dense_rank percent_rank cume_dist any_value
""".split())

_NON_SELECT = {
    "InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE", "MergeStmt": "MERGE",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a feed is polled per topic (said once at start, and in the node's report)."""

    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True, slots=True)
class MergeTemplate:
    """A feed's query with every ``$1`` replaced, ready to wrap for a parameter type."""

    body: str  # the feed, $1 -> (<param alias>."?column?")
    names: tuple[str, str, str, str]  # param alias, outer alias, inner alias, row number column
    replaced: int  # how many $1 were replaced

    def render(self, array_type: str, max_rows: int) -> str:
        """The merged statement; ``array_type`` is SQL for the array of $1's type (``integer[]``)."""
        p, f, x, rn = self.names
        sql = (
            f"SELECT {p}.ord, {f}.* FROM unnest($1::{array_type}) WITH ORDINALITY AS {p}({_PARAM}, ord)\n"
            f"CROSS JOIN LATERAL (SELECT *, row_number() OVER () AS {rn} FROM (\n"
            f"{self.body}\n"  # own lines: a feed ending in a -- comment cannot swallow the rest
            f") AS {x} LIMIT {int(max_rows) + 1}) AS {f}"
        )
        _check_rendered(sql, p, self.replaced)
        return sql


def plan_feed(sql: str) -> MergeTemplate | Refusal:
    """How to merge the feed ``sql`` (its parameter is ``$1``), or why it cannot be merged."""
    try:
        statements = pglast.parse_sql(sql)
    except ParseError as exc:
        return Refusal(f"the SQL does not parse with PostgreSQL's parser: {exc}")
    if len(statements) != 1:
        return Refusal(f"{len(statements)} statements: only a single SELECT can be merged")
    raw = statements[0]
    stmt = raw.stmt
    if not isinstance(stmt, ast.SelectStmt):
        kind = type(stmt).__name__
        return Refusal(f"not a SELECT ({_NON_SELECT.get(kind, kind)}): only a SELECT can be merged")
    why = _refusal(stmt)
    if why:
        return Refusal(why)
    params = [node for node in _walk(stmt) if isinstance(node, ast.ParamRef)]
    if any(p.number != 1 for p in params):
        return Refusal("uses parameters other than $1")
    if not params:
        return Refusal("$1 does not occur as a parameter (only in a string or a comment?)")
    start = raw.stmt_location or 0
    text = sql[start:start + raw.stmt_len] if raw.stmt_len else sql[start:]
    names = _fresh_names(sql)
    body = _splice(text, [p.location - start for p in params], f"({names[0]}.{_PARAM})")
    if body is None:
        return Refusal("could not locate every $1 in the text (parser locations disagree)")
    template = MergeTemplate(body=body, names=names, replaced=len(params))
    try:
        template.render("text[]", 1)  # the rewrite must parse, with every $1 replaced
    except ValueError as exc:
        return Refusal(f"the rewritten SQL failed its check: {exc}")
    return template


def _refusal(stmt: ast.SelectStmt) -> str | None:
    for node in _walk(stmt):
        if isinstance(node, ast.SelectStmt):
            if node.intoClause is not None:
                return "SELECT INTO creates a table: not a feed query"
            if node.lockingClause:
                return ("FOR UPDATE/SHARE: one statement would lock the rows of every topic of a batch, "
                        "and one topic's lock wait would stall them all")  # fmt: skip
        elif isinstance(node, ast.CommonTableExpr) and not isinstance(node.ctequery, ast.SelectStmt):
            kind = type(node.ctequery).__name__
            return (f"a data-modifying WITH ({_NON_SELECT.get(kind, kind)}) must stay at the top level "
                    "of a statement: it cannot be nested in the merged one")  # fmt: skip
        elif isinstance(node, ast.FuncCall) and _aggregate_over_param_only(node):
            name = ".".join(s.sval for s in node.funcname)
            return (f"$1 is the only column in the arguments of the aggregate {name}(): as a column "
                    "reference it would make the aggregate belong to the merging query, where it is not allowed")  # fmt: skip
    return None


def _aggregate_over_param_only(call: ast.FuncCall) -> bool:
    if call.over is not None or not call.funcname or call.funcname[-1].sval.lower() not in _AGGREGATES:
        return False
    parts = [*(call.args or ()), *(call.agg_order or ()), call.agg_filter]
    seen = [n for part in parts if part is not None for n in _walk(part, into_subqueries=False)]
    return any(isinstance(n, ast.ParamRef) for n in seen) and not any(isinstance(n, ast.ColumnRef) for n in seen)


def _walk(node: Any, *, into_subqueries: bool = True) -> Iterator[Any]:
    """Every AST node under ``node`` (itself included), depth first."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, (tuple, list)):
            stack.extend(reversed(item))
            continue
        if not isinstance(item, ast.Node):
            continue
        yield item
        if not into_subqueries and isinstance(item, (ast.SubLink, ast.RangeSubselect)):
            continue
        for name in item.__slots__:
            value = getattr(item, name, None)
            if isinstance(value, (ast.Node, tuple, list)):
                stack.append(value)


def _fresh_names(sql: str) -> tuple[str, str, str, str]:
    """Aliases that occur nowhere in the feed's text (so no scope of the feed can shadow them)."""
    lowered = sql.lower()
    names = []
    for base in ("subsys_p", "subsys_f", "subsys_x", "subsys_rn"):
        name, n = base, 0
        while name in lowered or name in names:
            n += 1
            name = f"{base}{n}"
        names.append(name)
    return names[0], names[1], names[2], names[3]


_PARAM = '"?column?"'  # see the module's docstring
_PARAM_TOKEN = re.compile(r"\$[0-9]+")


def _splice(text: str, locations: list[int], replacement: str) -> str | None:
    out, last = [], 0
    for at in sorted(set(locations)):
        match = _PARAM_TOKEN.match(text, at)
        if at < last or match is None:
            return None
        out.append(text[last:at])
        out.append(replacement)
        last = match.end()
    out.append(text[last:])
    return "".join(out)


def _check_rendered(sql: str, param_alias: str, replaced: int) -> None:
    """The merged statement parses as one SELECT whose only parameter is the array, and every
    replaced $1 became a reference to the unnested parameter."""
    try:
        statements = pglast.parse_sql(sql)
    except ParseError as exc:
        raise ValueError(f"does not parse: {exc}") from None
    if len(statements) != 1 or not isinstance(statements[0].stmt, ast.SelectStmt):
        raise ValueError("is not a single SELECT")
    nodes = list(_walk(statements[0].stmt))
    params = [n for n in nodes if isinstance(n, ast.ParamRef)]
    refs = [
        n for n in nodes
        if isinstance(n, ast.ColumnRef) and len(n.fields) == 2
        and all(isinstance(f, ast.String) for f in n.fields)
        and (n.fields[0].sval, n.fields[1].sval) == (param_alias, "?column?")
    ]  # fmt: skip
    if len(params) != 1 or len(refs) != replaced:
        raise ValueError(f"{len(params)} parameters and {len(refs)} references to the parameter, "
                         f"expected 1 and {replaced}")  # fmt: skip
