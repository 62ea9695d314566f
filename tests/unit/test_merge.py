"""The merged statement is a rewrite by PostgreSQL's own parser (pglast): what it keeps, and what it refuses."""

from __future__ import annotations

import pglast
import pytest
from pglast import ast

from subsys.node.merge import MergeTemplate, Refusal, plan_feed


def merged(sql: str, array: str = "integer[]", max_rows: int = 10) -> str:
    plan = plan_feed(sql)
    assert isinstance(plan, MergeTemplate), plan
    return plan.render(array, max_rows)


def test_every_parameter_becomes_the_unnested_column_and_nothing_else_changes():
    sql = "select 'keep $1 here' as s, $1::int + 1 as n, $1, $1[1] as e -- a $1 comment\nfrom t where a = $1"
    out = merged(sql)
    assert "unnest($1::integer[]) WITH ORDINALITY AS subsys_p(\"?column?\", ord)" in out
    body = out.split("FROM (\n", 1)[1].rsplit("\n) AS", 1)[0]
    assert body == sql.replace("$1::int", '(subsys_p."?column?")::int').replace(", $1,", ', (subsys_p."?column?"),') \
        .replace("$1[1]", '(subsys_p."?column?")[1]').replace("a = $1", 'a = (subsys_p."?column?")')
    assert "'keep $1 here'" in out and "-- a $1 comment\n" in out, "strings and comments are not parameters"
    assert "LIMIT 11) AS subsys_f" in out  # max_rows + 1 per topic
    statement = pglast.parse_sql(out)[0].stmt
    assert isinstance(statement, ast.SelectStmt)


def test_an_unnamed_parameter_column_keeps_the_name_postgresql_gives_it():
    # SELECT $1 is a column called ?column?; so is SELECT (p."?column?"): same columns merged or not.
    out = merged("select $1, id from t where g = $1")
    target = pglast.parse_sql(out)[0].stmt.fromClause[0].rarg.subquery.fromClause[0].subquery.targetList[0].val
    assert [f.sval for f in target.fields] == ["subsys_p", "?column?"]


def test_names_never_collide_with_the_feed():
    out = merged("select subsys_p.a, subsys_rn, subsys_f1 from subsys_p, subsys_f where subsys_p.k = $1")
    assert "AS subsys_p1(" in out and "AS subsys_rn1 " in out and "AS subsys_f2" in out and "AS subsys_x " in out


def test_a_trailing_semicolon_and_comment_do_not_break_the_wrapping():
    out = merged("select id from t where g = $1; -- done")
    assert ";" not in out, "the statement's own text, without its terminator"
    assert len(pglast.parse_sql(out)) == 1 and isinstance(pglast.parse_sql(out)[0].stmt, ast.SelectStmt)


@pytest.mark.parametrize(
    "sql, why",
    [
        ("select from where $1", "does not parse"),
        ("select 1 where $1; select 2", "2 statements"),
        ("insert into t values ($1) returning *", "not a SELECT (INSERT)"),
        ("update t set a = 1 where b = $1 returning *", "not a SELECT (UPDATE)"),
        ("select * into z from t where a = $1", "SELECT INTO"),
        ("select * from t where a = $1 for update", "FOR UPDATE/SHARE"),
        ("select * from (select * from t where a = $1 for share) s", "FOR UPDATE/SHARE"),
        ("with d as (delete from t where a = $1 returning *) select * from d", "data-modifying WITH (DELETE)"),
        ("select count($1) from t", "aggregate count()"),
        ("select (select max($1::int) from u) as m from t", "aggregate max()"),
        ("select count(*) filter (where $1 > 0) from t", "aggregate count()"),
        ("select 'only $1 in a string'", "does not occur as a parameter"),
    ],
)
def test_what_cannot_be_merged_says_why(sql, why):
    plan = plan_feed(sql)
    assert isinstance(plan, Refusal) and why in plan.reason, plan


@pytest.mark.parametrize(
    "sql",
    [
        "select * from f($1)",
        "select id from t where g = $1 order by id limit $1",
        "with x as (select * from t where g = $1) select * from x",
        "select count(x) filter (where $1 > 0) as c from t",
        "select max(x + $1) as m from t",
        "select g, count(*) from t where g = $1 group by g",
        "select id from t where g = $1 union all select id from u where h = $1",
        "values ($1, 1)",
    ],
)
def test_what_can_be_merged(sql):
    assert isinstance(plan_feed(sql), MergeTemplate)


def test_raw_values_stand_for_their_encoding_only_where_equal_means_equal():
    import datetime as dt
    import decimal
    import uuid

    from subsys.node.database import encodes_as_compared

    assert encodes_as_compared([(1, "a", None, True, uuid.uuid4(), dt.date(2020, 1, 1), dt.datetime(2020, 1, 1))])
    for value in (decimal.Decimal("1.0"), 0.0, {"a": 1}, [1], dt.time(1, tzinfo=dt.timezone.utc), dt.timedelta(1)):
        assert not encodes_as_compared([(1, value)]), value
