"""`--log-format json`: one JSON object per line, with the agent, region and audit fields."""

from __future__ import annotations

import json
import logging

from controlplane.cli import JsonFormatter


def record(msg: str, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("controlplane.audit", logging.INFO, __file__, 1, msg, (), None)
    r.__dict__.update(extra)
    return r


def test_each_record_is_one_json_object_with_agent_and_region() -> None:
    line = JsonFormatter(agent="agent-east-1", region="cn-east").format(
        record("committed\ndecision 4", revision=4)
    )
    assert "\n" not in line
    out = json.loads(line)
    assert out["agent"] == "agent-east-1" and out["region"] == "cn-east"
    assert out["level"] == "info" and out["logger"] == "controlplane.audit"
    assert out["msg"] == "committed\ndecision 4" and out["revision"] == 4
    assert out["ts"].endswith("+00:00")


def test_audit_fields_become_keys() -> None:
    audit = {"who": "alice", "scope": "operate", "what": "intent drain cn-east", "reason": "r", "revision": 9}
    out = json.loads(JsonFormatter(agent="a").format(record("audit ...", audit=audit)))
    assert {k: out[k] for k in audit} == audit
