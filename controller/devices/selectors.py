"""Label selectors, as Kubernetes writes them: ``site=berlin,tier!=canary,gpu,!legacy,zone in (a,b)``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_KEY = r"[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?"
_VAL = r"([A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)?"
_TERM_RE = [
    ("in", re.compile(rf"^(?P<key>{_KEY})\s+in\s+\((?P<values>[^)]*)\)$")),
    ("notin", re.compile(rf"^(?P<key>{_KEY})\s+notin\s+\((?P<values>[^)]*)\)$")),
    ("ne", re.compile(rf"^(?P<key>{_KEY})\s*!=\s*(?P<value>{_VAL})$")),
    ("eq", re.compile(rf"^(?P<key>{_KEY})\s*==?\s*(?P<value>{_VAL})$")),
    ("absent", re.compile(rf"^!\s*(?P<key>{_KEY})$")),
    ("exists", re.compile(rf"^(?P<key>{_KEY})$")),
]

_NONEMPTY_VAL = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_TERM = rf"(?:{_KEY}(?: ?(?:!=|==?) ?{_VAL}| (?:in|notin) \( ?{_NONEMPTY_VAL} ?(?:, ?{_NONEMPTY_VAL} ?)*\))?|! ?{_KEY})"
#: the selectors :func:`parse` accepts, as one regular expression for the API's schema (with single spaces where
#: the parser takes any whitespace): whatever a client or a fuzzer builds from it is accepted
SCHEMA_PATTERN = rf"^(?: ?{_TERM} ?(?:, ?{_TERM} ?)*)?$"
#: one ``KEY=VALUE`` filter (the device list's ``label`` parameter)
LABEL_FILTER_PATTERN = rf"^{_KEY}={_VAL}$"


class SelectorError(ValueError):
    """A selector that cannot be parsed; the message names the bad term."""


@dataclass(frozen=True)
class Term:
    op: str
    key: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "eq":
            return value == self.values[0]
        if self.op == "ne":
            return value != self.values[0]
        if self.op == "in":
            return value in self.values
        if self.op == "notin":
            return value not in self.values
        if self.op == "exists":
            return present
        return not present  # absent


@dataclass(frozen=True)
class Selector:
    terms: tuple[Term, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(t.matches(labels) for t in self.terms)

    def __str__(self) -> str:
        return ",".join(_render(t) for t in self.terms)


def _render(t: Term) -> str:
    if t.op == "eq":
        return f"{t.key}={t.values[0]}"
    if t.op == "ne":
        return f"{t.key}!={t.values[0]}"
    if t.op in ("in", "notin"):
        return f"{t.key} {t.op} ({','.join(t.values)})"
    return t.key if t.op == "exists" else f"!{t.key}"


def _split_terms(text: str) -> list[str]:
    terms: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            terms.append("".join(current))
            current = []
        else:
            current.append(ch)
    terms.append("".join(current))
    return [t.strip() for t in terms if t.strip()]


def parse(text: str | None) -> Selector:
    """Parse a selector; an empty one matches everything."""
    if not text or not text.strip():
        return Selector()
    if len(text) > 4096:
        raise SelectorError("selector is longer than 4096 characters")
    terms = []
    for raw in _split_terms(text):
        for op, regex in _TERM_RE:
            m = regex.match(raw)
            if m is None:
                continue
            if op in ("in", "notin"):
                values = tuple(v.strip() for v in m.group("values").split(",") if v.strip())
                if not values or not all(re.fullmatch(_VAL, v) for v in values):
                    raise SelectorError(f"selector term {raw!r}: list one or more valid values in (...)")
                terms.append(Term(op, m.group("key"), values))
            elif op in ("eq", "ne"):
                terms.append(Term(op, m.group("key"), (m.group("value"),)))
            else:
                terms.append(Term(op, m.group("key")))
            break
        else:
            raise SelectorError(
                f"selector term {raw!r} is not one of: key=value, key!=value, key, !key, key in (a,b), key notin (a,b)"
            )
    return Selector(tuple(terms))
