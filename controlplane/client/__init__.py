"""The client SDK: follow the committed decision from any agent, over HTTP only.

- `FlagsClient`: feature switches, weights and the shed fraction for applications,
  read from memory, never blocking, last known good kept when no agent answers.
- `DecisionFollower`: the one decision follower every reader uses (load balancer
  adapters, `FlagsClient`, `cpctl watch`, the demo's load balancer); its rules are in
  `following.Following`, which holds no I/O so that `cpctl` can drive it over
  `http.client`.
- `Served`: a decision (`controlplane.model.Decision`, typed) with who served it and
  whether that agent had lost quorum.

Independent of the server side (enforced by the import contract in pyproject.toml):
it needs aiohttp and the shared words (`controlplane.model`, `controlplane.errors`).
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controlplane.client.flags import FlagsClient
    from controlplane.client.follower import DecisionFollower, apply_once
    from controlplane.client.following import Following, Served
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
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["Decision", "DecisionFollower", "FlagsClient", "Following", "Served", "apply_once"]
