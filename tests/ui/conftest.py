"""The dashboard in a real browser: Debian's Chromium driven by Selenium, against real agents.

The cluster is the one the cpctl tests use (`tests/cli/conftest.py`: three agent
processes on loopback with fault proxies between them, on a loop of its own so that a
test can block on the browser while the backends keep answering). One cluster and one
browser serve the whole module; tests that change traffic put it back (`restored`).

Chromium and chromedriver come from Debian (`chromium`, `chromium-driver`); if either is
missing the tests fail and name the package: a browser test that skips proves nothing.
Chromium runs headless with a fresh profile and without its background networking (on
a closed network it would otherwise keep trying to reach its update and sync services).
Every process it starts is ended at teardown, by pid, even when a test failed.

Screenshots of each step go to `tests/ui/artifacts/` (ignored by git), or to
`$CONTROLPLANE_UI_ARTIFACTS` when set.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import JavascriptException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from controlplane.testing.processes import children_of

# The same live cluster as the cpctl tests: one per module, put back after each test.
from tests.cli.conftest import Live, cli_config, live, restored  # noqa: F401 (fixtures)

ARTIFACTS = Path(os.environ.get("CONTROLPLANE_UI_ARTIFACTS", Path(__file__).parent / "artifacts"))
WAIT_S = 30.0  # generous: the machine is shared; nothing asserts on it except as a bound

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--metrics-recording-only",
    "--password-store=basic",
)


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/lib/chromium/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install -y {package}")
    return path


def still_ours(pid: int, marks: tuple[str, ...]) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return any(mark in cmdline for mark in marks)


class Browser:
    """One Chromium with helpers the tests share: waits, JavaScript, screenshots."""

    def __init__(self, driver: WebDriver, artifacts: Path) -> None:
        self.driver = driver
        self.artifacts = artifacts

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(
        self, check: Callable[[], Any], what: str, timeout_s: float = WAIT_S, interval_s: float = 0.02
    ) -> Any:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
            except (JavascriptException, WebDriverException) as e:
                last = e
            else:
                if last:
                    return last
            time.sleep(interval_s)
        self.shot(f"timeout-{what[:40].replace(' ', '-').replace('/', '-')}")
        pytest.fail(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")

    def shot(self, name: str) -> Path:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{name}.png"
        self.driver.save_screenshot(str(path))
        print(f"screenshot: {path}")
        return path

    def full_shot(self, path: Path) -> Path:
        """The whole page, not only the viewport (for the README's picture)."""
        import base64

        data = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        print(f"screenshot: {path}")
        return path

    def console(self) -> list[dict[str, Any]]:
        """Browser log entries since the last call (reading clears them)."""
        entries: list[dict[str, Any]] = self.driver.get_log("browser")
        return entries

    def viewport(self, width: int, height: int) -> None:
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
        )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = require_binary("chromium", "chromium")
    chromedriver = require_binary("chromedriver", "chromium-driver")
    profile = Path(tempfile.mkdtemp(prefix="controlplane-ui-"))
    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--window-size=1280,800")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = profile.parent / f"{profile.name}-chromedriver.log"
    service = Service(executable_path=chromedriver, log_output=str(log))
    driver: WebDriver | None = None
    try:
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        yield Browser(driver, ARTIFACTS)
    finally:
        process = getattr(service, "process", None)
        leftovers = children_of(process.pid, recursive=True) if process is not None else []
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        with contextlib.suppress(Exception):
            service.stop()
        for pid in [*leftovers, *([process.pid] if process is not None else [])]:
            # Only what is still ours: chromedriver itself or a Chromium with our profile.
            if still_ours(pid, (str(profile), chromedriver)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired, Exception):
                process.wait(5)
        shutil.rmtree(profile, ignore_errors=True)
        with contextlib.suppress(OSError):
            log.unlink()
