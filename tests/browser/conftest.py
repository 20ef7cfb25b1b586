"""One real stack and one headless Chromium (Debian's, at /usr/bin/chromium) for the console's browser tests.

The stack is the e2e suite's (every process of `kinshasa up` on free ports), started once for this package
and stopped when its last test is done, so it is never up beside the e2e suite's own. Playwright drives
the system browser; nothing is downloaded. KINSHASA_CONSOLE_SCREENSHOTS=<dir> makes the tests save the
README's screenshots there (`make screenshots`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Request, WebSocketRoute, expect, sync_playwright

from tests.e2e.api import Api
from tests.e2e.stack import Stack, running_stack

CHROMIUM = Path(os.environ.get("KINSHASA_CHROMIUM", "/usr/bin/chromium"))
# Long enough for a revert through Kafka and Temporal on a busy machine; every wait ends at its signal.
expect.set_options(timeout=60_000)


@dataclass
class AttachedStack:
    """A stack kept running by `python -m tests.browser.keep_stack`, for working on the console: the
    tests attach to it (KINSHASA_BROWSER_STACK=<its JSON file>) instead of starting one each run."""

    gateway_url: str
    data_dir: Path

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    def key(self, kind: str) -> str:
        document = json.loads((self.data_dir / "credentials.json").read_text())
        return str(next(p["key"] for p in document["principals"] if p["kind"] == kind))

    def logs(self, lines: int = 40) -> str:
        return f"see {self.data_dir / 'logs'}"


@pytest.fixture(scope="package")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    attached = os.environ.get("KINSHASA_BROWSER_STACK")
    if attached:
        described = json.loads(Path(attached).read_text())
        yield AttachedStack(described["gateway_url"], Path(described["data_dir"]))  # type: ignore[misc]
        return
    with running_stack() as running:
        yield running
        if request.session.testsfailed:
            print(f"\nbrowser-test stack logs:\n{running.logs(60)}", file=sys.stderr)


@pytest.fixture(scope="package")
def browser(stack: Stack) -> Iterator[Browser]:
    # After the stack: Playwright's sync API keeps an event loop in this thread, and starting the stack
    # runs asyncio itself.
    if not CHROMIUM.exists():
        raise RuntimeError(f"no Chromium at {CHROMIUM}: install Debian's (apt-get install chromium), as "
                           ".ci/run does, or set KINSHASA_CHROMIUM to its path")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"],
                                              headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    context = browser.new_context(base_url=stack.gateway_url.removesuffix("/graphql"),
                                  viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    yield opened
    context.close()


@pytest.fixture(scope="package")
def agent(stack: Stack) -> Api:
    return Api(stack.gateway_url, stack.key("agent"))


@pytest.fixture(scope="package")
def operator(stack: Stack) -> Api:
    return Api(stack.gateway_url, stack.key("operator"))


def sign_in(page: Page, key: str) -> None:
    """The sign-in form, filled and sent the way an operator does."""
    page.goto("/console")
    page.get_by_label("Operator key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def signed_in(page: Page, stack: Stack, where: str = "inbox") -> Page:
    sign_in(page, stack.key("operator"))
    expect(page.get_by_role("navigation", name="Console pages")).to_be_visible()
    page.goto(f"/console/#/{where}")
    return page


def screenshot(page: Page, name: str) -> None:
    """Save a README screenshot when KINSHASA_CONSOLE_SCREENSHOTS names a directory."""
    where = os.environ.get("KINSHASA_CONSOLE_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(where) / f"{name}.png"), full_page=True)


class ProgressSpoiler:
    """Stands between the page and the gateway and turns the first runChanged event that says run `run_id`
    is REVERTED into one whose revertProgress failed, as when the coordinator does not answer in time.
    That event is the feed's last: the gateway ends a settled run's feed right after it. Set `run_id` once
    the run exists (the spoiler must be in place before the page opens its socket).

    It also counts the requests naming the run that the page sends after the spoiled event (`asked_after`):
    a feed opened again, or a read. That is how a test knows the page did something with the failed event,
    rather than showing what a read of its own had already said."""

    def __init__(self, page: Page) -> None:
        self.run_id: str | None = None
        self.spoiled = 0
        self.asked_after = 0
        page.route_web_socket(re.compile(r".*/graphql$"), self.handle)
        page.on("request", self._request)

    def _names_the_run(self, text: str | None) -> bool:
        return bool(self.spoiled and self.run_id and text and self.run_id in text)

    def _request(self, request: Request) -> None:
        if request.method == "POST" and self._names_the_run(request.post_data):
            self.asked_after += 1

    def handle(self, socket: WebSocketRoute) -> None:
        server = socket.connect_to_server()

        def from_page(message: str | bytes) -> None:
            if isinstance(message, str) and self._names_the_run(message):
                event = json.loads(message)
                if event.get("type") == "subscribe":
                    self.asked_after += 1
            server.send(message)

        def from_server(message: str | bytes) -> None:
            event = json.loads(message)
            data = (event.get("payload") or {}).get("data") if event.get("type") == "next" else None
            run = (data or {}).get("runChanged")
            if run and run.get("id") == self.run_id and run["status"] == "REVERTED" and not self.spoiled:
                run["revertProgress"] = None
                event["payload"]["errors"] = [{
                    "message": "the coordinator did not answer in time",
                    "path": ["runChanged", "revertProgress"],
                    "extensions": {"code": "BACKEND_UNAVAILABLE", "component": "coordinator"}}]
                message = json.dumps(event)
                self.spoiled += 1
            socket.send(message)

        socket.on_message(from_page)
        server.on_message(from_server)

    def wait_until_asked_again(self, page: Page, timeout_s: float = 60) -> None:
        """Let the page run until, after the spoiled event was sent to it, it named the run in a request of
        its own: what it shows from then on is what it made of that event."""
        deadline = time.monotonic() + timeout_s
        while not self.asked_after:
            assert time.monotonic() < deadline, (
                f"within {timeout_s} s: {self.spoiled} event(s) spoiled, and the page asked nothing after")
            page.wait_for_timeout(50)  # the page's messages and requests are handled while it waits
