"""The dashboard on agents whose reads need a token: it asks for one, and a read token cannot act.

Three agent processes (the cluster of `tests/cli/conftest.py`) configured with a read
token, as a cautious production deployment is.
"""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from controlplane.testing.localcluster import LocalCluster
from controlplane.testing.reading import HTTP_TIMEOUT
from tests.cli.conftest import Live, cli_config
from tests.ui.conftest import Browser

READ_TOKEN = "read-token-for-the-dashboard-test"


class GuardedCluster(LocalCluster):
    """The harness reads the API without a token; here reads need one (the admin token)."""

    async def start(self, agents: bool = True) -> None:
        await super().start(agents)
        await self.session.close()
        self._session = aiohttp.ClientSession(
            timeout=HTTP_TIMEOUT, headers={"Authorization": f"Bearer {self.admin_token}"}
        )


@pytest.fixture(scope="module")
def guarded(request: pytest.FixtureRequest) -> Iterator[Live]:
    config = cli_config()
    config["auth"] = {**config["auth"], "read_token": {"env": "CONTROLPLANE_READ_TOKEN"}}
    cluster = Live(config)
    cluster.cluster = GuardedCluster(
        config, with_proxies=True, extra_env={"CONTROLPLANE_READ_TOKEN": READ_TOKEN}
    )
    failed_before = request.session.testsfailed
    try:
        cluster.start()
        yield cluster
    finally:
        if request.session.testsfailed > failed_before:
            print(cluster.logs())
        cluster.stop()


def test_the_page_asks_for_the_read_token_and_a_read_token_cannot_act(
    browser: Browser, guarded: Live
) -> None:
    d = browser.driver
    d.get(guarded.url(guarded.ids[0]) + "/ui/")
    browser.wait(
        lambda: browser.js("return document.getElementById('token-dialog').open"), "the token dialog"
    )
    assert "needs a token" in d.find_element(By.ID, "token-why").text
    assert browser.js("return document.querySelectorAll('#services li.placement').length") == 0
    browser.shot("20-read-token-asked")
    d.switch_to.active_element.send_keys(READ_TOKEN, Keys.ENTER)
    browser.wait(
        lambda: browser.js("return document.querySelectorAll('#services li.placement').length") == 9,
        "the weights, read with the token",
    )
    browser.wait(lambda: browser.js("return document.querySelectorAll('#history li').length") > 0, "history")
    # The token went in a header, never in the address.
    assert READ_TOKEN not in d.current_url

    # With a read token the plan is shown, and the commit is refused by the agent.
    d.find_element(By.CSS_SELECTOR, "#action-buttons button[data-kind=freeze]").click()
    d.find_element(By.CSS_SELECTOR, "#action-fields input[name=reason]").send_keys(
        "ui test: read token", Keys.ENTER
    )
    browser.wait(lambda: d.find_element(By.ID, "action-commit").is_enabled(), "the plan")
    assert "automation frozen" in d.find_element(By.ID, "plan").text
    d.find_element(By.ID, "action-commit").click()
    result = browser.wait(
        lambda: (t := d.find_element(By.ID, "action-result").text) and "Not committed" in t and t,
        "the refusal",
    )
    assert "read-only token" in result
    assert guarded.get(guarded.ids[0], "/v1/intents")["intents"] == []
    assert guarded.decision(guarded.ids[1])["frozen"] is False
    browser.shot("21-read-token-cannot-act")
