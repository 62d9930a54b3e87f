"""Exact, bounded parsing of a model's answer into a polynomial in ``x``; no eval anywhere.

A model's answer such as ``3x^2 + 9x + 6`` or ``-59`` is read by a hand-written tokenizer and a
recursive-descent parser into a polynomial with exact rational coefficients, as a dict
power -> ``Fraction`` with zero coefficients left out (the zero polynomial is ``{}``):

    >>> parse_polynomial("3x^2 + 9x + 6") == {2: 3, 1: 9, 0: 6}
    True

Numbers are constant polynomials, so ``-59``, ``- 59`` and ``-59.0`` are equal, and so are
``3x^2+9x+6``, ``3*x**2 + 9*x + 6`` and ``6+9x+3x²``.

Accepted notation: integers and decimals (``2.5``, ``.5``; no exponent notation such as ``1e3``), the
variable ``x``, unary ``+``/``-``, binary ``+ - * /``, parentheses, powers with ``^``, ``**`` or
superscript digits (``x²``), implicit multiplication before ``x`` or ``(`` (``3x``, ``3(x+1)``,
``(x+1)(x+2)``, ``2x^2``), any whitespace, the minus signs ``−`` and ``–``, and the multiplication
signs ``·``, ``⋅``, ``×`` (``÷`` divides). Anything else, such as other letters, ``=``, ``$`` or a
trailing ``.``, makes the text invalid: only a bare expression is an answer.

Grammar (implicit multiplication has the precedence of ``*`` and groups left to right, so ``1/2x`` is
``x/2``; unary minus binds looser than a power, so ``-x^2`` is ``-(x^2)``):

    expr     := term (("+" | "-") term)*
    term     := unary (("*" | "/") unary | power)*      # the bare power: implicit product, before x or (
    unary    := ("+" | "-") unary | power
    power    := atom ("^" exponent)?                     # no towers: x^2^3 is invalid
    exponent := INTEGER | "(" INTEGER ")"
    atom     := NUMBER | "x" | "(" expr ")"

Division is by a nonzero constant only. Every resource is bounded, so no text can hang the parser or
exhaust memory: at most ``MAX_CHARS`` characters and ``MAX_TOKENS`` tokens, ``MAX_DEPTH`` nested
parentheses and unary signs, exponents up to ``MAX_EXPONENT``, degree up to ``MAX_DEGREE`` (checked
before multiplying), and every coefficient's numerator and denominator within ``MAX_COEF_BITS`` bits
(checked after each operation). The worst case costs a few milliseconds.
"""
from __future__ import annotations

from fractions import Fraction

MAX_CHARS = 200
MAX_TOKENS = 150
MAX_DEPTH = 32
MAX_EXPONENT = 8
MAX_DEGREE = 16
MAX_COEF_BITS = 256

Poly = dict  # power (int >= 0) -> nonzero Fraction coefficient

_DIGITS = "0123456789"
# Characters models write for the ASCII operators.
_ALIASES = {"\u2212": "-", "\u2013": "-", "\u00b7": "*", "\u22c5": "*", "\u00d7": "*", "\u2217": "*",
            "\u00f7": "/"}
_SUPERSCRIPTS = {ch: d for d, ch in enumerate("\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")}


class ParseError(ValueError):
    """The text is not an expression this module accepts, or it exceeds one of the bounds."""


# ----------------------------------------------------------------------------- tokens
# A token is (kind, value): kind is "num" (value: (Fraction, written as an integer?)), "x", or one of
# the operators "+ - * / ^ ( )" (value None).
def _number(text: str, i: int) -> tuple[tuple[str, tuple[Fraction, bool]], int]:
    """The number starting at text[i] (a digit, or '.' followed by a digit) and the index after it."""
    j = i
    while j < len(text) and text[j] in _DIGITS:
        j += 1
    whole, frac = text[i:j], ""
    if j < len(text) and text[j] == ".":
        k = j + 1
        while k < len(text) and text[k] in _DIGITS:
            k += 1
        frac = text[j + 1:k]
        if not frac:
            raise ParseError(f"number {text[i:k]!r} ends with '.'")
        j = k
    scale = 10 ** len(frac)
    value = Fraction(int(whole or "0") * scale + int(frac or "0"), scale)
    _check_coefficient(value)
    return ("num", (value, not frac)), j


def _tokenize(text: str) -> list[tuple[str, object]]:
    tokens: list[tuple[str, object]] = []
    i, n = 0, len(text)
    while i < n:
        ch = _ALIASES.get(text[i], text[i])
        if ch.isspace():
            i += 1
            continue
        if ch in _DIGITS or (ch == "." and i + 1 < n and text[i + 1] in _DIGITS):
            token, i = _number(text, i)
            tokens.append(token)
        elif ch in _SUPERSCRIPTS:  # x² -> x ^ 2
            power = 0
            while i < n and text[i] in _SUPERSCRIPTS:
                power = 10 * power + _SUPERSCRIPTS[text[i]]
                i += 1
            tokens += [("^", None), ("num", (Fraction(power), True))]
        elif ch == "*" and text[i:i + 2] == "**":
            tokens.append(("^", None))
            i += 2
        elif ch in "+-*/^()x":
            tokens.append((ch, None))
            i += 1
        else:
            raise ParseError(f"unexpected character {ch!r} at position {i}")
        if len(tokens) > MAX_TOKENS:
            raise ParseError(f"more than {MAX_TOKENS} tokens")
    return tokens


# ----------------------------------------------------------------------------- arithmetic
def _check_coefficient(c: Fraction) -> None:
    if c.numerator.bit_length() > MAX_COEF_BITS or c.denominator.bit_length() > MAX_COEF_BITS:
        raise ParseError(f"a coefficient needs more than {MAX_COEF_BITS} bits")


def _checked(p: Poly) -> Poly:
    for c in p.values():
        _check_coefficient(c)
    return p


def _degree(p: Poly) -> int:
    return max(p) if p else 0


def _add(p: Poly, q: Poly) -> Poly:
    out = dict(p)
    for k, c in q.items():
        s = out.get(k, 0) + c
        if s:
            out[k] = s
        else:
            out.pop(k, None)
    return _checked(out)


def _neg(p: Poly) -> Poly:
    return {k: -c for k, c in p.items()}


def _mul(p: Poly, q: Poly) -> Poly:
    if _degree(p) + _degree(q) > MAX_DEGREE:
        raise ParseError(f"degree above {MAX_DEGREE}")
    out: Poly = {}
    for i, a in p.items():
        for j, b in q.items():
            out[i + j] = out.get(i + j, 0) + a * b
    return _checked({k: c for k, c in out.items() if c})


def _div(p: Poly, q: Poly) -> Poly:
    if any(k != 0 for k in q):
        raise ParseError("division by an expression in x; only division by a constant is allowed")
    if not q:
        raise ParseError("division by zero")
    return _checked({k: c / q[0] for k, c in p.items()})


def _pow(p: Poly, e: int) -> Poly:
    if _degree(p) * e > MAX_DEGREE:
        raise ParseError(f"degree above {MAX_DEGREE}")
    out: Poly = {0: Fraction(1)}
    for _ in range(e):  # e <= MAX_EXPONENT; each step is bounds-checked, so big bases stop early
        out = _mul(out, p)
    return out


# ----------------------------------------------------------------------------- parser
class _Parser:
    """Recursive descent over the token list; see the grammar in the module docstring."""

    def __init__(self, tokens: list[tuple[str, object]]):
        self.tokens, self.pos, self.depth = tokens, 0, 0

    def peek(self) -> str:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else "end"

    def take(self) -> tuple[str, object]:
        if self.pos >= len(self.tokens):
            raise ParseError("unexpected end of the expression")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def expect(self, kind: str) -> None:
        if self.take()[0] != kind:
            raise ParseError(f"expected {kind!r} at token {self.pos}")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError(f"nested deeper than {MAX_DEPTH}")

    def parse(self) -> Poly:
        if not self.tokens:
            raise ParseError("empty expression")
        p = self.expr()
        if self.pos != len(self.tokens):
            raise ParseError(f"unexpected {self.peek()!r} after a complete expression")
        return p

    def expr(self) -> Poly:
        p = self.term()
        while self.peek() in ("+", "-"):
            q = self.term() if self.take()[0] == "+" else _neg(self.term())
            p = _add(p, q)
        return p

    def term(self) -> Poly:
        p = self.unary()
        while True:
            kind = self.peek()
            if kind == "*":
                self.take()
                p = _mul(p, self.unary())
            elif kind == "/":
                self.take()
                p = _div(p, self.unary())
            elif kind in ("x", "("):  # implicit multiplication: 3x, 3(x+1), (x+1)(x+2)
                p = _mul(p, self.power())
            else:
                return p

    def unary(self) -> Poly:
        if self.peek() not in ("+", "-"):
            return self.power()
        sign = self.take()[0]
        self.enter()
        p = self.unary()
        self.depth -= 1
        return _neg(p) if sign == "-" else p

    def power(self) -> Poly:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        return _pow(base, self.exponent())

    def exponent(self) -> int:
        bracketed = self.peek() == "("
        if bracketed:
            self.take()
        kind, value = self.take()
        if kind != "num" or not value[1]:
            raise ParseError("an exponent must be a non-negative integer")
        if value[0] > MAX_EXPONENT:
            raise ParseError(f"exponent above {MAX_EXPONENT}")
        if bracketed:
            self.expect(")")
        return int(value[0])

    def atom(self) -> Poly:
        kind, value = self.take()
        if kind == "num":
            return {0: value[0]} if value[0] else {}
        if kind == "x":
            return {1: Fraction(1)}
        if kind == "(":
            self.enter()
            p = self.expr()
            self.expect(")")
            self.depth -= 1
            return p
        raise ParseError(f"expected a number, 'x' or '(' at token {self.pos}, found {kind!r}")


# ----------------------------------------------------------------------------- public API
def parse(text: str) -> Poly:
    """The polynomial written in ``text``, as {power: Fraction}; raises ParseError when invalid.

    ``parse_polynomial`` is the same without the exception; this form says why a text is rejected.
    """
    if not isinstance(text, str):
        raise ParseError(f"expected a string, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise ParseError(f"longer than {MAX_CHARS} characters")
    return _Parser(_tokenize(text)).parse()


def parse_polynomial(text: str) -> Poly | None:
    """The polynomial in ``text`` as {power: Fraction} (no zero coefficients), or None if invalid."""
    try:
        return parse(text)
    except ParseError:
        return None


def is_simplified(text: str) -> bool:
    """Whether ``text`` is a polynomial in simplest form: a sum of terms ``c``, ``c*x^k``, ``cx^k`` or
    ``x^k`` (``^``, ``**`` or superscripts; ``c`` a number, or a fraction of integers ``p/q`` with q > 1)
    with no two terms of the same power, and no parentheses: ``-16``, ``3x^2+9x+6``, ``x² - 1``, ``1/3``. An expression still to be worked out
    (``1-17``, ``3*(x+1)*(x+2)``, ``2x+3x``) is not, so restating the question is not an answer."""
    try:
        if not isinstance(text, str) or len(text) > MAX_CHARS:
            return False
        tokens = _tokenize(text)
    except ParseError:
        return False
    kinds = [k for k, _ in tokens]
    i, n, powers = 0, len(tokens), set()
    if i < n and kinds[i] in "+-":
        i += 1
    while True:
        power = None
        if i < n and kinds[i] == "num":
            i += 1
            power = 0
            if i + 1 < n and kinds[i] == "/" and kinds[i + 1] == "num" and tokens[i + 1][1][1] \
                    and tokens[i - 1][1][1] and tokens[i + 1][1][0] > 1:
                i += 2  # a fraction of integers as the coefficient: 1/3, -2/3x^2
            if i < n and kinds[i] == "*" and i + 1 < n and kinds[i + 1] == "x":
                i += 1
        if i < n and kinds[i] == "x":
            i += 1
            power = 1
            if i < n and kinds[i] == "^":
                if i + 1 >= n or kinds[i + 1] != "num" or not tokens[i + 1][1][1]:
                    return False
                power = int(tokens[i + 1][1][0])
                i += 2
        if power is None or power in powers:
            return False
        powers.add(power)
        if i == n:
            return True
        if kinds[i] not in "+-":
            return False
        i += 1


def parse_number(text: str) -> Fraction | None:
    """The value of a constant expression (``-59``, ``2.5``, ``(3+4)*2``), or None."""
    p = parse_polynomial(text)
    if p is None or any(k != 0 for k in p):
        return None
    return p.get(0, Fraction(0))


def polynomials_equal(a: str, b: str) -> bool:
    """True when both texts parse and are the same polynomial (``6+9x+3x^2`` == ``3*x**2+9*x+6``)."""
    p = parse_polynomial(a)
    return p is not None and p == parse_polynomial(b)
