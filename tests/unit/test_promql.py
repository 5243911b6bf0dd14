"""The lexical check of PromQL queries and the conditions a Prometheus probe applies."""

from __future__ import annotations

import math

import pytest

from controlplane.promql import MAX_QUERY_CHARS, Condition, check_query, parse_condition

GOOD = [
    "up",
    'up{job="order", region="cn-east"} == 0',
    'sum(rate(http_requests_total{code=~"5.."}[1m])) / sum(rate(http_requests_total[1m]))',
    "histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket[5m])))",
    'max(process_resident_memory_bytes{job="order"} / process_memory_limit_bytes{job="order"})',
    "rate(x[5m:30s])",
    'up{path="/a(b"}',  # brackets inside strings do not count
    "up{path='it\\'s ]'}",  # escaped quote inside a single-quoted string
    "up{path=`C:\\dir ]`} or up",  # raw strings have no escapes: the backslash is literal
    "# the error ratio\nsum(rate(errors[1m]))",
    "sum(\n  rate(x[1m])\n)  # trailing comment with ( and [",
]


@pytest.mark.parametrize("query", GOOD)
def test_valid_queries_pass(query: str) -> None:
    assert check_query(query) is None


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("", "must not be empty"),
        ("   \n ", "must not be empty"),
        ("# only a comment", "must not be only a comment"),
        ("sum(rate(x[1m])", "unclosed '(' opened at column 4"),
        ("rate(x[1m)", "')' at column 10 closes '[' opened at column 7"),
        ("up)", "unexpected ')' at column 3: nothing is open"),
        ('up{job="order}', "unterminated string starting at column 8"),
        ("up{job='order}", "unterminated string starting at column 8"),
        ("up{job=`order}", "unterminated string starting at column 8"),
        ("up\x00", "control character '\\x00' at column 3"),
        ("sum(\n  rate(x[1m]\n", "unclosed '(' opened at line 2 column 7"),
        ("x" * (MAX_QUERY_CHARS + 1), f"longer than {MAX_QUERY_CHARS} characters"),
    ],
)
def test_invalid_queries_say_what_and_where(query: str, problem: str) -> None:
    found = check_query(query)
    assert found is not None
    assert found.startswith(problem), found


def test_a_double_quoted_string_does_not_run_past_its_line() -> None:
    # PromQL strings are single-line; an unclosed one must not swallow the rest.
    assert check_query('up{a="x\n"}') == "unterminated string starting at line 1 column 6"


@pytest.mark.parametrize(
    ("text", "op", "threshold"),
    [("== 0", "==", 0.0), (">0.05", ">", 0.05), ("  <= 1e-3 ", "<=", 0.001), ("!= -2", "!=", -2.0)],
)
def test_conditions_parse(text: str, op: str, threshold: float) -> None:
    assert parse_condition(text) == Condition(op, threshold)


@pytest.mark.parametrize("text", ["", "0", "= 0", "=> 1", "> x", "> 1 2", "> 1e999", "> nan"])
def test_bad_conditions_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"must be a comparison|must be finite"):
        parse_condition(text)


def test_conditions_hold_like_promql_comparisons() -> None:
    assert parse_condition("== 0").holds(0.0)
    assert not parse_condition("== 0").holds(1.0)
    assert parse_condition("> 0.05").holds(0.5)
    assert not parse_condition("> 0.05").holds(0.05)
    assert parse_condition(">= 0.05").holds(0.05)
    assert parse_condition("< 1").holds(-math.inf)
    # NaN meets no condition, not even != (PromQL drops NaN samples from comparisons).
    assert not parse_condition("!= 0").holds(math.nan)
    assert str(parse_condition(">0.050")) == "> 0.05"
