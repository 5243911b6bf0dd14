"""The client SDK: follow the committed decision from any agent, over HTTP only.

- `FlagsClient`: feature switches, weights and the shed fraction for applications,
  read from memory, never blocking, last known good kept when no agent answers.
- `DecisionFollower`: the one decision follower every reader uses (load balancer
  adapters, `FlagsClient`, `cpctl watch`, the demo's load balancer); its rules are in
  `following.Following`, which holds no I/O so that `cpctl` can drive it over
  `http.client`.
- `Served`: a decision (`controlplane.model.Decision`, typed) with who served it and
  whether that agent had lost quorum.
- `Shedder` (`shedding`): the decision's `shed_fraction` applied per request,
  deterministically by a key, never to high-priority requests, plus a local
  `MemoryGuard`; `shedding_middleware` (aiohttp) and `SheddingMiddleware` (ASGI) apply
  it and switched-off features in a web application (`middleware`).
- `ControlplaneProvider` (`openfeature_provider`): an OpenFeature provider backed by
  `FlagsClient`; needs the `openfeature` extra (`openfeature-sdk`), imported only there.

Independent of the server side (enforced by the import contract in pyproject.toml):
it needs aiohttp and the shared words (`controlplane.model`, `controlplane.errors`).
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controlplane.client.flags import FlagsClient
    from controlplane.client.follower import DecisionFollower, apply_once
    from controlplane.client.following import Following, Served
    from controlplane.client.middleware import Classifier, SheddingMiddleware, shedding_middleware
    from controlplane.client.openfeature_provider import ControlplaneProvider
    from controlplane.client.shedding import MemoryGuard, Shedder, bucket_of
    from controlplane.model import Decision

# Loaded on first use: `cpctl` drives `Following` over http.client and must not pay for
# importing aiohttp.
_LAZY = {
    "Decision": "controlplane.model",
    "DecisionFollower": "controlplane.client.follower",
    "FlagsClient": "controlplane.client.flags",
    "Following": "controlplane.client.following",
    "Served": "controlplane.client.following",
    "apply_once": "controlplane.client.follower",
    "Classifier": "controlplane.client.middleware",
    "SheddingMiddleware": "controlplane.client.middleware",
    "shedding_middleware": "controlplane.client.middleware",
    "ControlplaneProvider": "controlplane.client.openfeature_provider",
    "MemoryGuard": "controlplane.client.shedding",
    "Shedder": "controlplane.client.shedding",
    "bucket_of": "controlplane.client.shedding",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "Classifier",
    "ControlplaneProvider",
    "Decision",
    "DecisionFollower",
    "FlagsClient",
    "Following",
    "MemoryGuard",
    "Served",
    "Shedder",
    "SheddingMiddleware",
    "apply_once",
    "bucket_of",
    "shedding_middleware",
]
