"""Named tokens with scopes, on one in-process agent: who may do what, and who did it.

"Who" in the intents and the history is the name of the token that wrote it, whatever
the client claims (header or body); every accepted write leaves one audit line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from controlplane.access import Scope, Token, Tokens
from controlplane.testing.inprocess import InProcessCluster
from tests.api.conftest import api_config, api_settings

pytestmark = [pytest.mark.asyncio(loop_scope="module")]

SECRETS = {
    "dashboards": "read-secret-0123456789",
    "haproxy-east": "lb-secret-0123456789",
    "alice": "alice-secret-0123456789",
    "root": "admin-secret-0123456789",
}
TOKENS = Tokens(
    named=(
        Token("dashboards", Scope.READ, SECRETS["dashboards"]),
        Token("haproxy-east", Scope.LB, SECRETS["haproxy-east"]),
        Token("alice", Scope.OPERATE, SECRETS["alice"]),
        Token("root", Scope.ADMIN, SECRETS["root"]),
    )
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def solo() -> AsyncIterator[InProcessCluster]:
    config = api_config()
    config["cluster"]["agents"] = config["cluster"]["agents"][:1]
    async with InProcessCluster(api_settings(config), tokens=TOKENS) as c:
        await c.settled(quiet_s=0.5)
        yield c


def url(c: InProcessCluster, path: str) -> str:
    return next(iter(c.agents.values())).url + path


async def call(
    c: InProcessCluster,
    method: str,
    path: str,
    token: str | None,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    sent = {**(headers or {}), "Authorization": f"Bearer {token}" if token else ""}
    async with aiohttp.ClientSession() as s, s.request(method, url(c, path), json=body, headers=sent) as r:
        return r.status, await r.json(content_type=None)


async def revision(c: InProcessCluster) -> int:
    status, body = await call(c, "GET", "/v1/decision", SECRETS["dashboards"])
    assert status == 200, body
    return int(body["revision"])


async def test_each_scope_may_do_what_it_names_and_nothing_more(solo: InProcessCluster) -> None:
    before = await revision(solo)
    drain = {"kind": "drain", "region": "cn-east", "service": "order", "reason": "scope test"}
    freeze = {"kind": "freeze", "reason": "scope test"}
    for name in ("dashboards", "haproxy-east"):
        status, body = await call(solo, "POST", "/v1/intents", SECRETS[name], drain)
        assert status == 403, body
        assert name in body["detail"], body
    status, body = await call(solo, "POST", "/v1/intents", SECRETS["alice"], freeze)
    assert status == 403 and "admin" in body["detail"], body
    await asyncio.sleep(0.3)
    assert await revision(solo) == before
    status, body = await call(solo, "GET", "/v1/intents", None)
    assert status == 401, body  # a read-scoped token exists, so reads need a token
    for name, secret in SECRETS.items():
        status, body = await call(solo, "GET", "/v1/decision", secret)
        assert status == 200, (name, body)


async def test_who_is_the_token_name_never_what_the_client_claims(
    solo: InProcessCluster, caplog: pytest.LogCaptureFixture
) -> None:
    drain = {"kind": "drain", "region": "cn-east", "service": "order", "reason": "who test", "who": "mallory"}
    with caplog.at_level(logging.INFO, logger="controlplane.audit"):
        status, body = await call(
            solo, "POST", "/v1/intents", SECRETS["alice"], drain, headers={"X-Controlplane-User": "bob"}
        )
        assert status == 201, body
        assert body["who"] == "alice"
        intent_id, rev = body["id"], body["revision"]
        status, listed = await call(solo, "GET", "/v1/intents", SECRETS["dashboards"])
        assert [i["who"] for i in listed["intents"] if i["id"] == intent_id] == ["alice"]
        status, body = await call(
            solo, "DELETE", f"/v1/intents/{intent_id}", SECRETS["root"], {"reason": "undo who test"}
        )
        assert status == 200, body
    status, history = await call(solo, "GET", "/v1/history", SECRETS["dashboards"])
    mine = [e for e in history["entries"] if e.get("intent_id") == intent_id]
    assert {e["who"] for e in mine} == {"alice", "root"}, mine
    lines = [r for r in caplog.records if r.name == "controlplane.audit"]
    assert len(lines) == 2, [r.getMessage() for r in lines]
    added, removed = (r.getMessage() for r in lines)
    assert "who=alice" in added and "scope=operate" in added and 'reason="who test"' in added
    assert f"revision={rev}" in added and "claimed_user=mallory" in added
    assert "who=root" in removed and "scope=admin" in removed and 'reason="undo who test"' in removed
    assert lines[0].audit["who"]  # type: ignore[attr-defined] == "alice"


async def test_an_admin_token_freezes_and_an_operate_token_cannot_unfreeze(solo: InProcessCluster) -> None:
    status, body = await call(solo, "POST", "/v1/intents", SECRETS["root"], {"kind": "freeze", "reason": "f"})
    assert status == 201, body
    freeze_id = body["id"]
    status, body = await call(solo, "DELETE", f"/v1/intents/{freeze_id}", SECRETS["alice"], {"reason": "r"})
    assert status == 403, body
    status, body = await call(solo, "DELETE", f"/v1/intents/{freeze_id}", SECRETS["root"], {"reason": "r"})
    assert status == 200, body


@pytest.mark.parametrize("token", ["wrong-but-long-enough", SECRETS["alice"][:-1], SECRETS["alice"] + "x"])
async def test_an_unknown_token_is_401(solo: InProcessCluster, token: str) -> None:
    status, body = await call(solo, "GET", "/v1/decision", token)
    assert status == 401 and body["error"] == "bad token", body


async def raw_status(c: InProcessCluster, header: bytes) -> tuple[int, bytes]:
    """One request with a header as raw bytes (clients refuse to send non-ASCII)."""
    host, port = url(c, "").removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v1/decision HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + header + b"\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status = int(answer.split(b" ", 2)[1])
    return status, answer


@pytest.mark.parametrize(
    "header",
    [
        "Authorization: Bearer tök€n-ñot-ascii-at-all".encode(),
        b"Authorization: Bearer \xff\xfe\xfd-latin1-bytes-here",
        b"X-API-Key: \xc3\xa9t\xc3\xa9",
    ],
)
async def test_a_non_ascii_token_is_401_not_500(solo: InProcessCluster, header: bytes) -> None:
    status, answer = await raw_status(solo, header)
    if header.startswith(b"X-API-Key"):
        assert status == 401, answer  # no bearer on a non-OFREP route: missing token
    else:
        assert status == 401 and b"bad token" in answer, answer


async def test_legacy_tokens_are_named_admin_and_read() -> None:
    tokens = Tokens(admin="a" * 20, read="r" * 20)
    assert tokens.names() == ["admin", "read"]
    admin = tokens.match(b"a" * 20)
    assert admin is not None and (admin.name, admin.scope) == ("admin", Scope.ADMIN)
    assert not tokens.reads_open
    assert Tokens(admin="a" * 20).reads_open
    assert not Tokens(admin="a" * 20, open_reads=False).reads_open


async def test_whoami_names_the_token_and_its_scope_and_changes_nothing(solo: InProcessCluster) -> None:
    before = await revision(solo)
    for name, scope in (
        ("dashboards", "read"),
        ("haproxy-east", "lb"),
        ("alice", "operate"),
        ("root", "admin"),
    ):
        status, body = await call(solo, "GET", "/v1/whoami", SECRETS[name])
        assert (status, body) == (200, {"name": name, "scope": scope})
    status, body = await call(solo, "GET", "/v1/whoami", "not-a-token")
    assert status == 401 and body["error"] == "bad token", body
    assert await revision(solo) == before
