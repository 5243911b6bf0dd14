"""Durations and moments as an operator types them: `90s`, `2h`, `1h30m`, or a timestamp.

In its own module so that the read commands (`history --before 2h`) and the actions
(`--for 30m`) parse them the same way.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `30m`, `2h`, `1d` or `1h30m`; `ValueError` otherwise."""
    text = text.strip().lower()
    if not text:
        raise ValueError("empty duration")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"expected a duration such as 90s, 30m, 2h or 1h30m (got {text!r})")
    return sum(float(n) * DURATION_UNITS[u] for n, u in parts)


def parse_moment(text: str, now: float) -> float:
    """Unix seconds from Unix seconds (`1764236400`), a duration ago (`2h`, `30m`, `1h30m`)
    or an ISO 8601 timestamp (`2026-11-27T10:00:00Z`; without an offset it is UTC, as
    cpctl shows times); `ValueError` otherwise."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    if re.fullmatch(r"(\d+(\.\d+)?[smhdSMHD])+", text):
        return now - parse_duration(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"expected Unix seconds, a duration ago (2h, 30m) or an ISO 8601 time "
            f"such as 2026-11-27T10:00:00Z (got {text!r})"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
