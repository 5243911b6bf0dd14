"""The body of `POST /v1/drills`, built from what a drill measured.

No I/O, so that `cpctl drill` sends it with its own HTTP client (any agent; the id makes
a resend safe: the same id is recorded once) and a test can check it without a server.

`drill_body` takes the stage times (seconds from the drill's start, None for a stage not
reached) and derives the rest the way the agents check it: the RTO is the time of the
stage that ends recovery (`rto_stage`, e.g. the decision applied by every load
balancer), and the drill passed when that was measured and within the objective. What
a long drill can make too big is cut to the agents' bounds instead of refused: the
summary to `SUMMARY_MAX` characters, the late load balancers to `LATE_LBS_MAX` names
(the summary says how many more there were). A stage that came out a little before the
start (its clocks' offsets are estimates) is sent as measured; one that is not a number,
or absurdly far off, as not measured. What only a mistake makes (a bad stage or load
balancer name, too many stages, an end before the start) raises `ValueError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

# The agents' bounds (`controlplane.state`, `controlplane.api.schemas.DrillRecordBody`).
STAGES_MAX = 32
LATE_LBS_MAX = 64
SUMMARY_MAX = 500
SECONDS_MAX = 10_000_000.0
_STAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
# As load balancers name themselves when they report (`controlplane.lbreports`).
LB_NAME_PATTERN = r"^[A-Za-z0-9._@-]{1,64}$"
_LB = re.compile(LB_NAME_PATTERN)


def drill_body(
    *,
    drill_id: str,
    region: str,
    service: str | None,
    started_at: float,
    ended_at: float,
    objective_s: float,
    stages: Mapping[str, float | None],
    rto_stage: str,
    late_lbs: Sequence[str] = (),
    summary: str = "",
) -> dict[str, Any]:
    """The JSON body recording this drill (see the module docstring)."""
    if len(stages) > STAGES_MAX:
        raise ValueError(f"at most {STAGES_MAX} stages (got {len(stages)})")
    bad = [name for name in stages if not _STAGE.match(name)]
    if bad:
        raise ValueError(f"stage names are 1 to 64 of A-Z a-z 0-9 _ . : - (got {bad[:3]})")
    bad = [lb for lb in late_lbs if not (_LB.match(lb) and lb.isascii())]
    if bad:
        raise ValueError(f"load balancer names are 1 to 64 of A-Z a-z 0-9 . _ @ - (got {bad[:3]})")
    if not ended_at >= started_at:
        raise ValueError(f"the drill ends before it starts ({ended_at} < {started_at})")
    if rto_stage not in stages:
        raise ValueError(f"rto_stage {rto_stage!r} is not one of the stages {sorted(stages)}")
    measured = {name: _seconds(value) for name, value in stages.items()}
    rto_s = measured[rto_stage]
    lbs = list(late_lbs)
    text = summary
    if len(lbs) > LATE_LBS_MAX:
        text = f"{text} ({len(lbs) - LATE_LBS_MAX} more late load balancers not listed)".strip()
        lbs = lbs[:LATE_LBS_MAX]
    if len(text) > SUMMARY_MAX:
        text = text[: SUMMARY_MAX - 3] + "..."
    return {
        "id": drill_id,
        "region": region,
        "service": service,
        "started_at": started_at,
        "ended_at": ended_at,
        "objective_s": objective_s,
        "rto_s": rto_s,
        "passed": rto_s is not None and rto_s <= objective_s,
        "stages": measured,
        "late_lbs": lbs,
        "summary": "".join(c for c in text if c.isprintable()),
    }


def _seconds(value: float | None) -> float | None:
    """Milliseconds are plenty; not a number, or absurdly far off, is not measured."""
    if value is None or not math.isfinite(value) or abs(value) > SECONDS_MAX:
        return None
    return round(value, 3)
