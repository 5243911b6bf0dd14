"""The dashboard on agents whose reads need a token: it asks for one, and a read token cannot act.

In-process agents (the real API and decide loop on the in-memory store, see
`controlplane.testing.inprocess`) are enough here: this is about what the page does with
401 and 403 answers, not about processes or networks. They run on an event loop of their
own thread so the browser calls can block.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from controlplane.agent.node import Tokens
from controlplane.testing.inprocess import ADMIN_TOKEN, InProcessCluster
from tests.api.conftest import api_settings
from tests.ui.conftest import Browser

READ_TOKEN = "read-token-for-the-dashboard-test"


class Guarded:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ui-read-token", daemon=True)
        self.cluster = InProcessCluster(api_settings(), tokens=Tokens(admin=ADMIN_TOKEN, read=READ_TOKEN))

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def url(self) -> str:
        return next(iter(self.cluster.agents.values())).url


@pytest.fixture(scope="module")
def guarded(browser: Browser) -> Iterator[Guarded]:
    g = Guarded()
    g.thread.start()
    try:
        g.run(g.cluster.__aenter__())
        g.run(g.cluster.wait_for_revision(1))
        yield g
    finally:
        try:
            # The page's event stream would hold the in-process server open: leave first.
            browser.driver.get("about:blank")
            g.run(g.cluster.__aexit__(None, None, None))
        finally:
            g.loop.call_soon_threadsafe(g.loop.stop)
            g.thread.join(10)
            g.loop.close()


def test_the_page_asks_for_the_read_token_and_a_read_token_cannot_act(
    browser: Browser, guarded: Guarded
) -> None:
    d = browser.driver
    d.get(guarded.url() + "/ui/")
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
    node = next(iter(guarded.cluster.agents.values())).node
    assert not node.state().intents
    assert node.state().decision is not None and node.state().decision.frozen is False
    browser.shot("21-read-token-cannot-act")
