"""Local health probing: what one agent sees of every region's services.

`ProbeTarget` says what to probe, `checks` runs one bounded HTTP or TCP probe,
`health` applies HAProxy-style rise/fall counting and the multi-target rule, and
`Prober` runs it all on a schedule and reports `model.Observation` values when a
(region, service) changes. The rules themselves are documented in `health.py`.
"""

from controlplane.probes.checks import MAX_BODY_BYTES, check, check_http, check_tcp
from controlplane.probes.health import TargetHealth, is_slow, summarize
from controlplane.probes.prober import OnChange, OnResult, Prober
from controlplane.probes.settings import probe_targets
from controlplane.probes.target import DEFAULT_EXPECT_STATUS, ProbeKind, ProbeResult, ProbeTarget

__all__ = [
    "DEFAULT_EXPECT_STATUS",
    "MAX_BODY_BYTES",
    "OnChange",
    "OnResult",
    "ProbeKind",
    "ProbeResult",
    "ProbeTarget",
    "Prober",
    "TargetHealth",
    "check",
    "check_http",
    "check_tcp",
    "is_slow",
    "probe_targets",
    "summarize",
]
