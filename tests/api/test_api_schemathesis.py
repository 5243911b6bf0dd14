"""schemathesis fuzzes a live agent from its own /openapi.json: no 5xx, no answer off-schema."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from controlplane.testing.inprocess import InProcessCluster
from tests.api.conftest import api_config, api_settings


async def test_schemathesis_finds_no_server_errors_or_schema_breaks(tmp_path: Path) -> None:
    config = api_config()
    config["cluster"]["agents"] = config["cluster"]["agents"][:1]
    # Short blocking waits so fuzzed ?index=&wait= requests come back quickly.
    config["api"] = {"max_wait_s": 1.0}
    async with InProcessCluster(api_settings(config)) as c:
        await c.settled()
        base = next(iter(c.agents.values())).url
        cmd = [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{base}/openapi.json",
            "-H",
            f"Authorization: Bearer {c.admin_token}",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance,response_headers_conformance",
            "--max-examples",
            "15",
            "--seed",
            "1",
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--exclude-path",
            "/v1/watch",
        ]
        result = await asyncio.to_thread(
            subprocess.run, cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        assert "passed" in result.stdout
        status, _, _ = await c.get(next(iter(c.agents)), "/readyz")
        assert status == 200, "the agent is still serving after the fuzzing"
