"""Data-ID expressions: ``tract=42 AND band IN ('g','r') AND visit > 10``.

A small tokenizer and recursive-descent parser (no ``eval``) in the spirit of the LSST
Butler's ``daf_butler`` query language: identifiers are dimension names, literals are
strings (single or double quotes), integers, floats and booleans; operators are
``= != <> < <= > >=``, ``IN (...)``, ``NOT IN (...)``, ``AND``, ``OR``, ``NOT`` and
parentheses. Inside ``IN`` lists, inclusive integer ranges ``START..STOP[:STRIDE]`` are
accepted (as in daf_butler). Keywords are case-insensitive.

The parsed expression (an :class:`Expression`) can be

* evaluated on a plain data-ID ``dict`` (:meth:`Expression.evaluate`), with SQL's
  three-valued logic so that a key missing from the dict behaves like a NULL column, and
* compiled to a SQLAlchemy boolean clause (:meth:`Expression.to_sql`) given a function that
  maps identifier names to column expressions.

Grammar::

    expr      := or_expr
    or_expr   := and_expr ( OR and_expr )*
    and_expr  := not_expr ( AND not_expr )*
    not_expr  := NOT not_expr | predicate
    predicate := '(' expr ')'
               | operand [ compop operand | [NOT] IN '(' item (',' item)* ')' ]
    operand   := IDENT | literal
    item      := literal | INT '..' INT [':' INT]
    literal   := STRING | ['-'] NUMBER | TRUE | FALSE

Every syntax error raises :class:`procsky.errors.QuerySyntaxError` with the 0-based
character position of the offending token. A name that is no dimension of the data searched
(``vist=1``) is not a syntax error, but it would silently match nothing (or everything under
``NOT``): :func:`check_identifiers` refuses it with a "did you mean" hint, given the names
the caller knows.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from procsky.errors import ProcskyValueError, QuerySyntaxError

__all__ = [
    "Expression",
    "check_identifiers",
    "parse_expression",
    "STANDARD_DIMENSION_TYPES",
    "Token",
    "data_id_matches",
    "tokenize",
]

#: Python type of each standard dimension value; used to reject ``visit='abc'`` early.
STANDARD_DIMENSION_TYPES: dict[str, type] = {
    "instrument": str,
    "physical_filter": str,
    "band": str,
    "detector": int,
    "visit": int,
    "skymap": str,
    "tract": int,
    "patch": int,
}

_KEYWORDS = {"AND", "OR", "NOT", "IN", "TRUE", "FALSE"}

# Order matters: two-character operators before their one-character prefixes.
_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<number>(?:\d+(?:\.(?!\.)\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|!=|<>|==|=|<|>)
  | (?P<range>\.\.)
  | (?P<punct>[(),:\-])
  | (?P<quote>['"])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Token:
    """One lexical token: ``kind`` is IDENT, KEYWORD, NUMBER, STRING, OP, RANGE, PUNCT or EOF."""

    kind: str
    value: Any
    pos: int
    text: str


def tokenize(expression: str) -> list[Token]:
    """Split a data-ID expression into tokens.

    Parameters
    ----------
    expression : str
        The expression text.

    Returns
    -------
    tokens : list of Token
        The tokens, ending with an ``EOF`` token positioned at the end of the text.

    Raises
    ------
    QuerySyntaxError
        On an unterminated string or a character that starts no token.
    """
    tokens: list[Token] = []
    pos = 0
    n = len(expression)
    while pos < n:
        m = _TOKEN_RE.match(expression, pos)
        if m is None:
            raise QuerySyntaxError(
                f"unexpected character {expression[pos]!r} at position {pos}; expressions "
                "use dimension names, literals, = != < <= > >=, IN (...), AND, OR, NOT "
                "and parentheses",
                expression,
                pos,
            )
        kind = m.lastgroup
        text = m.group(0)
        if kind == "ws":
            pos = m.end()
            continue
        if kind == "quote":
            string, end = _read_string(expression, pos)
            tokens.append(Token("STRING", string, pos, expression[pos:end]))
            pos = end
            continue
        if kind == "number":
            if re.fullmatch(r"\d+", text):
                value: Any = int(text)
            else:
                value = float(text)
            tokens.append(Token("NUMBER", value, pos, text))
        elif kind == "ident":
            upper = text.upper()
            if upper in _KEYWORDS:
                tokens.append(Token("KEYWORD", upper, pos, text))
            else:
                tokens.append(Token("IDENT", text, pos, text))
        elif kind == "op":
            op = {"==": "=", "<>": "!="}.get(text, text)
            tokens.append(Token("OP", op, pos, text))
        elif kind == "range":
            tokens.append(Token("RANGE", "..", pos, text))
        else:
            tokens.append(Token("PUNCT", text, pos, text))
        pos = m.end()
    tokens.append(Token("EOF", None, n, ""))
    return tokens


def _read_string(expression: str, start: int) -> tuple[str, int]:
    """Read a quoted string starting at ``start``; a doubled quote or ``\\'`` escapes it."""
    quote = expression[start]
    out: list[str] = []
    i = start + 1
    n = len(expression)
    while i < n:
        c = expression[i]
        if c == "\\" and i + 1 < n:
            out.append(expression[i + 1])
            i += 2
            continue
        if c == quote:
            if i + 1 < n and expression[i + 1] == quote:
                out.append(quote)
                i += 2
                continue
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise QuerySyntaxError(
        f"unterminated string starting at position {start}; close it with {quote}",
        expression,
        start,
    )


# --------------------------------------------------------------------------------------
# AST
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ident:
    name: str
    pos: int


@dataclass(frozen=True)
class Literal:
    value: Any
    pos: int


@dataclass(frozen=True)
class Range:
    """Inclusive integer range ``start..stop:stride`` (only inside ``IN`` lists)."""

    start: int
    stop: int
    stride: int
    pos: int

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value != int(value):
            return False
        value = int(value)
        return self.start <= value <= self.stop and (value - self.start) % self.stride == 0


@dataclass(frozen=True)
class Compare:
    op: str
    left: Ident | Literal
    right: Ident | Literal
    pos: int


@dataclass(frozen=True)
class InList:
    operand: Ident | Literal
    items: tuple[Literal | Range, ...]
    negated: bool
    pos: int


@dataclass(frozen=True)
class Not:
    term: Any
    pos: int


@dataclass(frozen=True)
class And:
    terms: tuple[Any, ...]


@dataclass(frozen=True)
class Or:
    terms: tuple[Any, ...]


_PY_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}

# ``x op y`` is the same as ``y flipped(op) x``.
_FLIP = {"=": "=", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


class _Parser:
    def __init__(self, expression: str):
        self.expression = expression
        self.tokens = tokenize(expression)
        self.i = 0

    # -- helpers ---------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def advance(self) -> Token:
        tok = self.tokens[self.i]
        if tok.kind != "EOF":
            self.i += 1
        return tok

    def is_keyword(self, word: str) -> bool:
        return self.tok.kind == "KEYWORD" and self.tok.value == word

    def is_punct(self, char: str) -> bool:
        return self.tok.kind == "PUNCT" and self.tok.value == char

    def error(self, message: str, tok: Token | None = None) -> QuerySyntaxError:
        tok = tok or self.tok
        found = "end of expression" if tok.kind == "EOF" else repr(tok.text)
        return QuerySyntaxError(f"{message}, found {found} at position {tok.pos}", self.expression, tok.pos)

    # -- grammar ---------------------------------------------------------------------
    def parse(self):
        if self.tok.kind == "EOF":
            raise QuerySyntaxError(
                'empty expression; give e.g. "visit=12 AND detector IN (1, 2)"',
                self.expression,
                0,
            )
        node = self.or_expr()
        if self.tok.kind != "EOF":
            raise self.error("expected AND, OR or the end of the expression")
        return node

    def or_expr(self):
        terms = [self.and_expr()]
        while self.is_keyword("OR"):
            self.advance()
            terms.append(self.and_expr())
        return terms[0] if len(terms) == 1 else Or(tuple(terms))

    def and_expr(self):
        terms = [self.not_expr()]
        while self.is_keyword("AND"):
            self.advance()
            terms.append(self.not_expr())
        return terms[0] if len(terms) == 1 else And(tuple(terms))

    def not_expr(self):
        if self.is_keyword("NOT"):
            tok = self.advance()
            return Not(self.not_expr(), tok.pos)
        return self.predicate()

    def predicate(self):
        if self.is_punct("("):
            open_tok = self.advance()
            if self.is_punct(")"):
                raise self.error("expected an expression inside the parentheses")
            node = self.or_expr()
            if not self.is_punct(")"):
                raise self.error(f"expected ')' to close the '(' at position {open_tok.pos}")
            self.advance()
            return node
        left = self.operand()
        tok = self.tok
        if tok.kind == "OP":
            self.advance()
            right = self.operand()
            return Compare(tok.value, left, right, tok.pos)
        if self.is_keyword("IN") or (
            self.is_keyword("NOT")
            and self.tokens[self.i + 1].kind == "KEYWORD"
            and self.tokens[self.i + 1].value == "IN"
        ):
            negated = self.is_keyword("NOT")
            if negated:
                self.advance()
            self.advance()  # IN
            return InList(left, self.in_items(), negated, tok.pos)
        if isinstance(left, Literal) and isinstance(left.value, bool):
            return left
        what = f"'{left.name}'" if isinstance(left, Ident) else "a literal"
        raise self.error(f"expected a comparison (= != < <= > >=) or IN after {what}")

    def operand(self):
        tok = self.tok
        if tok.kind == "IDENT":
            self.advance()
            return Ident(tok.value, tok.pos)
        return self.literal("expected a dimension name or a literal")

    def literal(self, message: str) -> Literal:
        tok = self.tok
        if tok.kind == "STRING" or tok.kind == "NUMBER":
            self.advance()
            return Literal(tok.value, tok.pos)
        if tok.kind == "KEYWORD" and tok.value in ("TRUE", "FALSE"):
            self.advance()
            return Literal(tok.value == "TRUE", tok.pos)
        if self.is_punct("-"):
            self.advance()
            if self.tok.kind != "NUMBER":
                raise self.error("expected a number after '-'")
            num = self.advance()
            return Literal(-num.value, tok.pos)
        raise self.error(message)

    def in_items(self) -> tuple[Literal | Range, ...]:
        if not self.is_punct("("):
            raise self.error("expected '(' after IN")
        self.advance()
        if self.is_punct(")"):
            raise self.error("expected at least one value in the IN list")
        items: list[Literal | Range] = []
        while True:
            lit = self.literal("expected a literal value in the IN list")
            if self.tok.kind == "RANGE":
                items.append(self.range_rest(lit))
            else:
                items.append(lit)
            if self.is_punct(","):
                self.advance()
                continue
            if self.is_punct(")"):
                self.advance()
                return tuple(items)
            raise self.error("expected ',' or ')' in the IN list")

    def range_rest(self, start: Literal) -> Range:
        if not _is_int(start.value):
            raise QuerySyntaxError(
                f"a range START..STOP needs integer bounds; got {start.value!r}",
                self.expression,
                start.pos,
            )
        self.advance()  # ..
        stop = self.literal("expected an integer after '..'")
        if not _is_int(stop.value):
            raise QuerySyntaxError(
                f"a range START..STOP needs integer bounds; got {stop.value!r}",
                self.expression,
                stop.pos,
            )
        stride = 1
        if self.is_punct(":"):
            self.advance()
            s = self.literal("expected an integer stride after ':'")
            if not _is_int(s.value) or s.value < 1:
                raise QuerySyntaxError(
                    f"a range stride must be a positive integer; got {s.value!r}",
                    self.expression,
                    s.pos,
                )
            stride = s.value
        return Range(start.value, stop.value, stride, start.pos)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _literal_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "string"


@dataclass
class Expression:
    """A parsed data-ID expression.

    Build with :func:`parse_expression`. ``identifiers`` lists the dimension names used.
    """

    text: str
    ast: Any
    identifiers: frozenset[str] = field(default_factory=frozenset)

    # -- Python evaluation ------------------------------------------------------------
    def evaluate(self, data_id: Mapping[str, Any]) -> bool:
        """Whether ``data_id`` satisfies the expression.

        A name missing from ``data_id`` is unknown (SQL NULL): a comparison with it is
        unknown, and an unknown result does not match (as in a SQL ``WHERE``).
        """
        return _eval(self.ast, data_id) is True

    # -- SQL --------------------------------------------------------------------------
    def to_sql(self, resolve: Callable[[str, tuple[Any, ...], int], Any]):
        """Compile to a SQLAlchemy boolean clause.

        Parameters
        ----------
        resolve : callable
            ``resolve(name, values, pos)`` returns the column expression for identifier
            ``name``; ``values`` are the literals it is compared with (to choose a typed
            JSON accessor) and ``pos`` its position for error messages (raise
            :class:`QuerySyntaxError` for an unknown name).
        """
        return _to_sql(self.ast, resolve)


def parse_expression(expression: str, dimension_types: Mapping[str, type] | None = None) -> Expression:
    """Parse a data-ID expression.

    Parameters
    ----------
    expression : str
        E.g. ``"tract=42 AND band IN ('g','r') AND visit > 10"``.
    dimension_types : mapping of str to type, optional
        Python type (``int`` or ``str``) of known dimensions, to reject e.g.
        ``visit='12'`` with a pointed message. Defaults to
        :data:`STANDARD_DIMENSION_TYPES`.

    Returns
    -------
    Expression

    Raises
    ------
    QuerySyntaxError
        With ``position`` at the offending token.
    """
    if not isinstance(expression, str):
        raise QuerySyntaxError(f"a data-ID expression must be a string, got {type(expression).__name__}")
    ast = _Parser(expression).parse()
    types = STANDARD_DIMENSION_TYPES if dimension_types is None else dimension_types
    names: set[str] = set()
    _check(ast, expression, types, names)
    return Expression(expression, ast, frozenset(names))


def check_identifiers(
    expression: Expression,
    known: Iterable[str],
    *,
    label: str = "where expression",
    scope: str = "the datasets searched",
) -> None:
    """Refuse identifiers of ``expression`` that are not in ``known`` (``vist=1``).

    A name absent from every data ID makes each comparison with it unknown (SQL NULL), so
    the expression would silently select nothing, or everything under ``NOT``. This is the
    one check of that rule: the registry query and the pipeline's ``--where`` both use it.

    Parameters
    ----------
    expression : Expression
        The parsed expression.
    known : iterable of str
        The dimension (or column) names the expression may use.
    label : str
        How the caller's user gave the expression (``"--where"`` on the command line).
    scope : str
        What ``known`` describes, for the message (``"this pipeline"``).

    Raises
    ------
    ProcskyValueError
        Naming each unknown identifier with the closest known name (difflib) and listing
        the known names.
    """
    known = sorted(set(known))
    unknown = sorted(set(expression.identifiers) - set(known))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    verb = "is not a dimension" if len(unknown) == 1 else "are not dimensions"
    raise ProcskyValueError(
        f"{label} {expression.text!r} names {', '.join(hints)}, which {verb} of {scope}; "
        f"known dimensions: {', '.join(known)}."
    )


def _check(node, expression: str, types: Mapping[str, type], names: set[str]) -> None:
    """Collect identifiers and reject comparisons of a typed dimension with the wrong kind."""

    def check_pair(ident: Ident, lit: Literal | Range) -> None:
        want = types.get(ident.name)
        if want is None:
            return
        if isinstance(lit, Range):
            if want is not int:
                raise QuerySyntaxError(
                    f"{ident.name} takes strings; an integer range cannot match it",
                    expression,
                    lit.pos,
                )
            return
        value = lit.value
        if want is int and not _is_int(value):
            hint = f"; write {ident.name}={value}" if isinstance(value, str) and value.isdigit() else ""
            raise QuerySyntaxError(
                f"{ident.name} is an integer dimension, got the {_literal_kind(value)} {value!r}{hint}",
                expression,
                lit.pos,
            )
        if want is str and not isinstance(value, str):
            raise QuerySyntaxError(
                f"{ident.name} is a string dimension, got the {_literal_kind(value)} "
                f"{value!r}; quote it: {ident.name}='{value}'",
                expression,
                lit.pos,
            )

    if isinstance(node, (And, Or)):
        for t in node.terms:
            _check(t, expression, types, names)
    elif isinstance(node, Not):
        _check(node.term, expression, types, names)
    elif isinstance(node, Compare):
        for side in (node.left, node.right):
            if isinstance(side, Ident):
                names.add(side.name)
        if isinstance(node.left, Ident) and isinstance(node.right, Literal):
            check_pair(node.left, node.right)
        elif isinstance(node.right, Ident) and isinstance(node.left, Literal):
            check_pair(node.right, node.left)
    elif isinstance(node, InList):
        if isinstance(node.operand, Ident):
            names.add(node.operand.name)
            for item in node.items:
                check_pair(node.operand, item)


# --------------------------------------------------------------------------------------
# Python evaluation with three-valued logic (None = unknown)
# --------------------------------------------------------------------------------------

_MISSING = object()


def _value(operand, data_id: Mapping[str, Any]):
    if isinstance(operand, Literal):
        return operand.value
    value = data_id.get(operand.name, _MISSING)
    if value is None:
        return _MISSING
    return value


def _comparable(a: Any, b: Any) -> bool:
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num):
        return True
    return type(a) is type(b) or (isinstance(a, str) and isinstance(b, str))


def _eval(node, data_id: Mapping[str, Any]) -> bool | None:
    if isinstance(node, Literal):
        return bool(node.value)
    if isinstance(node, Compare):
        a = _value(node.left, data_id)
        b = _value(node.right, data_id)
        if a is _MISSING or b is _MISSING:
            return None
        a, b = _plain(a), _plain(b)
        if not _comparable(a, b):
            if node.op == "=":
                return False
            if node.op == "!=":
                return True
            return None
        return bool(_PY_OPS[node.op](a, b))
    if isinstance(node, InList):
        a = _value(node.operand, data_id)
        if a is _MISSING:
            return None
        a = _plain(a)
        hit = False
        for item in node.items:
            if isinstance(item, Range):
                if item.contains(a):
                    hit = True
                    break
            elif _comparable(a, item.value) and a == item.value:
                hit = True
                break
        return (not hit) if node.negated else hit
    if isinstance(node, Not):
        v = _eval(node.term, data_id)
        return None if v is None else not v
    if isinstance(node, And):
        result: bool | None = True
        for t in node.terms:
            v = _eval(t, data_id)
            if v is False:
                return False
            if v is None:
                result = None
        return result
    if isinstance(node, Or):
        result = False
        for t in node.terms:
            v = _eval(t, data_id)
            if v is True:
                return True
            if v is None:
                result = None
        return result
    raise TypeError(f"unknown expression node {node!r}")  # pragma: no cover


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars (data IDs built from arrays carry them)."""
    item = getattr(value, "item", None)
    if item is not None and not isinstance(value, (str, bytes)):
        try:
            return item()
        except (TypeError, ValueError):
            return value
    return value


# --------------------------------------------------------------------------------------
# SQL compilation
# --------------------------------------------------------------------------------------


def _to_sql(node, resolve):
    import sqlalchemy as sa

    def operand_sql(operand, other_values: tuple[Any, ...]):
        if isinstance(operand, Literal):
            return sa.literal(operand.value)
        return resolve(operand.name, other_values, operand.pos)

    if isinstance(node, Literal):
        return sa.true() if node.value else sa.false()
    if isinstance(node, Compare):
        left_vals = (node.right.value,) if isinstance(node.right, Literal) else ()
        right_vals = (node.left.value,) if isinstance(node.left, Literal) else ()
        if isinstance(node.left, Literal) and isinstance(node.right, Ident):
            # Put the column on the left so that bind parameters take its type.
            col = operand_sql(node.right, right_vals)
            return _PY_OPS[_FLIP[node.op]](col, node.left.value)
        left = operand_sql(node.left, left_vals)
        if isinstance(node.right, Literal):
            return _PY_OPS[node.op](left, node.right.value)
        return _PY_OPS[node.op](left, operand_sql(node.right, right_vals))
    if isinstance(node, InList):
        values = tuple(i.value for i in node.items if isinstance(i, Literal))
        has_range = any(isinstance(i, Range) for i in node.items)
        col = operand_sql(node.operand, values + ((0,) if has_range else ()))
        clauses = []
        if values:
            clauses.append(col.in_(list(values)))
        for item in node.items:
            if isinstance(item, Range):
                rng = sa.and_(col >= item.start, col <= item.stop)
                if item.stride > 1:
                    rng = sa.and_(rng, (col - item.start) % item.stride == 0)
                clauses.append(rng)
        clause = clauses[0] if len(clauses) == 1 else sa.or_(*clauses)
        return sa.not_(clause) if node.negated else clause
    if isinstance(node, Not):
        return sa.not_(_to_sql(node.term, resolve))
    if isinstance(node, And):
        return sa.and_(*(_to_sql(t, resolve) for t in node.terms))
    if isinstance(node, Or):
        return sa.or_(*(_to_sql(t, resolve) for t in node.terms))
    raise TypeError(f"unknown expression node {node!r}")  # pragma: no cover


def data_id_matches(where: str | Expression | None, data_id: Mapping[str, Any]) -> bool:
    """Whether ``data_id`` satisfies ``where`` (``None`` matches everything)."""
    if where is None:
        return True
    expr = where if isinstance(where, Expression) else parse_expression(where)
    return expr.evaluate(data_id)
