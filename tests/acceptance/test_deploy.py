"""What ships in deploy/ is valid for the tools that will read it, and agrees with the code.

- Prometheus: `promtool check rules` and `promtool test rules` (each alert fires on the
  series that should trigger it, and stays quiet on some that should not); every alert
  links to its section of deploy/runbook.md, which names the metrics it reads; every
  metric a rule or a dashboard panel queries is exported by an agent (the metrics
  registry, and a live agent's /metrics); every dashboard query is valid PromQL.
- Kubernetes: the kustomization, rendered here (no kustomize binary), passes
  `kubernetes-validate --strict`, which rejects a broken copy; the Secret comes from
  git-ignored files, never placeholders; the embedded config passes `parse_settings`;
  agent ids, regions, DNS names, ports, secret references, probes, mounts, image and uid
  agree with it.
- Docker: the Dockerfile, read as text (no daemon here), is multi-stage on a 3.11 slim
  base, runs as a non-root user, has no compiler in its last stage and runs
  `controlplane`; the wheel it installs builds from exactly what it copies.
- systemd: `systemd-analyze verify` finds nothing to say; the command lines parse with
  the real CLI; the hardening is on.
- HAProxy and nginx examples: `haproxy -c`; the nginx template rendered by the adapter's
  own code passes `nginx -t`; the map files load and name servers that exist.
"""

from __future__ import annotations

import base64
import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from controlplane.cli import main as cli_main
from controlplane.config import SecretRef, parse_settings
from controlplane.formats import nginx_upstream
from controlplane.lb.mapfile import load_haproxy_map, load_nginx_map
from controlplane.lb.nginx import render_template
from controlplane.metrics import Metrics
from controlplane.testing.ports import free_port
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


RUNBOOK = DEPLOY / "runbook.md"
RUNBOOK_URL = "https://github.com/example/controlplane/blob/main/deploy/runbook.md"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation gone, - for spaces."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_sections() -> dict[str, str]:
    """Anchor -> the section's text (up to the next heading of the same or a higher level)."""
    sections: dict[str, str] = {}
    anchor = None
    for line in RUNBOOK.read_text().splitlines():
        heading = re.match(r"#{1,2} (.+)", line)
        if heading:
            anchor = github_anchor(heading.group(1))
            sections[anchor] = ""
        elif anchor is not None:
            sections[anchor] += line + "\n"
    return sections


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_links_to_its_runbook_section_and_the_section_names_its_metrics() -> None:
    sections = runbook_sections()
    rules = alert_rules()
    for rule in rules:
        name = rule["alert"]
        url = rule["annotations"].get("runbook_url", "")
        base, _, anchor = url.partition("#")
        assert base == RUNBOOK_URL, f"{name}: runbook_url {url!r} is not under {RUNBOOK_URL}"
        assert anchor == github_anchor(name), f"{name}: runbook_url points to #{anchor}"
        assert anchor in sections, f"{name}: deploy/runbook.md has no heading for #{anchor}"
        text = sections[anchor]
        for part in ("**Means**", "**Check**", "**Do**"):
            assert part in text, f"runbook section {name} lacks {part}"
        assert "cpctl " in text or "curl " in text, f"runbook section {name} gives no command to run"
        for metric in METRIC.findall(rule["expr"]):
            assert metric.removesuffix("_bucket") in text, f"runbook section {name} does not name {metric}"
    # No section for an alert that is gone.
    alert_anchors = {github_anchor(r["alert"]) for r in rules}
    stale = {a for a in sections if re.fullmatch(r"controlplane\w+", a)} - alert_anchors
    assert not stale, f"runbook sections for alerts that do not exist: {stale}"


def test_every_alert_has_a_promtool_case_that_fires_it_and_one_that_does_not() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in (ALERT_TESTS, DRILL_ALERT_TESTS):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts that no promtool case makes fire"
    assert names - quiet == set(), "alerts that no promtool case shows quiet"
    assert (fires | quiet) - names == set(), "promtool cases for alerts that do not exist"


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

# The version the manifests are validated against: a recent one that kubernetes-validate
# ships schemas for (it picks the newest schema not newer than this).
KUBERNETES_VERSION = "1.33"
# What the operator creates before `kubectl apply -k` (deploy/README.md); the tests use
# stand-ins of the right strength (the agents refuse short or placeholder secrets).
SECRET_FILES = ("cluster-secret", "admin-token", "read-token")
# Kinds that live outside any namespace, which kustomize's `namespace:` leaves alone.
CLUSTER_SCOPED = {"Namespace"}


class KustomizeError(Exception):
    """What `kustomize build` would refuse (a missing file of a secretGenerator, ...)."""


def kustomization(directory: Path = KUBERNETES) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return data


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build directory`, for the parts of kustomize that this one uses.

    No kubectl or kustomize binary here: the resources are loaded, the secretGenerator's
    files read (a missing one is an error, as it is for kustomize), then the namespace and
    the `images:` entries applied. Anything else in the kustomization is refused, so that
    a new feature there cannot pass the tests unrendered.
    """
    k = kustomization(directory)
    known = {"apiVersion", "kind", "namespace", "resources", "secretGenerator", "generatorOptions", "images"}
    if set(k) - known:
        raise KustomizeError(f"this renderer does not know {sorted(set(k) - known)}")
    docs: list[dict[str, Any]] = []
    for name in k["resources"]:
        docs.extend(d for d in yaml.safe_load_all((directory / name).read_text()) if d is not None)
    options = k.get("generatorOptions", {})
    for gen in k.get("secretGenerator", []):
        data = {}
        for entry in gen["files"]:
            key, _, path = entry.rpartition("=")
            source = directory / path
            if not source.is_file():
                raise KustomizeError(f"evalsymlink failure on '{source}': no such file or directory")
            data[key or source.name] = base64.b64encode(source.read_bytes()).decode()
        if not options.get("disableNameSuffixHash"):
            raise KustomizeError("a name hash suffix would not match the references in agents.yaml")
        labels = {**options.get("labels", {}), **gen.get("options", {}).get("labels", {})}
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": gen["name"], "labels": labels},
                "type": gen.get("type", "Opaque"),
                "data": data,
            }
        )
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED and "namespace" in k:
            doc["metadata"]["namespace"] = k["namespace"]
    images = {i["name"]: i for i in k.get("images", [])}
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            image = images.get(container["image"].split(":")[0].split("@")[0])
            if image is not None:
                name = image.get("newName", image["name"])
                tag = f"@{image['digest']}" if "digest" in image else f":{image.get('newTag', 'latest')}"
                container["image"] = name + tag
    return docs


@pytest.fixture
def kubernetes_dir(tmp_path: Path) -> Path:
    """A copy of deploy/kubernetes with the secret files an operator would create."""
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, tree, ignore=shutil.ignore_patterns("secrets"))
    (tree / "secrets").mkdir()
    for name in SECRET_FILES:
        (tree / "secrets" / name).write_text(f"test-{name}-" + "0123456789abcdef" * 2)
    return tree


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_kubernetes_manifests_agree_with_the_embedded_config(kubernetes_dir: Path) -> None:
    listed = set(kustomization()["resources"])
    assert listed == {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    docs = render_kustomization(kubernetes_dir)

    [configmap] = of_kind(docs, "ConfigMap")
    settings = parse_settings(yaml.safe_load(configmap["data"]["agent.yaml"]), "configmap agent.yaml")
    agents = {a.id: a for a in settings.cluster.agents}
    [secret] = of_kind(docs, "Secret")
    secret_keys = set(secret["data"])
    headless = next(s for s in of_kind(docs, "Service") if s["spec"].get("clusterIP") == "None")
    assert headless["spec"]["publishNotReadyAddresses"] is True, "peers must resolve before they are ready"

    # Every environment variable the config reads a secret from.
    refs: list[SecretRef | None] = [
        settings.cluster.secret,
        settings.model.auth.admin_token,
        settings.model.auth.read_token,
    ]
    secret_envs = {r.env for r in refs if r is not None and r.env is not None}
    assert secret_envs

    statefulsets = of_kind(docs, "StatefulSet")
    assert {s["spec"]["template"]["metadata"]["labels"]["controlplane/region"] for s in statefulsets} == set(
        settings.regions
    ), "one agent StatefulSet per region"
    seen_ids = set()
    used_keys = set()
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
            used_keys.add(ref["key"])

        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}

        config_arg = container["args"][container["args"].index("-c") + 1]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert str(Path(config_arg).parent) == mounts["config"], name
        assert Path(config_arg).name in configmap["data"]
        assert mounts["data"] == str(settings.model.data_dir), name
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        # The image as kustomization.yaml's `images:` entry sets it, run as the image's user.
        image = kustomization()["images"][0]
        assert container["image"] == f"{image['newName']}:{image['newTag']}", name
        assert pod["securityContext"]["runAsUser"] == dockerfile_uid(), name
    assert seen_ids == set(agents), "every agent of the config runs somewhere"
    assert used_keys == secret_keys == set(SECRET_FILES), "the Secret holds what the agents read, no more"


def test_the_secret_comes_from_git_ignored_files_and_no_placeholder_is_applied(tmp_path: Path) -> None:
    k = kustomization()
    assert not (KUBERNETES / "secret.yaml").exists()
    assert not any(
        d.get("kind") == "Secret"
        for n in k["resources"]
        for d in yaml.safe_load_all((KUBERNETES / n).read_text())
        if d
    ), "a Secret among the resources would overwrite the real one"
    [gen] = k["secretGenerator"]
    files = [entry.rpartition("=")[2] for entry in gen["files"]]
    assert sorted(Path(f).name for f in files) == sorted(SECRET_FILES)
    repo = KUBERNETES.parents[1]
    for f in files:
        path = (KUBERNETES / f).relative_to(repo)
        ignored = run(["git", "check-ignore", "-q", "--no-index", str(path)], cwd=repo)
        assert ignored.returncode == 0, f"{path} is not git-ignored"
    # Without the files there is nothing to apply, rather than placeholders.
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, tree, ignore=shutil.ignore_patterns("secrets"))
    with pytest.raises(KustomizeError, match="secrets/"):
        render_kustomization(tree)
    readme = (DEPLOY / "README.md").read_text()
    for f in files:
        assert f in readme, f"deploy/README.md does not say to create {f}"


def kubernetes_errors(doc: dict[str, Any]) -> str | None:
    """kubernetes-validate --strict's complaint about one manifest, or None."""
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}"
    return None


def test_every_rendered_manifest_passes_kubernetes_validate_strict(kubernetes_dir: Path) -> None:
    docs = render_kustomization(kubernetes_dir)
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "Secret", "Service", "StatefulSet"}
    problems = [p for p in map(kubernetes_errors, docs) if p]
    assert not problems, "\n".join(problems)
    assert all(d["metadata"].get("namespace") == "controlplane" for d in docs if d["kind"] != "Namespace")


def test_kubernetes_validate_rejects_a_broken_manifest(kubernetes_dir: Path) -> None:
    docs = render_kustomization(kubernetes_dir)
    sts = deepcopy(of_kind(docs, "StatefulSet")[0])
    assert kubernetes_errors(sts) is None
    # A misspelt field: only --strict sees it (the API server would drop it silently).
    typo = deepcopy(sts)
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/healthz"}}
    assert "livenesProbe" in (kubernetes_errors(typo) or "")
    # A wrong type.
    wrong = deepcopy(sts)
    wrong["spec"]["replicas"] = "one"
    assert "replicas" in (kubernetes_errors(wrong) or "")
    # A required field missing.
    nameless = deepcopy(sts)
    del nameless["spec"]["template"]["spec"]["containers"][0]["name"]
    assert "name" in (kubernetes_errors(nameless) or "")
    # And the CLI says so with a non-zero exit, for someone checking by hand.
    cli = Path(sys.executable).parent / "kubernetes-validate"
    path = kubernetes_dir / "broken.yaml"
    path.write_text(yaml.safe_dump(typo))
    result = run([str(cli), "--strict", "-k", KUBERNETES_VERSION, str(path)])
    assert result.returncode != 0 and "livenesProbe" in result.stdout + result.stderr, result.stdout


# -- Docker ----------------------------------------------------------------------------
# No Docker daemon on the test machines: the Dockerfile is checked as text, and the
# wheel it installs is built here from exactly what it copies.

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
REPO = DEPLOY.parent
COMPILERS = re.compile(
    r"\b(build-essential|gcc|g\+\+|clang|make|cmake|python3?-dev|libc6?-dev|rustc|cargo)\b"
)


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def dockerfile_uid() -> int:
    [user] = [args for word, args in dockerfile_stages()[-1] if word == "USER"]
    return int(user.split(":")[0])


def test_dockerfile_is_multi_stage_slim_311_non_root_without_compilers() -> None:
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for w, a in instructions if w == "ARG" and "=" in a)
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a build stage and a runtime stage"
    for stage in stages:
        base = stage[0][1].split()[0]
        base = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], base)
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base

    build_name = stages[0][0][1].split()[-1]
    runtime = stages[-1]
    runs = [a for w, a in runtime if w == "RUN"]
    # The wheels come from the build stage and nowhere else; no source in the image.
    install = next(r for r in runs if "pip install" in r)
    assert f"from={build_name}" in install and "--no-index" in install and "controlplane" in install, install
    assert not [a for w, a in runtime if w in {"COPY", "ADD"} and f"--from={build_name}" not in a]
    for run_args in runs:
        assert not ("apt-get" in run_args and COMPILERS.search(run_args)), run_args
    users = [a for w, a in runtime if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the runtime stage runs as root"
    assert dockerfile_uid() > 0
    [entrypoint] = [a for w, a in runtime if w == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["controlplane"]
    [cmd] = [a for w, a in runtime if w == "CMD"]
    ctx = cli_main.make_context("controlplane", json.loads(cmd))
    with ctx:
        assert cli_main.get_command(ctx, json.loads(cmd)[0]) is not None


def test_the_wheel_the_image_installs_builds_from_what_the_dockerfile_copies(tmp_path: Path) -> None:
    # The build context as Dockerfile.dockerignore leaves it, then the stage's COPY lines.
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    src = tmp_path / "src"
    src.mkdir()
    for word, args in dockerfile_stages()[0]:
        if word == "COPY":
            *sources, _dest = args.split()
            for name in sources:
                assert name in allowed, f"COPY {name}: excluded by Dockerfile.dockerignore"
                if (REPO / name).is_dir():
                    shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(REPO / name, src / name)
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "w"), str(src)]
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (tmp_path / "w").glob("controlplane-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "controlplane = controlplane.cli:main" in entry_points
    assert "controlplane/api/ui/index.html" in names, "the dashboard's files are in the wheel"
    assert "controlplane/testing/demo.yaml" in names


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
