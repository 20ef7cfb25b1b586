"""Signing in to the console: the operator's key opens it; an agent's key or an unknown one never does."""

from __future__ import annotations

from playwright.sync_api import Page, expect

from tests.browser.conftest import sign_in
from tests.e2e.stack import Stack


def test_an_operator_signs_in_and_the_key_stays_in_the_tab_only(page: Page, stack: Stack) -> None:
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    page.on("websocket", lambda socket: asked.append(socket.url))
    sign_in(page, stack.key("operator"))
    expect(page.get_by_role("navigation", name="Console pages")).to_be_visible()
    expect(page.get_by_role("heading", name="Inbox")).to_be_visible()
    expect(page.get_by_role("status").filter(has_text="live")).to_be_visible()
    # Everything the page loads or talks to is the gateway itself: no CDN, no other host.
    gateway = stack.gateway_url.removesuffix("/graphql").split("://", 1)[1]
    assert asked and all(url.split("://", 1)[1].startswith(gateway + "/") for url in asked), asked
    assert any(url.endswith("/console/app.js") for url in asked)
    expect(page.get_by_text("signed in as")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('kinshasa.operatorKey')") == stack.key("operator")
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []

    # A reload keeps the session; signing out forgets the key.
    page.reload()
    expect(page.get_by_role("heading", name="Inbox")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("Operator key")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('kinshasa.operatorKey')") is None


def test_an_agent_key_cannot_sign_in(page: Page, stack: Stack) -> None:
    sign_in(page, stack.key("agent"))
    problem = page.get_by_role("alert")
    expect(problem).to_contain_text("the console is for operators")
    expect(page.get_by_role("navigation", name="Console pages")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('kinshasa.operatorKey')") is None
    # Nor can the page be opened at a deep link without signing in.
    page.goto("/console/#/approvals")
    expect(page.get_by_label("Operator key")).to_be_visible()


def test_an_unknown_key_is_refused(page: Page) -> None:
    sign_in(page, "not-a-key-of-this-gateway")
    expect(page.get_by_role("alert")).to_contain_text("does not recognise this key")
    expect(page.get_by_role("navigation", name="Console pages")).to_be_hidden()
