"""One stack of real processes per e2e session, on free ports, stopped at the end even when a test fails.

Set KINSHASA_E2E_KEEP=1 to keep the data directory (databases, logs, mail) for a look afterwards.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.api import Api
from tests.e2e.stack import Stack, running_stack


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    keep = os.environ.get("KINSHASA_E2E_KEEP") == "1"
    with running_stack(keep_data=keep) as running:
        yield running
        if request.session.testsfailed:
            # The processes' own words are the fastest way to a cause.
            print(f"\ne2e stack logs ({running.data_dir / 'logs'}):\n{running.logs(60)}", file=sys.stderr)


@pytest.fixture(scope="session")
def agent(stack: Stack) -> Api:
    return Api(stack.gateway_url, stack.key("agent"))


@pytest.fixture(scope="session")
def operator(stack: Stack) -> Api:
    return Api(stack.gateway_url, stack.key("operator"))


@pytest.fixture(autouse=True)
def _revive_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that kills a process and fails before restarting it must not fail the tests after it."""
    yield
    if "stack" in request.fixturenames:
        request.getfixturevalue("stack").revive()
