"""`api.tls`: parsed, its files checked at start-up and by check-config, one line per problem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.client.tls import TlsFilesError, client_context
from controlplane.config import load_settings
from controlplane.daemon import preflight
from controlplane.errors import ConfigError
from controlplane.testing.tls import Certificates, make_certificates

BASE = """
cluster:
  secret: {{env: CP_TLS_CLUSTER}}
  agents:
    - {{id: a1, region: cn-east, raft: "127.0.0.1:7701", http: "127.0.0.1:8701"}}
regions:
  cn-east:
    capacity_rps: 100
    services:
      order: {{targets: ["http://127.0.0.1:9101/healthz"]}}
auth:
  admin_token: {{env: CP_TLS_ADMIN}}
api:
  tls:
{tls}
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(autouse=True)
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CP_TLS_CLUSTER", "cluster-secret-0123456789")
    monkeypatch.setenv("CP_TLS_ADMIN", "admin-secret-0123456789")


def write(tmp_path: Path, **tls: object) -> Path:
    lines = "\n".join(f"    {key}: {value}" for key, value in tls.items())
    path = tmp_path / "agent.yaml"
    path.write_text(BASE.format(tls=lines), encoding="utf-8")
    return path


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
        check=False,
    )


def test_a_good_pair_with_a_client_ca_passes_and_says_https(tmp_path: Path, certs: Certificates) -> None:
    server = certs.server
    path = write(tmp_path, cert_file=server.cert_file, key_file=server.key_file, client_ca_file=certs.ca_file)
    settings = load_settings(path)
    _, _, context = preflight(settings)
    assert context is not None
    assert settings.agent_url(settings.cluster.agents[0]) == "https://127.0.0.1:8701"
    done = check_config(path)
    assert done.returncode == 0, done.stderr
    assert "api https with client certificates" in done.stdout


def test_cert_and_key_go_together(tmp_path: Path, certs: Certificates) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(write(tmp_path, cert_file=certs.server.cert_file))
    assert e.value.problems == ["api.tls.key_file: required but missing"]


def test_check_config_names_a_missing_key_file(tmp_path: Path, certs: Certificates) -> None:
    missing = tmp_path / "nowhere.key"
    done = check_config(write(tmp_path, cert_file=certs.server.cert_file, key_file=missing))
    assert done.returncode == 2, done
    assert f"  api.tls.key_file: cannot read (No such file or directory) (got '{missing}')" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_config_names_a_key_that_does_not_match(tmp_path: Path, certs: Certificates) -> None:
    done = check_config(write(tmp_path, cert_file=certs.server.cert_file, key_file=certs.client.key_file))
    assert done.returncode == 2, done
    problems = [line.strip() for line in done.stderr.splitlines()[1:]]
    wrong = certs.client.key_file
    assert problems == [
        f"api.tls.key_file: not the key of the certificate in api.tls.cert_file (got '{wrong}')"
    ], done.stderr


def test_every_bad_file_is_reported_at_once(tmp_path: Path, certs: Certificates) -> None:
    settings = load_settings(
        write(
            tmp_path,
            cert_file=certs.server.key_file,  # a key, not a certificate
            key_file=certs.server.key_file,
            client_ca_file=tmp_path / "no-ca.crt",
        )
    )
    with pytest.raises(ConfigError) as e:
        preflight(settings)
    assert [p.split(":")[0] for p in e.value.problems] == ["api.tls.client_ca_file"]
    (tmp_path / "no-ca.crt").write_text("not a certificate\n")
    with pytest.raises(ConfigError) as e:
        preflight(settings)
    assert [p.split(":")[0] for p in e.value.problems] == ["api.tls.cert_file", "api.tls.client_ca_file"]


def test_client_context_names_the_file_that_is_wrong(tmp_path: Path, certs: Certificates) -> None:
    with pytest.raises(TlsFilesError, match=r"CA file .*: no such file"):
        client_context(tmp_path / "none.crt")
    with pytest.raises(TlsFilesError, match="is not the key of certificate"):
        client_context(certs.ca_file, certs.client.cert_file, certs.server.key_file)
    with pytest.raises(TlsFilesError, match="without its certificate"):
        client_context(certs.ca_file, key_file=certs.client.key_file)
