"""Given agents that serve their API over HTTPS, every client reaches them, and only those trusted.

A throwaway CA (`controlplane.testing.tls`) signs the agents' server certificate and a
client certificate. With server TLS, cpctl works when told the CA and says in one line
what is wrong when not, and `controlplane lb nginx` follows a failover and a recovery
over HTTPS. With mutual TLS, a client without a certificate, or with one from another
CA, is refused (cpctl and the SDK alike), and one with a good certificate works.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from controlplane.client.flags import FlagsClient
from controlplane.client.tls import client_context
from controlplane.testing.localcluster import LocalCluster
from controlplane.testing.tls import Certificates, make_certificates
from tests.acceptance.conftest import StartCluster, fast_config
from tests.acceptance.lb_fixtures import Nginx, backend_addresses, failover_and_recovery, lb_config
from tests.acceptance.test_lb_nginx import nginx_adapter

pytestmark = [pytest.mark.acceptance, pytest.mark.timeout(240)]

CPCTL = str(Path(sys.executable).with_name("cpctl"))


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "certs")


async def cpctl(
    cluster: LocalCluster, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`cpctl ARGS` against every agent (https URLs), in a thread: the backends keep answering."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CPCTL_")}
    environment.update(
        {
            "CPCTL_ENDPOINT": ",".join(a.url for a in cluster.agents.values()),
            "CPCTL_TOKEN": cluster.admin_token,
            "COLUMNS": "160",
            "NO_COLOR": "1",
            **(env or {}),
        }
    )
    return await asyncio.to_thread(
        subprocess.run,
        [CPCTL, *args, "--timeout", "10"],
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_line_failure(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert done.returncode == code, f"exit {done.returncode}: {done.stdout}{done.stderr}"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


async def test_cpctl_and_an_nginx_adapter_over_https(
    cluster: StartCluster, certs: Certificates, measure: Callable[[str], None], tmp_path: Path
) -> None:
    c = await cluster(lb_config(), tls=certs)
    assert all(a.url.startswith("https://") for a in c.agents.values())

    # Without the CA, the agents' certificate cannot be verified: one line, exit 3.
    done = await cpctl(c, "status")
    one_line_failure(done, 3, "cannot verify the agent's certificate", "--ca-file")

    # With it (option or environment), status works, and every member's view is read over https.
    done = await cpctl(c, "status", "-o", "json", "--ca-file", str(certs.ca_file))
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert all(isinstance(view, dict) for view in status["members"].values()), status["members"]
    done = await cpctl(c, "status", env={"CPCTL_CA_FILE": str(certs.ca_file)})
    assert done.returncode == 0, done.stderr

    # A load balancer adapter follows the decision, and reports, over https.
    nginx = Nginx(tmp_path, backend_addresses(c))
    await nginx.start()
    agents = [arg for a in c.agents.values() for arg in ("--agent", a.url)]
    tls = ("--ca-file", str(certs.ca_file))
    # The admin token outranks scope lb: the adapter's reports are taken.
    report = ("--name", "nginx-tls", "--token", c.admin_token, "--report-s", "1")
    adapter = nginx_adapter(tmp_path, agents, nginx, *tls, *report)
    try:
        adapter.start()
        await failover_and_recovery(c, nginx.url, adapter, measure, "nginx over https")
        first = next(iter(c.agents))

        async def reported() -> bool:
            status_code, _, lbs = await c.get(first, "/v1/lbs")
            return status_code == 200 and "nginx-tls" in json.dumps(lbs)

        await c.wait_for(reported, 30.0, "the adapter's report over https")
    finally:
        await adapter.stop()
        await nginx.stop()


async def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    cluster: StartCluster, certs: Certificates
) -> None:
    c = await cluster(fast_config(), tls=certs, mutual_tls=True)
    ca = ["--ca-file", str(certs.ca_file)]

    # cpctl: no certificate, or one from another CA, is refused in one line; a good one works.
    done = await cpctl(c, "status", *ca)
    one_line_failure(done, 3, "require a client certificate", "--cert-file")
    stranger = ["--cert-file", str(certs.stranger.cert_file), "--key-file", str(certs.stranger.key_file)]
    done = await cpctl(c, "status", *ca, *stranger)
    one_line_failure(done, 3, "require a client certificate")
    done = await cpctl(
        c,
        "status",
        *ca,
        env={"CPCTL_CERT_FILE": str(certs.client.cert_file), "CPCTL_KEY_FILE": str(certs.client.key_file)},
    )
    assert done.returncode == 0, done.stderr
    # A certificate without its key is a usage mistake, said before anything is sent.
    done = await cpctl(c, "status", *ca, "--cert-file", str(certs.client.cert_file))
    one_line_failure(done, 2, "--cert-file and --key-file together")

    # The SDK: a FlagsClient without a certificate gets nothing; with one, the decision.
    urls = [a.url for a in c.agents.values()]
    refused = FlagsClient(urls, wait_s=2.0, backoff_max_s=0.5, ssl=client_context(certs.ca_file))
    async with refused:
        assert not await refused.wait_for_revision(0, timeout_s=5.0)
        assert refused.decision is None and refused.stale
        assert refused._follower.last_error is not None
    trusted = FlagsClient(
        urls,
        wait_s=2.0,
        ssl=client_context(certs.ca_file, certs.client.cert_file, certs.client.key_file),
    )
    async with trusted:
        assert await trusted.wait_for_revision(0, timeout_s=30.0), trusted._follower.last_error
        assert trusted.weights("order"), trusted.decision


async def test_demo_serve_tls_prints_how_to_trust_its_ca(tmp_path: Path) -> None:
    """`controlplane demo --serve --tls`: HTTPS agents, and the lines to reach them work as printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane", "demo", "--serve", "--tls", "--random-ports",
        "--log-dir", str(tmp_path / "demo"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(120):
            async for raw in proc.stdout:
                lines.append(raw.decode(errors="replace").rstrip())
                if "Ctrl-C stops everything" in lines[-1]:
                    break
        text = "\n".join(lines)
        exports = dict(
            line.strip().removeprefix("export ").split("=", 1)
            for line in lines
            if line.strip().startswith("export CPCTL_")
        )
        assert exports["CPCTL_ENDPOINT"].startswith("https://127.0.0.1:"), text
        first = exports["CPCTL_ENDPOINT"].split(",")[0]
        assert f"curl -s --cacert {exports['CPCTL_CA_FILE']} {first}/v1/decision" in text
        environment = {k: v for k, v in os.environ.items() if not k.startswith("CPCTL_")}
        done = await asyncio.to_thread(
            subprocess.run,
            [CPCTL, "status"],
            env={**environment, **exports, "NO_COLOR": "1"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(30):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
