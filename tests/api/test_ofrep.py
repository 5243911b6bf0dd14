"""OFREP on in-process agents: the protocol's shapes, ETags, errors and tokens, and the real
`openfeature-sdk` with the generic `openfeature-provider-ofrep` and with our provider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from openfeature import api as openfeature
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason

from controlplane.agent.node import Tokens
from controlplane.client import FlagsClient
from controlplane.client.openfeature_provider import ControlplaneProvider
from controlplane.testing.inprocess import ADMIN_TOKEN, InProcessCluster
from tests.api.conftest import api_config, api_settings

pytestmark = [pytest.mark.asyncio(loop_scope="module")]

READ_TOKEN = "ofrep-read-token"
FEATURES = {"recommendations", "comments", "likes", "checkout"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def agents() -> AsyncIterator[InProcessCluster]:
    async with InProcessCluster(api_settings(api_config()), tokens=Tokens(ADMIN_TOKEN, READ_TOKEN)) as c:
        await c.settled(quiet_s=0.5)
        yield c


def base(c: InProcessCluster) -> str:
    return next(iter(c.agents.values())).url


async def post(
    c: InProcessCluster,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, Mapping[str, str], Any]:
    sent = {"Authorization": f"Bearer {READ_TOKEN}", **(headers or {})}
    async with (
        aiohttp.ClientSession() as s,
        s.post(base(c) + path, json=body if raw is None else None, data=raw, headers=sent) as r,
    ):
        text = await r.text()
        return r.status, r.headers.copy(), (await r.json(content_type=None)) if text else None


async def set_feature(c: InProcessCluster, name: str, enabled: bool) -> int:
    status, body = await c.post(
        next(iter(c.agents)),
        "/v1/intents",
        {"kind": "feature", "name": name, "enabled": enabled, "reason": "t"},
    )
    assert status in (201, 202), body
    revision = int(body["revision"])
    await c.wait_for_revision(revision)
    return revision


async def test_one_flag_is_evaluated_in_ofreps_shape(agents: InProcessCluster) -> None:
    status, _, body = await post(
        agents, "/ofrep/v1/evaluate/flags/comments", {"context": {"targetingKey": "u1"}}
    )
    assert status == 200, body
    assert body["key"] == "comments" and body["value"] is True
    assert body["reason"] == "STATIC" and body["variant"] == "on"
    assert body["metadata"]["revision"] >= 1 and body["metadata"]["stale"] is False

    status, _, body = await post(agents, "/ofrep/v1/evaluate/flags/shed_fraction", {})
    assert status == 200
    assert body["value"] == 0.0 and isinstance(body["value"], float)
    # No body at all is a request without context, as OFREP allows.
    status, _, body = await post(agents, "/ofrep/v1/evaluate/flags/likes", raw=b"")
    assert status == 200 and body["value"] is True


async def test_errors_are_in_ofreps_shape(agents: InProcessCluster) -> None:
    status, _, body = await post(agents, "/ofrep/v1/evaluate/flags/no-such-flag", {})
    assert status == 404
    assert body["key"] == "no-such-flag" and body["errorCode"] == "FLAG_NOT_FOUND"
    assert "comments" in body["errorDetails"]

    status, _, body = await post(
        agents, "/ofrep/v1/evaluate/flags/comments", {"context": ["not", "an", "object"]}
    )
    assert (status, body["errorCode"], body["key"]) == (400, "INVALID_CONTEXT", "comments")
    status, _, body = await post(agents, "/ofrep/v1/evaluate/flags/comments", raw=b"{not json")
    assert (status, body["errorCode"]) == (400, "PARSE_ERROR")
    status, _, body = await post(agents, "/ofrep/v1/evaluate/flags", raw=b"[1]")
    assert (status, body["errorCode"]) == (400, "PARSE_ERROR")
    assert "key" not in body, "a bulk failure names no key"


async def test_the_read_token_is_required_as_bearer_or_api_key(agents: InProcessCluster) -> None:
    for path in ("/ofrep/v1/evaluate/flags", "/ofrep/v1/evaluate/flags/comments"):
        status, _, _ = await post(agents, path, {}, headers={"Authorization": ""})
        assert status == 401, path
        status, _, _ = await post(agents, path, {}, headers={"Authorization": "Bearer wrong"})
        assert status == 401, path
        status, _, _ = await post(agents, path, {}, headers={"Authorization": "", "X-API-Key": READ_TOKEN})
        assert status == 200, path


async def test_bulk_evaluation_has_every_flag_and_an_etag(agents: InProcessCluster) -> None:
    status, headers, body = await post(agents, "/ofrep/v1/evaluate/flags", {"context": {}})
    assert status == 200
    flags = {f["key"]: f for f in body["flags"]}
    assert set(flags) == FEATURES | {"shed_fraction"}
    assert all(f["reason"] == "STATIC" for f in flags.values())
    etag = headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')

    status, headers, body = await post(
        agents, "/ofrep/v1/evaluate/flags", {}, headers={"If-None-Match": etag}
    )
    assert (status, body, headers["ETag"]) == (304, None, etag)
    status, _, _ = await post(
        agents, "/ofrep/v1/evaluate/flags", {}, headers={"If-None-Match": f'"x", W/{etag}'}
    )
    assert status == 304
    status, _, _ = await post(agents, "/ofrep/v1/evaluate/flags", {}, headers={"If-None-Match": '"other"'})
    assert status == 200

    await set_feature(agents, "likes", False)
    try:
        status, headers, body = await post(
            agents, "/ofrep/v1/evaluate/flags", {}, headers={"If-None-Match": etag}
        )
        assert status == 200, "a new revision is a new ETag"
        assert headers["ETag"] != etag
        assert {f["key"]: f["value"] for f in body["flags"]}["likes"] is False
    finally:
        await set_feature(agents, "likes", True)


def _read_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {READ_TOKEN}"}


async def test_the_generic_ofrep_provider_reads_the_switches(agents: InProcessCluster) -> None:
    """`openfeature-provider-ofrep` as any application would configure it, no custom code."""
    provider = OFREPProvider(base(agents), headers_factory=_read_headers, timeout=5.0)
    openfeature.set_provider(provider, domain="ofrep-generic")
    client = openfeature.get_client("ofrep-generic")
    try:
        # The provider is synchronous (requests): run it off the event loop the agents use.
        details = await asyncio.to_thread(client.get_boolean_details, "comments", False)
        assert (details.value, details.reason, details.variant) == (True, Reason.STATIC, "on")
        assert details.flag_metadata["revision"] >= 1
        shed = await asyncio.to_thread(client.get_float_details, "shed_fraction", 1.0)
        assert (shed.value, shed.error_code) == (0.0, None)

        missing = await asyncio.to_thread(client.get_boolean_details, "no-such-flag", True)
        assert (missing.value, missing.error_code) == (True, ErrorCode.FLAG_NOT_FOUND)
        mismatch = await asyncio.to_thread(client.get_string_details, "comments", "x")
        assert (mismatch.value, mismatch.error_code) == ("x", ErrorCode.TYPE_MISMATCH)

        await set_feature(agents, "comments", False)
        try:
            assert await asyncio.to_thread(client.get_boolean_value, "comments", True) is False
        finally:
            await set_feature(agents, "comments", True)

        anonymous = OFREPProvider(base(agents))
        openfeature.set_provider(anonymous, domain="ofrep-anonymous")
        denied = await asyncio.to_thread(
            openfeature.get_client("ofrep-anonymous").get_boolean_details, "comments", False
        )
        assert denied.value is False and denied.error_code == ErrorCode.GENERAL, "401 without the read token"
    finally:
        openfeature.clear_providers()


async def test_our_provider_reads_the_followed_decision(agents: InProcessCluster) -> None:
    urls = [a.url for a in agents.agents.values()]
    async with FlagsClient(urls, token=READ_TOKEN, wait_s=2) as flags:
        assert await flags.wait_for_revision(0, 10)
        provider = ControlplaneProvider(flags=flags)
        events: list[list[str]] = []
        openfeature.set_provider_and_wait(provider, domain="controlplane")
        client = openfeature.get_client("controlplane")
        from openfeature.event import ProviderEvent

        client.add_handler(
            ProviderEvent.PROVIDER_CONFIGURATION_CHANGED,
            lambda details: events.append(details.flags_changed or []),
        )
        try:
            details = client.get_boolean_details("comments", False)
            assert (details.value, details.reason, details.variant) == (True, Reason.STATIC, "on")
            assert client.get_float_value("shed_fraction", 1.0) == 0.0
            missing = client.get_boolean_details("no-such-flag", True)
            assert (missing.value, missing.error_code) == (True, ErrorCode.FLAG_NOT_FOUND)
            mismatch = client.get_float_details("comments", 0.5)
            assert (mismatch.value, mismatch.error_code) == (0.5, ErrorCode.TYPE_MISMATCH)

            revision = await set_feature(agents, "comments", False)
            assert await flags.wait_for_revision(revision - 1, 10)
            assert client.get_boolean_value("comments", True) is False
            assert ["comments"] in events
        finally:
            openfeature.clear_providers()
            await set_feature(agents, "comments", True)


async def test_our_provider_is_not_ready_before_a_decision() -> None:
    provider = ControlplaneProvider(["http://127.0.0.1:9"], init_timeout_s=0.2)
    openfeature.set_provider(provider, domain="nowhere")
    try:
        await asyncio.sleep(0.5)
        details = openfeature.get_client("nowhere").get_boolean_details("comments", True)
        assert details.value is True
        assert details.error_code in (ErrorCode.PROVIDER_NOT_READY, ErrorCode.GENERAL)
    finally:
        await asyncio.to_thread(openfeature.clear_providers)
