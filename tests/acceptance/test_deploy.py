"""What ships in deploy/ is valid for the tools that will read it, and agrees with the code.

- Prometheus: `promtool check rules` and `promtool test rules` (each alert fires on the
  series that should trigger it); every metric a rule or a dashboard panel queries is
  exported by an agent (the metrics registry, and a live agent's /metrics); every
  dashboard query is valid PromQL.
- Kubernetes: the manifests parse; the embedded config passes `parse_settings`; agent
  ids, regions, DNS names, ports, secret references, probes and mounts agree with it.
- systemd: `systemd-analyze verify` finds nothing to say; the command lines parse with
  the real CLI; the hardening is on.
- HAProxy and nginx examples: `haproxy -c`; the nginx template rendered by the adapter's
  own code passes `nginx -t`; the map files load and name servers that exist.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from controlplane.cli import main as cli_main
from controlplane.config import SecretRef, parse_settings
from controlplane.formats import nginx_upstream
from controlplane.lb.mapfile import load_haproxy_map, load_nginx_map
from controlplane.lb.nginx import render_template
from controlplane.metrics import Metrics
from controlplane.testing.localcluster import free_port
from tests.acceptance.lb_fixtures import StartCluster, lb_config, require_binary

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "controlplane-alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "controlplane-alerts_test.yml"
# The drill alert's tests span days: a file of their own, evaluated every 5 m.
DRILL_ALERT_TESTS = DEPLOY / "prometheus" / "controlplane-alerts-drills_test.yml"
DASHBOARD = DEPLOY / "grafana" / "controlplane-dashboard.json"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
CONTROLPLANE_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "controlplane"

METRIC = re.compile(r"\b((?:controlplane|process)_[a-z0-9_]+)\b")
# Names a query may use that the agents do not export: Prometheus' own.
NOT_OURS = {"up"}


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False, timeout=60)


# -- metric names ----------------------------------------------------------------------


def exported_names(families: list[tuple[str, str]]) -> set[str]:
    """Sample names a scrape can contain, from (family name, type) pairs."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for name, kind in families:
        base = name.removesuffix("_total") if kind == "counter" else name
        names.update(base + s for s in suffixes.get(kind, ("",)))
    return names


def registry_names() -> set[str]:
    registry = Metrics("deploy-test").registry
    return exported_names([(m.name, m.type) for m in registry.collect()])


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def dashboard_queries() -> list[str]:
    d = dashboard()
    exprs = [t["expr"] for p in panels(d["panels"]) for t in p.get("targets", [])]
    exprs += [a["expr"] for a in d.get("annotations", {}).get("list", []) if "expr" in a]
    return exprs


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, as Prometheus would get it."""
    return expr.replace("$__rate_interval", "1m").replace("$job", ".+").replace("$service", ".+")


def test_promtool_checks_and_tests_the_alert_rules() -> None:
    promtool = require_binary("promtool", "prometheus")
    check = run([promtool, "check", "rules", str(ALERTS)])
    assert check.returncode == 0, check.stdout + check.stderr
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert f"SUCCESS: {len(rules)} rules found" in check.stdout, check.stdout
    tests = run([promtool, "test", "rules", ALERT_TESTS.name, DRILL_ALERT_TESTS.name], cwd=ALERT_TESTS.parent)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    names = {r["alert"] for r in rules}
    for wanted in (
        "ControlplaneAgentDown",
        "ControlplaneNoQuorum",
        "ControlplaneDecisionStale",
        "ControlplaneRegionDown",
        "ControlplaneFailoverBudgetExceeded",
        "ControlplaneFeaturesDegraded",
        "ControlplanePanic",
        "ControlplaneClockSkew",
        "ControlplaneProbesInconclusive",
        "ControlplaneLoadBalancerBehind",
        "ControlplaneLoadBalancerFailing",
        "ControlplaneNoPassingDrill",
    ):
        assert wanted in names


def test_every_dashboard_query_is_promql_and_every_metric_is_exported(tmp_path: Path) -> None:
    promtool = require_binary("promtool", "prometheus")
    d = dashboard()
    assert d["uid"] and d["title"] and d["panels"]
    ids = [p["id"] for p in panels(d["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = dashboard_queries()
    assert len(exprs) >= 25
    # promtool parses every query when given them as recording rules.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"q:{i}", "expr": as_promql(e)} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    check = run([promtool, "check", "rules", str(path)])
    assert check.returncode == 0, check.stdout + check.stderr

    known = registry_names()
    for expr in exprs + alert_queries():
        for name in METRIC.findall(expr):
            assert name in known, f"{name} (in {expr!r}) is not exported by controlplane.metrics"
    queried = {n for e in exprs for n in METRIC.findall(e)}
    # The dashboard shows every family the agents export (nothing is left unseen).
    for family in Metrics("x").registry.collect():
        assert any(q.startswith(family.name) for q in queried), f"{family.name} is on no panel"


async def test_a_live_agent_exports_every_metric_queried(cluster: StartCluster) -> None:
    c = await cluster(lb_config())
    agent = next(iter(c.agents.values()))
    async with aiohttp.ClientSession() as s, s.get(f"{agent.url}/metrics") as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    families = [(f.name, f.type) for f in text_string_to_metric_families(text)]
    live = exported_names(families)
    for expr in dashboard_queries() + alert_queries():
        for name in METRIC.findall(expr):
            assert name in live, f"{name} (in {expr!r}) is not in {agent.id}'s /metrics"


# -- Kubernetes ------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests() if d["kind"] == kind]


def test_kubernetes_manifests_agree_with_the_embedded_config() -> None:
    kustomization = of_kind("Kustomization")[0]
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}

    [configmap] = of_kind("ConfigMap")
    settings = parse_settings(yaml.safe_load(configmap["data"]["agent.yaml"]), "configmap agent.yaml")
    agents = {a.id: a for a in settings.cluster.agents}
    [secret] = of_kind("Secret")
    secret_keys = set(secret["stringData"])
    headless = next(s for s in of_kind("Service") if s["spec"].get("clusterIP") == "None")
    assert headless["spec"]["publishNotReadyAddresses"] is True, "peers must resolve before they are ready"

    # Every environment variable the config reads a secret from.
    refs: list[SecretRef | None] = [
        settings.cluster.secret,
        settings.model.auth.admin_token,
        settings.model.auth.read_token,
    ]
    secret_envs = {r.env for r in refs if r is not None and r.env is not None}
    assert secret_envs

    statefulsets = of_kind("StatefulSet")
    assert {s["spec"]["template"]["metadata"]["labels"]["controlplane/region"] for s in statefulsets} == set(
        settings.regions
    ), "one agent StatefulSet per region"
    seen_ids = set()
    for sts in statefulsets:
        name, spec = sts["metadata"]["name"], sts["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        assert headless["spec"]["selector"].items() <= labels.items()
        [container] = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        agent_id = env["CONTROLPLANE_AGENT_ID"]["value"]
        assert agent_id in agents, f"{name}: {agent_id} is not in cluster.agents"
        seen_ids.add(agent_id)
        agent = agents[agent_id]
        assert agent.region == labels["controlplane/region"], name
        affinity = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert affinity["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == [agent.region], name

        dns = f"{name}-0.{spec['serviceName']}.{sts['metadata']['namespace']}.svc.cluster.local"
        assert spec["serviceName"] == headless["metadata"]["name"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert agent.raft == f"{dns}:{ports['raft']}", name
        assert agent.http == f"{dns}:{ports['http']}", name

        for var in secret_envs:
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_keys, (name, var)

        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}

        config_arg = container["args"][container["args"].index("-c") + 1]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert str(Path(config_arg).parent) == mounts["config"], name
        assert Path(config_arg).name in configmap["data"]
        assert mounts["data"] == str(settings.model.data_dir), name
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert seen_ids == set(agents), "every agent of the config runs somewhere"


# -- systemd ---------------------------------------------------------------------------


def unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text().replace("\\\n", " "))
    return parser


def test_systemd_units_verify_and_their_command_lines_parse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    analyze = require_binary("systemd-analyze", "systemd")
    units = sorted(SYSTEMD.glob("*.service"))
    assert {u.name for u in units} == {
        "controlplane-agent.service",
        "controlplane-lb-haproxy.service",
        "controlplane-lb-nginx.service",
    }
    monkeypatch.setenv("CONTROLPLANE_AGENTS", "http://127.0.0.1:1")
    for path in units:
        # Verify against the installed binary (the unit names where a package puts it).
        copy = tmp_path / path.name
        copy.write_text(path.read_text().replace("/opt/controlplane/bin/controlplane", str(CONTROLPLANE_BIN)))
        verify = run([analyze, "verify", str(copy)])
        assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), (
            path.name,
            verify.stdout + verify.stderr,
        )

        service = unit(path)["Service"]
        for key, value in {
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "Restart": "on-failure",
        }.items():
            assert service.get(key) == value, f"{path.name}: {key}={service.get(key)}"
        assert service.get("DynamicUser") == "yes" or service.get("User"), path.name
        assert "AF_INET" in service["RestrictAddressFamilies"], path.name
        assert service["EnvironmentFile"].startswith("/etc/controlplane/"), path.name

        argv = shlex.split(service["ExecStart"])
        assert argv[0] == "/opt/controlplane/bin/controlplane"
        # The real CLI accepts the command line (options exist, required ones given).
        ctx = cli_main.make_context("controlplane", argv[1:])
        with ctx:
            sub = cli_main.get_command(ctx, argv[1])
            assert sub is not None
            if argv[1] == "lb":
                sub_ctx = sub.make_context("lb", argv[2:], parent=ctx)
                leaf = sub.get_command(sub_ctx, argv[2])  # type: ignore[attr-defined]
                leaf.make_context(argv[2], argv[3:], parent=sub_ctx)
            else:
                sub.make_context(argv[1], argv[2:], parent=ctx)

    agent = unit(SYSTEMD / "controlplane-agent.service")["Service"]
    assert agent["StateDirectory"] == "controlplane"
    assert "/var/lib/controlplane" in agent["ReadWritePaths"]


# -- HAProxy and nginx examples --------------------------------------------------------


def test_haproxy_example_is_valid_and_the_map_names_its_servers() -> None:
    haproxy = require_binary("haproxy", "haproxy")
    cfg = DEPLOY / "haproxy" / "haproxy.cfg"
    check = run([haproxy, "-c", "-f", str(cfg)])
    assert check.returncode == 0, check.stdout + check.stderr
    assert re.search(r"stats socket \S+ .*level admin", cfg.read_text())
    servers: dict[str, set[str]] = {}
    backend = None
    for line in cfg.read_text().splitlines():
        words = line.split()
        if words[:1] == ["backend"]:
            backend = words[1]
            servers[backend] = set()
        elif words[:1] == ["server"] and backend:
            servers[backend].add(words[1])
    mapping = load_haproxy_map(DEPLOY / "haproxy" / "controlplane-map.yaml")
    for service, regions in mapping.items():
        for region, (be, srv) in regions.items():
            assert srv in servers.get(be, set()), f"{service}/{region}: {be}/{srv} not in haproxy.cfg"


def test_nginx_example_rendered_by_the_adapter_passes_nginx_t(tmp_path: Path) -> None:
    nginx = require_binary("nginx", "nginx")
    upstreams = load_nginx_map(DEPLOY / "nginx" / "controlplane-map.yaml")
    decision = {
        "revision": 9,
        "services": {
            s: {
                "cn-east": {"weight": 0, "state": "down"},
                "cn-south": {"weight": 55, "state": "healthy"},
                "cn-north": {"weight": 45, "state": "degraded"},
            }
            for s in upstreams
        },
    }
    blocks = {}
    for service, up in upstreams.items():
        local = {r: f"127.0.0.1:{free_port()}" for r in up.addresses}  # names would need DNS
        blocks[service] = nginx_upstream(
            decision, service, local, name=up.upstream, server_params=up.server_params
        )
    rendered = render_template((DEPLOY / "nginx" / "upstreams.conf.template").read_text(), blocks)
    assert "server 127.0.0.1" in rendered and " down;" in rendered
    (tmp_path / "upstreams.conf").write_text(rendered)
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    conf = conf.replace("/etc/nginx/controlplane/upstreams.conf", str(tmp_path / "upstreams.conf"))
    conf = conf.replace("/var/log/nginx", str(tmp_path)).replace(
        "/run/nginx.pid", str(tmp_path / "nginx.pid")
    )
    conf = re.sub(r"listen (\d+);", lambda m: f"listen 127.0.0.1:{free_port()};", conf)
    (tmp_path / "nginx.conf").write_text(conf)
    check = run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "e.log")]
    )
    assert check.returncode == 0, check.stdout + check.stderr
