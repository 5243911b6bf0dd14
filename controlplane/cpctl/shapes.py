"""What a controlplane agent's answer to each route cpctl reads must look like, at least.

A proxy, a captive portal or some other server at the agent's address can answer 200
with an HTML page or with JSON of another shape. Shown as it came, that would read as
"no standing intents" or an empty table in the middle of an outage; checked here, it
is an error that names the agent, and cpctl moves on to the next endpoint.

Only the top-level keys cpctl relies on are checked, so newer agents that add fields
pass. A route not listed here is not checked.
"""

from __future__ import annotations

import re
from typing import Any

# (method, path pattern) -> {key: the JSON type its value must have}
SHAPES: dict[tuple[str, str], dict[str, type]] = {
    ("GET", r"/v1/decision"): {"revision": int, "services": dict, "features": dict},
    ("GET", r"/v1/cluster"): {"members": list},
    ("GET", r"/v1/regions"): {"regions": list},
    ("GET", r"/v1/features"): {"features": dict},
    ("GET", r"/v1/intents"): {"intents": list, "intent_seq": int},
    ("POST", r"/v1/intents"): {"id": str, "seq": int},
    ("DELETE", r"/v1/intents/[^/]+"): {"removed": dict},
    ("GET", r"/v1/history"): {"entries": list},
    ("GET", r"/v1/observations"): {"observations": list},
    ("GET", r"/v1/weights/[^/]+"): {"weights": dict, "revision": int},
    ("GET", r"/v1/lbs"): {"lbs": list},
    ("GET", r"/v1/whoami"): {"name": str, "scope": str},
    ("POST", r"/v1/plan"): {"services": dict, "changes": list},
}

_JSON_NAMES: dict[type, str] = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "a number",
    bool: "true or false",
}


def problem(method: str, target: str, body: Any) -> str | None:
    """Why `body`, a successful answer to `method target`, is not an agent's answer; None if it may be."""
    path = target.split("?", 1)[0]
    shape = next((keys for (m, p), keys in SHAPES.items() if m == method and re.fullmatch(p, path)), None)
    if shape is None:
        return None
    if isinstance(body, str):
        return f"the body is not JSON: {_excerpt(body)}"
    if not isinstance(body, dict):
        return f"the body is not a JSON object: {_excerpt(repr(body))}"
    for key, kind in shape.items():
        value = body.get(key)
        if key not in body:
            return f"the body has no {key!r}"
        # bool is an int in Python; a JSON true is never a revision.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            return f"the body's {key!r} is not {_JSON_NAMES[kind]}"
    return None


def _excerpt(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return repr(flat[:limit] + ("..." if len(flat) > limit else ""))
