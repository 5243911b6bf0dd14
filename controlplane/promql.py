"""PromQL as configuration: a lexical check of query text, and the conditions a probe applies.

A Prometheus probe's queries are written in the YAML by people, often during an outage.
A query with an unclosed bracket or quote would only fail at the first probe, on every
agent at once, as an inconclusive probe that nobody notices until it matters. So the
configuration checks every query at start-up, here, with no Prometheus and no external
tool: the text is not empty, bounded in length, free of control characters, its
brackets `()`, `[]`, `{}` are balanced and matched, and its strings (`"..."`, `'...'`
with backslash escapes, `` `...` `` raw) and `#` comments are closed. That is a lexical
check, not a parser: `controlplane check-config` additionally hands every query to
`promtool` when it is installed (see `controlplane.probes.promtool`), which knows the
grammar and the function names.

A condition is how a probe turns a number into a verdict, written as in an alert rule:
`"== 0"`, `"> 0.05"`, `"<= 1"`. `Condition.holds` says whether a value meets it; NaN
never does (Prometheus drops NaN samples from a comparison the same way).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_QUERY_CHARS = 4096

_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}
_CONDITION_RE = re.compile(r"^\s*(==|!=|>=|<=|>|<)\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


def check_query(text: str) -> str | None:
    """What is lexically wrong with PromQL `text`, in words with a column; None when nothing.

    Columns count from 1 on the query's first line, or are given as `line L column C`
    for a multi-line query.
    """
    if not text.strip():
        return "must not be empty"
    if len(text) > MAX_QUERY_CHARS:
        return f"longer than {MAX_QUERY_CHARS} characters ({len(text)})"
    multiline = "\n" in text.strip()

    def where(index: int) -> str:
        line = text.count("\n", 0, index) + 1
        column = index - (text.rfind("\n", 0, index) + 1) + 1
        return f"line {line} column {column}" if multiline else f"column {column}"

    stack: list[tuple[str, int]] = []
    meaningful = False
    i = 0
    while i < len(text):
        c = text[i]
        if c in "\t\n\r ":
            i += 1
            continue
        if ord(c) < 32 or ord(c) == 127:
            return f"control character {c!r} at {where(i)}"
        if c == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        meaningful = True
        if c in "\"'`":
            start = i
            i += 1
            while i < len(text) and text[i] != c:
                if text[i] == "\n" and c != "`":
                    break
                if text[i] == "\\" and c != "`":
                    i += 1
                i += 1
            if i >= len(text) or text[i] != c:
                return f"unterminated string starting at {where(start)}"
            i += 1
            continue
        if c in _OPEN:
            stack.append((c, i))
        elif c in _CLOSE:
            if not stack:
                return f"unexpected {c!r} at {where(i)}: nothing is open"
            opened, at = stack.pop()
            if _OPEN[opened] != c:
                return f"{c!r} at {where(i)} closes {opened!r} opened at {where(at)}"
        i += 1
    if stack:
        opened, at = stack[-1]
        return f"unclosed {opened!r} opened at {where(at)}"
    if not meaningful:
        return "must not be only a comment"
    return None


@dataclass(frozen=True, slots=True)
class Condition:
    """`value <op> threshold`, as an alert rule writes it (`== 0`, `> 0.05`)."""

    op: str
    threshold: float

    def holds(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return _OPERATORS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}"


def parse_condition(text: str) -> Condition:
    """`Condition` from text such as `"> 0.05"`; `ValueError` in words when it is not one."""
    match = _CONDITION_RE.match(text)
    if match is None:
        raise ValueError("must be a comparison with a number, such as '== 0', '> 0.05' or '<= 0.5'")
    threshold = float(match.group(2))
    if not math.isfinite(threshold):
        raise ValueError("the number must be finite")
    return Condition(match.group(1), threshold)
