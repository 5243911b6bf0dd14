"""Request and response shapes of the HTTP API, as pydantic models.

One definition serves three purposes: parsing and validating request bodies (a bad
body becomes a 400 naming the field), documenting every route in `/openapi.json`, and
letting the tests check that what the agents answer matches what is documented.
Response models mirror `model.decision_to_json` and friends; they are not used on the
hot path (the handlers build plain dicts and orjson encodes them).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from controlplane.lbreports import NAME_PATTERN as LB_NAME_PATTERN
from controlplane.state import (
    DRILL_LATE_LBS_MAX,
    DRILL_SECONDS_MAX,
    DRILL_STAGE_NAME_MAX,
    DRILL_STAGES_MAX,
    DRILL_SUMMARY_MAX,
)

# Control characters (C0 but tab, DEL, C1, bidirectional overrides) in free text would
# act on the terminals and pages that show it; names are patterns that exclude them.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _no_control(value: str) -> str:
    found = _CONTROL.search(value)
    if found:
        raise ValueError(
            f"must not contain control characters (found U+{ord(found.group()):04X} at {found.start()})"
        )
    return value


Reason = Annotated[str, Field(min_length=1, max_length=500), AfterValidator(_no_control)]
NameStr = Annotated[
    str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
]
Who = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_no_control)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    reason: Reason
    # Accepted for older clients and noted in the audit log; the intent's `who` is the
    # name of the token that sent it, never what the client says.
    who: Who | None = None
    # Chosen by the client to make a retry safe: the same id commits once.
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")] | None = None


# The longest an intent may be given to stand by itself (30 days).
MAX_FOR_S = 30 * 86400.0


class _StandingBody(_Body):
    # Seconds this intent stands before it ends by itself (removed by "expiry").
    for_s: Annotated[float, Field(gt=0, le=MAX_FOR_S)] | None = None


class DrainBody(_StandingBody):
    kind: Literal["drain"]
    region: NameStr
    service: NameStr | None = None


class UndrainBody(_Body):
    kind: Literal["undrain"]
    region: NameStr
    service: NameStr | None = None


class FailoverBody(_StandingBody):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)

    kind: Literal["failover"]
    from_region: NameStr = Field(alias="from")
    to_region: NameStr = Field(alias="to")
    service: NameStr | None = None


class OverrideBody(_StandingBody):
    kind: Literal["override"]
    service: NameStr
    weights: Annotated[dict[NameStr, Annotated[int, Field(ge=0, le=100)]], Field(min_length=1, max_length=64)]


class FeatureBody(_StandingBody):
    kind: Literal["feature"]
    name: NameStr
    enabled: bool


class FreezeBody(_StandingBody):
    kind: Literal["freeze"]


class UnfreezeBody(_Body):
    kind: Literal["unfreeze"]


# The longest a drill may last: a rehearsal, not a way of working.
MAX_DRILL_S = 86400.0


class DrillBody(_Body):
    """A rehearsed failure of `region` (every service, or `service`) for `for_s` seconds.

    The region is judged down exactly as a failure would judge it; the drill always
    ends by itself (`for_s` is required), even if whoever started it is gone.
    """

    kind: Literal["drill"]
    region: NameStr
    service: NameStr | None = None
    for_s: Annotated[float, Field(gt=0, le=MAX_DRILL_S)]


IntentBody = Annotated[
    DrainBody
    | UndrainBody
    | FailoverBody
    | OverrideBody
    | FeatureBody
    | FreezeBody
    | UnfreezeBody
    | DrillBody,
    Field(discriminator="kind"),
]


class IntentRequest(BaseModel):
    """Wrapper so the discriminated union can be validated as one model."""

    body: IntentBody


class PlanBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    fail: Annotated[list[NameStr], Field(max_length=64)] = []
    intents: Annotated[list[IntentBody], Field(max_length=16)] = []
    # Ids of standing intents to suppose removed (what `DELETE /v1/intents/{id}` would do).
    remove: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=16)] = []


class DeleteIntentBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    reason: Reason
    who: Who | None = None


# -- load balancer reports (issue 17) -------------------------------------------------

# Unix times a report may carry: from 1970 to the year 2286.
UnixTime = Annotated[float, Field(ge=0, le=1e10, allow_inf_nan=False)]
Revision = Annotated[int, Field(ge=0, le=2**63 - 1)]
LbError = Annotated[str, Field(min_length=1, max_length=500), AfterValidator(_no_control)]


class LbReportBody(BaseModel):
    """`POST /v1/lbs/{name}`: what a load balancer adapter applied, and how it is doing."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    adapter: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")] = Field(
        description="which adapter: haproxy, nginx"
    )
    applied_revision: Revision | None = Field(description="the revision in force in the load balancer")
    applied_epoch: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = Field(
        description="the epoch of that revision; null when the decision carries none"
    )
    applied_at: UnixTime | None = Field(description="when that revision was applied (the adapter's clock)")
    desired_revision: Revision | None = Field(description="the last revision the adapter received")
    ok: bool | None = Field(description="whether the last attempt to apply succeeded; null before any")
    error: LbError | None = Field(description="what is wrong now, in words; null when nothing")
    heartbeat_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = Field(
        description="the adapter reports at least this often"
    )


class LbOut(BaseModel):
    name: str
    adapter: str
    applied_revision: int | None
    applied_epoch: str | None
    applied_at: float | None
    desired_revision: int | None
    reported_at: float = Field(description="when this agent received the report (its clock)")
    age_s: float = Field(description="seconds since then")
    ok: bool | None
    error: str | None
    heartbeat_s: float
    lag_revisions: int | None = Field(
        description="revisions behind the decision this agent serves; null without one"
    )
    state: Literal["in-sync", "applying", "lagging", "failing", "silent"] = Field(
        description="silent: no report for 3 heartbeats; failing: not ok or an error; in-sync: "
        "applied this agent's revision; applying: behind, the decision younger than 2 "
        "heartbeats; lagging: behind, and older"
    )


class LbsOut(BaseModel):
    revision: int | None = Field(description="the revision this agent serves")
    lbs: list[LbOut]
    limit: int = Field(description="how many load balancers an agent keeps reports of")


# -- responses -----------------------------------------------------------------------


class ErrorOut(BaseModel):
    error: str
    detail: str
    code: str | None = None


class PlacementOut(BaseModel):
    weight: Annotated[int, Field(ge=0, le=100)]
    state: Literal["healthy", "degraded", "down", "drained"]
    verdict: Literal["up", "slow", "down", "unknown"]
    verdict_since: float
    serving_since: float | None
    ramp: float


class DecisionOut(BaseModel):
    revision: int
    term: int
    committed_at: str
    committed_at_unix: float
    leader: str
    panic: bool
    panic_services: list[str]
    panic_regions: dict[str, list[str]] = Field(
        default_factory=dict, description="per service in panic, the regions the panic may serve"
    )
    panic_since: dict[str, float] = Field(
        default_factory=dict, description="per service, when its panic began"
    )
    epoch: str = Field("", description="the cluster state the revision counts in; changes when it is rebuilt")
    frozen: bool
    shed_fraction: float
    services: dict[str, dict[str, PlacementOut]]
    features: dict[str, bool]
    reasons: list[str]
    intent_seq: int
    decided_at: float
    next_review_at: float | None
    stale: bool
    stale_s: float | None = None
    served_by: str


class PlanOut(DecisionOut):
    changes: list[str]
    refusals: list[str]
    committed: Literal[False]


class FeaturesOut(BaseModel):
    revision: int
    features: dict[str, bool]
    shed_fraction: float
    stale: bool


class IntentOut(BaseModel):
    id: str
    kind: str
    reason: str
    who: str
    created_at: float
    seq: int
    region: str | None = None
    service: str | None = None
    feature: str | None = None
    enabled: bool | None = None
    from_: str | None = Field(default=None, alias="from")
    to: str | None = None
    weights: dict[str, int] | None = None
    expires_at: float | None = None


class IntentsOut(BaseModel):
    intents: list[IntentOut]
    intent_seq: int


class IntentAccepted(BaseModel):
    id: str
    seq: int
    revision: int | None
    # The name of the token that wrote it, recorded as the intent's `who`.
    who: str | None = None
    detail: str | None = None
    # Cluster time when the agent took it (`cpctl drill` measures its clock offset with it).
    created_at: float | None = None


class WhoamiOut(BaseModel):
    """Who the presented token acts as: its name and scope (`anonymous`/`read` without one)."""

    name: str
    scope: Literal["read", "lb", "operate", "admin"]


class IntentRemoved(BaseModel):
    removed: IntentOut
    revision: int | None


class MemberOut(BaseModel):
    id: str
    address: str
    http: str | None
    connected: bool
    leader: bool


class ClusterOut(BaseModel):
    cluster: str
    agent: str
    backend: str
    leader: str | None
    last_known_leader: str | None
    is_leader: bool
    term: int
    commit_index: int
    has_quorum: bool
    stale_s: float | None
    problems: list[str] = Field(default_factory=list, description="why this agent is stale, in words")
    cluster_time: float | None = Field(None, description="the cluster's clock as this agent knows it")
    clock_skew_s: float | None = Field(None, description="leader's wall clock minus this agent's")
    epoch: str = ""
    revision: int | None
    config_hash: str = Field(
        "",
        description="hash of the validated configuration; agents differ while a change rolls out",
    )
    members: list[MemberOut]


class ObservationOut(BaseModel):
    observer: str
    region: str
    service: str
    up: bool
    at: float
    latency_ms: float | None
    utilization: float | None
    error: str | None
    impaired: str | None = Field(None, description="why the observer does not count as a witness")
    inconclusive: str | None = Field(
        None, description="why this observer's probes cannot tell (then no witness either way)"
    )
    age_s: float
    fresh: bool


class ObservationsOut(BaseModel):
    observations: list[ObservationOut]
    ttl_s: float


class RegionServiceOut(BaseModel):
    capacity_rps: float
    base_weight: float
    address: str | None
    targets: list[str]
    weight: int | None
    state: str | None
    verdict: str | None


class RegionOut(BaseModel):
    name: str
    agents: list[str]
    services: dict[str, RegionServiceOut]


class RegionsOut(BaseModel):
    regions: list[RegionOut]
    demand_rps: dict[str, float] = {}


class HistoryEntryOut(BaseModel):
    kind: Literal["decision", "intent", "intent-removed", "epoch", "drill"]
    at: float
    revision: int
    summary: str
    intent_id: str | None
    who: str | None
    weights: dict[str, dict[str, int]] | None = None


class HistoryOut(BaseModel):
    entries: list[HistoryEntryOut]
    next_before: float | None
    total: int


# -- drills (`POST /v1/drills`, `GET /v1/drills`) ------------------------------------------

# The longest a drill's objective may be (a day, the longest a drill may last).
DRILL_OBJECTIVE_MAX_S = 86400.0

# Stage times may come out a little before the start (see `state.DRILL_SECONDS_MAX`).
DrillSeconds = Annotated[float, Field(ge=-DRILL_SECONDS_MAX, le=DRILL_SECONDS_MAX, allow_inf_nan=False)]
StageName = Annotated[
    str, Field(min_length=1, max_length=DRILL_STAGE_NAME_MAX, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
]
# A load balancer is named as it reports itself (`POST /v1/lbs/{name}`).
LbName = Annotated[str, Field(pattern=LB_NAME_PATTERN)]
Summary = Annotated[str, Field(max_length=DRILL_SUMMARY_MAX), AfterValidator(_no_control)]


class DrillRecordBody(BaseModel):
    """`POST /v1/drills`: a drill's measured result, as `cpctl drill` sends it when it ends.

    `who` is not part of it (the name of the token that sends it is recorded), nor is
    `recorded_at` (the store stamps it). `id` is the drill intent's id: the same id again
    is a retry and records nothing new.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")]
    region: NameStr
    service: NameStr | None = None
    started_at: UnixTime
    ended_at: UnixTime
    objective_s: Annotated[float, Field(gt=0, le=DRILL_OBJECTIVE_MAX_S, allow_inf_nan=False)]
    rto_s: DrillSeconds | None = Field(None, description="seconds to recovery; null when not measured")
    passed: bool
    stages: Annotated[dict[StageName, DrillSeconds | None], Field(max_length=DRILL_STAGES_MAX)] = Field(
        default_factory=dict, description="stage name -> seconds from the start; null when not reached"
    )
    late_lbs: Annotated[list[LbName], Field(max_length=DRILL_LATE_LBS_MAX)] = Field(
        default_factory=list, description="load balancers that had not applied the decision in time"
    )
    summary: Summary = ""

    @model_validator(mode="after")
    def _consistent(self) -> DrillRecordBody:
        if self.ended_at < self.started_at:
            raise ValueError(
                f"ended_at must not be before started_at (got {self.ended_at} < {self.started_at})"
            )
        if self.passed and (self.rto_s is None or self.rto_s > self.objective_s):
            raise ValueError(
                "passed: a drill passes only with an RTO measured within its objective "
                f"(got rto_s {self.rto_s}, objective_s {self.objective_s})"
            )
        return self


class DrillRecordOut(BaseModel):
    id: str
    region: str
    service: str | None
    who: str
    started_at: float
    ended_at: float
    objective_s: float
    rto_s: float | None
    passed: bool
    stages: dict[str, float | None]
    late_lbs: list[str]
    summary: str
    recorded_at: float


class DrillRecordsOut(BaseModel):
    drills: list[DrillRecordOut] = Field(description="newest first")
    limit: int = Field(description="at most this many were asked for")
    total: int = Field(description="how many drills this cluster keeps now (the newest 100)")


class HealthOut(BaseModel):
    status: str
    agent: str
    uptime_s: float


class ReadyOut(BaseModel):
    ready: bool
    agent: str
    problems: list[str]
    revision: int | None


class WeightsOut(BaseModel):
    service: str
    revision: int
    weights: dict[str, int]
    states: dict[str, str]
    stale: bool


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)


# -- OFREP (the OpenFeature Remote Evaluation Protocol, core endpoints) --------------------


class OfrepRequest(BaseModel):
    context: dict[str, Any] | None = Field(
        None, description="evaluation context (ignored: flags are fleet-wide)"
    )


class OfrepEvaluation(BaseModel):
    key: str
    value: bool | float = Field(description="a feature is a boolean flag; shed_fraction a float flag")
    reason: Literal["STATIC"]
    variant: str
    metadata: dict[str, bool | int | float | str]


class OfrepBulk(BaseModel):
    flags: list[OfrepEvaluation]


class OfrepFailure(BaseModel):
    key: str
    errorCode: Literal["PARSE_ERROR", "INVALID_CONTEXT", "FLAG_NOT_FOUND"]
    errorDetails: str


class OfrepBulkFailure(BaseModel):
    errorCode: Literal["PARSE_ERROR", "INVALID_CONTEXT"]
    errorDetails: str


class OfrepGeneralError(BaseModel):
    errorDetails: str
