"""An OpenFeature provider backed by the decision follower: flags from memory, pushed by long-poll.

    from openfeature import api
    from controlplane.client.openfeature_provider import ControlplaneProvider

    api.set_provider_and_wait(ControlplaneProvider(["http://10.0.0.1:8700", "http://10.0.0.2:8700"]))
    flags = api.get_client()
    if flags.get_boolean_value("comments", True):
        ...
    shed = flags.get_float_value("shed_fraction", 0.0)

Needs the `openfeature` extra (`pip install 'controlplane[openfeature]'`, which brings
`openfeature-sdk`); nothing else in the SDK imports it.

Compared with the generic OFREP provider (`openfeature-provider-ofrep`, one HTTP request
per evaluation against one agent), this one follows the decision with `FlagsClient`:
a blocking query that returns the moment a new revision is committed, so a flag
changes within a round trip of `cpctl feature disable`; every evaluation reads memory;
it moves to the next agent when one fails or has lost quorum; and when every agent is
gone it keeps the last known good decision (reason `STALE`) rather than falling back to
code defaults, because a control-plane outage must not switch features back on.

Flags are the OFREP agents' flags: each feature is a boolean flag, `shed_fraction` a
float flag. An unknown key is `FLAG_NOT_FOUND`; a known key asked as another type is
`TYPE_MISMATCH`; before the first decision arrives every evaluation is
`PROVIDER_NOT_READY` (the caller's default is used). The provider emits
`PROVIDER_CONFIGURATION_CHANGED` with the keys that changed on every new decision, and
`PROVIDER_READY` when the first decision arrives after a failed initialization.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from ssl import SSLContext
from typing import Any, TypeVar

from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEventDetails
from openfeature.exception import FlagNotFoundError, ProviderNotReadyError, TypeMismatchError
from openfeature.flag_evaluation import FlagResolutionDetails, FlagValueType, Reason
from openfeature.provider import AbstractProvider, Metadata

from controlplane.client.flags import FlagsClient
from controlplane.model import Decision, flags_of

T = TypeVar("T")


class ControlplaneProvider(AbstractProvider):
    """OpenFeature flags from a `FlagsClient` (its own, or one the application already runs).

    With `endpoints`, the provider starts its own client in a daemon thread on
    `initialize` (waiting up to `init_timeout_s` for the first decision) and stops it on
    `shutdown`. With `flags=`, it reads that client and leaves its lifecycle alone.
    """

    def __init__(
        self,
        endpoints: Sequence[str] | None = None,
        *,
        flags: FlagsClient | None = None,
        token: str | None = None,
        wait_s: float = 30.0,
        init_timeout_s: float = 10.0,
        ssl: SSLContext | None = None,
    ) -> None:
        """`ssl`: the TLS context for https agents, for the provider's own client."""
        super().__init__()
        if (flags is None) == (endpoints is None):
            raise ValueError("give either endpoints or flags (a FlagsClient)")
        self._own = flags is None
        self.flags = (
            flags
            if flags is not None
            else FlagsClient(list(endpoints or ()), token=token, wait_s=wait_s, ssl=ssl)
        )
        self.init_timeout_s = init_timeout_s
        self._ready = threading.Event()
        self._announce_ready = False
        self.flags.add_listener(self._changed)

    # -- lifecycle -------------------------------------------------------------------------

    def get_metadata(self) -> Metadata:
        return Metadata(name="controlplane")

    def initialize(self, evaluation_context: EvaluationContext) -> None:
        if self._own:
            self.flags.start_in_thread()
        if self.flags.decision is not None:
            self._ready.set()
        if not self._ready.wait(self.init_timeout_s):
            # Keep following: the first decision will still arrive and announce READY.
            self._announce_ready = True
            raise ProviderNotReadyError(
                f"no decision from {', '.join(self.flags.endpoints)} within {self.init_timeout_s:g} s"
            )

    def shutdown(self) -> None:
        if self._own:
            self.flags.stop_thread()

    def _changed(self, previous: Decision | None, new: Decision) -> None:
        self._ready.set()
        before = flags_of(previous) if previous is not None else {}
        after = flags_of(new)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        metadata: dict[str, bool | str | int | float] = {"revision": new.revision, "epoch": new.epoch}
        if self._announce_ready:
            self._announce_ready = False
            self.emit_provider_ready(ProviderEventDetails(flags_changed=changed, metadata=metadata))
        elif previous is not None and changed:
            self.emit_provider_configuration_changed(
                ProviderEventDetails(
                    flags_changed=changed, message=f"revision {new.revision}", metadata=metadata
                )
            )

    # -- evaluation (memory only) ------------------------------------------------------------

    def _resolve(self, key: str, kind: type[Any], default: T) -> FlagResolutionDetails[T]:
        decision = self.flags.decision
        if decision is None:
            raise ProviderNotReadyError("no decision received from the agents yet")
        flags = flags_of(decision)
        if key not in flags:
            raise FlagNotFoundError(f"no flag {key!r}; flags: {', '.join(sorted(flags))}")
        value = flags[key]
        if kind is float and isinstance(value, float):
            variant = "shedding" if value > 0 else "none"
        elif kind is bool and isinstance(value, bool):
            variant = "on" if value else "off"
        else:
            wanted = "boolean" if isinstance(value, bool) else "float"
            raise TypeMismatchError(f"flag {key!r} is a {wanted} flag")
        stale = self.flags.stale
        return FlagResolutionDetails(
            value=value,  # type: ignore[arg-type]
            reason=Reason.STALE if stale else Reason.STATIC,
            variant=variant,
            flag_metadata={"revision": decision.revision, "epoch": decision.epoch, "stale": stale},
        )

    def resolve_boolean_details(
        self, flag_key: str, default_value: bool, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[bool]:
        return self._resolve(flag_key, bool, default_value)

    def resolve_float_details(
        self, flag_key: str, default_value: float, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[float]:
        return self._resolve(flag_key, float, default_value)

    def resolve_integer_details(
        self, flag_key: str, default_value: int, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[int]:
        return self._resolve(flag_key, int, default_value)

    def resolve_string_details(
        self, flag_key: str, default_value: str, evaluation_context: EvaluationContext | None = None
    ) -> FlagResolutionDetails[str]:
        return self._resolve(flag_key, str, default_value)

    def resolve_object_details(
        self,
        flag_key: str,
        default_value: Sequence[FlagValueType] | Mapping[str, FlagValueType],
        evaluation_context: EvaluationContext | None = None,
    ) -> FlagResolutionDetails[Sequence[FlagValueType] | Mapping[str, FlagValueType]]:
        return self._resolve(flag_key, dict, default_value)
