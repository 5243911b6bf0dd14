"""Check a configuration's PromQL with `promtool`, Prometheus' own parser, when it is installed.

The configuration checks queries lexically (`controlplane.promql`) whenever it loads, so
the agent never depends on an external binary to start. `controlplane check-config`
goes further when `promtool` (Debian package `prometheus`) is on the PATH: every query
becomes a recording rule in a temporary rules file, `promtool check rules` parses them
all with the real grammar (unknown functions, a range where an instant vector belongs,
a missing `by` clause), and each error comes back at its field path, such as
`regions.cn-east.services.order.targets[0].prometheus.down.query: promtool: 1:5: parse
error: unknown function with name "nosuchfunc"`.

Bounded: one `promtool` process, at most `TIMEOUT_S`, its output read in full (it is
one line per query at most).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from controlplane.config import Settings

TIMEOUT_S = 30.0
_RECORD = "controlplane_check_"
_ERROR_RE = re.compile(r'"' + _RECORD + r'(\d+)": (?:could not parse expression: )?(.*)$')


def find_promtool(explicit: str | None = None) -> str | None:
    """The promtool to use: `explicit` if given, else the one on PATH; None if there is none."""
    if explicit:
        return explicit
    return shutil.which("promtool")


def queries(settings: Settings) -> list[tuple[str, str]]:
    """Every PromQL query in the settings, as (field path, query)."""
    out = []
    for region, rc in settings.regions.items():
        for service, sc in rc.services.items():
            for i, t in enumerate(sc.targets):
                p = t.prometheus
                if p is None:
                    continue
                where = f"regions.{region}.services.{service}.targets[{i}].prometheus"
                out.append((f"{where}.down.query", p.down.query))
                if p.slow is not None:
                    out.append((f"{where}.slow.query", p.slow.query))
                if p.utilization is not None:
                    out.append((f"{where}.utilization.query", p.utilization.query))
    return out


def check_queries(found: list[tuple[str, str]], promtool: str) -> list[str]:
    """Problems promtool finds, each at its field path; [] when it accepts every query."""
    if not found:
        return []
    rules = {
        "groups": [
            {
                "name": "controlplane-check-config",
                "rules": [{"record": f"{_RECORD}{i}", "expr": q} for i, (_, q) in enumerate(found)],
            }
        ]
    }
    with tempfile.TemporaryDirectory(prefix="controlplane-promtool-") as tmp:
        path = Path(tmp) / "rules.yaml"
        path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
        try:
            done = subprocess.run(
                [promtool, "check", "rules", str(path)],
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=False,
            )
        except FileNotFoundError:
            return [f"promtool: not found at {promtool}"]
        except subprocess.TimeoutExpired:
            return [f"promtool: no answer within {TIMEOUT_S:g} s"]
    if done.returncode == 0:
        return []
    problems = []
    for line in (done.stdout + "\n" + done.stderr).splitlines():
        match = _ERROR_RE.search(line)
        if match is not None and int(match.group(1)) < len(found):
            problems.append(f"{found[int(match.group(1))][0]}: promtool: {match.group(2).strip()}")
    if not problems:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        problems.append(f"promtool: check rules failed (exit {done.returncode}): {' / '.join(tail)}")
    return problems
