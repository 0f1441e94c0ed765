"""The data-ID expression parser: tokens, precedence, errors with positions, Python
evaluation and SQL compilation (checked against each other on random data IDs)."""

from __future__ import annotations

import random

import pytest
import sqlalchemy as sa

from procsky.errors import ProcskyValueError, QuerySyntaxError
from procsky.repo.query import And, Compare, InList, Not, Or, parse_expression, tokenize


def test_tokenize_kinds_and_positions():
    toks = tokenize("tract=42 AND band IN ('g',\"r\") and visit >= -1.5e2")
    kinds = [(t.kind, t.value, t.pos) for t in toks]
    assert kinds[:4] == [("IDENT", "tract", 0), ("OP", "=", 5), ("NUMBER", 42, 6), ("KEYWORD", "AND", 9)]
    assert ("STRING", "g", 22) in kinds and ("STRING", "r", 26) in kinds
    assert ("KEYWORD", "AND", 31) in kinds  # keywords are case-insensitive
    assert kinds[-1] == ("EOF", None, len("tract=42 AND band IN ('g',\"r\") and visit >= -1.5e2"))
    assert tokenize("a <> 1")[1].value == "!=" and tokenize("a == 1")[1].value == "="
    assert tokenize("x = 'it''s'")[2].value == "it's"
    assert tokenize("1..5")[1].kind == "RANGE"


def test_precedence_and_structure():
    e = parse_expression("a=1 OR b=2 AND NOT c=3")
    assert isinstance(e.ast, Or)
    assert isinstance(e.ast.terms[1], And)
    assert isinstance(e.ast.terms[1].terms[1], Not)
    e = parse_expression("(a=1 OR b=2) AND c=3")
    assert isinstance(e.ast, And) and isinstance(e.ast.terms[0], Or)
    e = parse_expression("visit NOT IN (1, 2)")
    assert isinstance(e.ast, InList) and e.ast.negated
    e = parse_expression("10 < visit")
    assert isinstance(e.ast, Compare) and e.ast.op == "<"
    assert parse_expression("tract=42 AND band IN ('g','r') AND visit > 10").identifiers == {"tract", "band", "visit"}


@pytest.mark.parametrize(
    "expr, data_id, expected",
    [
        ("tract=42 AND band IN ('g','r') AND visit > 10", {"tract": 42, "band": "r", "visit": 11}, True),
        ("tract=42 AND band IN ('g','r') AND visit > 10", {"tract": 42, "band": "i", "visit": 11}, False),
        ("tract=42 AND band IN ('g','r') AND visit > 10", {"tract": 42, "band": "g", "visit": 10}, False),
        ("NOT (visit = 3)", {"visit": 4}, True),
        ("visit != 3", {"visit": 3}, False),
        ("visit <= 3 OR detector >= 10", {"visit": 5, "detector": 10}, True),
        ("band NOT IN ('g', \"r\")", {"band": "z"}, True),
        ("visit IN (1..9:2)", {"visit": 7}, True),
        ("visit IN (1..9:2)", {"visit": 8}, False),
        ("visit IN (20, 1..3)", {"visit": 20}, True),
        ("seeing < 0.8", {"seeing": 0.75}, True),
        ("flag = TRUE", {"flag": True}, True),
        ("flag = false", {"flag": True}, False),
        ("TRUE", {}, True),
        ("visit > -5", {"visit": -4}, True),
        # A key missing from the data ID is unknown, as a NULL column: never matches,
        # not even under NOT.
        ("tract = 1", {"visit": 1}, False),
        ("NOT tract = 1", {"visit": 1}, False),
        ("tract = 1 OR visit = 1", {"visit": 1}, True),
    ],
)
def test_evaluate(expr, data_id, expected):
    assert parse_expression(expr).evaluate(data_id) is expected


@pytest.mark.parametrize(
    "expr, position, words",
    [
        ("visit >", 7, "expected a dimension name or a literal"),
        ("visit = 12 AND", 14, "expected a dimension name"),
        ("visit 12", 6, "expected a comparison"),
        ("(visit = 1", 10, "expected ')'"),
        ("visit = 1)", 9, "expected AND, OR"),
        ("band IN 'g'", 8, "expected '(' after IN"),
        ("band IN ()", 9, "at least one value"),
        ("band IN ('g' 'r')", 13, "expected ',' or ')'"),
        ("band = 'g", 7, "unterminated string"),
        ("visit = 3 & detector = 1", 10, "unexpected character"),
        ("visit = 'abc'", 8, "integer dimension"),
        ("band = 3", 7, "string dimension"),
        ("visit IN (1.5..3)", 10, "integer bounds"),
        ("visit IN (1..3:0)", 15, "stride"),
        ("   ", 0, "empty expression"),
        ("visit = = 3", 8, "expected a dimension name or a literal"),
        ("AND visit = 3", 0, "expected a dimension name or a literal"),
    ],
)
def test_syntax_errors_point_at_the_token(expr, position, words):
    with pytest.raises(QuerySyntaxError) as info:
        parse_expression(expr)
    err = info.value
    assert err.position == position, str(err)
    assert err.expression == expr
    assert words in err.message
    # The caret sits under the offending character in str().
    lines = str(err).splitlines()
    assert lines[-1].index("^") - 2 == position
    assert isinstance(err, ProcskyValueError) and isinstance(err, ValueError)


def test_error_pickles():
    import pickle

    with pytest.raises(QuerySyntaxError) as info:
        parse_expression("visit >")
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.position == 7 and copy.expression == "visit >"


def _sql_table():
    md = sa.MetaData()
    t = sa.Table(
        "d",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("visit", sa.Integer),
        sa.Column("detector", sa.Integer),
        sa.Column("band", sa.String),
        sa.Column("tract", sa.Integer),
        sa.Column("data_id", sa.JSON),
    )
    return md, t


def test_sql_agrees_with_python_on_random_data_ids():
    """Every expression selects in SQLite exactly the data IDs it matches in Python."""
    md, t = _sql_table()
    engine = sa.create_engine("sqlite://")
    md.create_all(engine)
    rng = random.Random(3)
    rows = []
    for i in range(300):
        d = {}
        for key, values in (
            ("visit", range(0, 20)),
            ("detector", range(0, 5)),
            ("band", ["g", "r", "i"]),
            ("tract", [0, 1]),
        ):
            if rng.random() < 0.85:  # some keys missing (NULL)
                d[key] = rng.choice(list(values))
        d["seeing"] = round(rng.uniform(0.5, 1.2), 3)
        rows.append({"id": i, **{k: d.get(k) for k in ("visit", "detector", "band", "tract")}, "data_id": d})
    with engine.begin() as conn:
        conn.execute(sa.insert(t), rows)
    exprs = [
        "visit > 10",
        "tract=1 AND band IN ('g','r') AND visit > 10",
        "NOT band = 'g'",
        "band NOT IN ('g', 'i') OR detector = 0",
        "visit IN (1..15:3, 19) AND NOT (detector >= 2 AND detector <= 3)",
        "seeing < 0.8 AND visit != 4",
        "10 >= visit",
        "(visit < 5 OR visit > 15) AND (band = 'r' OR tract = 0)",
        "TRUE AND NOT FALSE AND detector IN (1, 3)",
    ]

    def resolve(name, values, pos):
        if name in t.c:
            return t.c[name]
        elem = t.c.data_id[name]
        return elem.as_float() if any(isinstance(v, float) for v in values) else elem.as_string()

    for text in exprs:
        e = parse_expression(text)
        with engine.connect() as conn:
            got = {r[0] for r in conn.execute(sa.select(t.c.id).where(e.to_sql(resolve)))}
        want = {r["id"] for r in rows if e.evaluate(r["data_id"])}
        assert got == want, text
        assert 0 < len(want) < len(rows), f"{text} selects all or nothing: a weak case"
