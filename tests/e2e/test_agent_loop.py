"""examples/agent_loop.py, run as a user runs it: its honest write is applied, then its rogue loop is
stopped by the breaker on the default policy, and the run ends closed with its breaker open."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.e2e.api import Api
from tests.e2e.stack import REPO, Stack, wait_for


def test_the_scripted_agent_goes_rogue_and_the_breaker_stops_it(stack: Stack, operator: Api) -> None:
    env = {**os.environ, "KINSHASA_KEY": stack.key("agent")}
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "agent_loop.py"), "--url", stack.gateway_url,
         "--entry-point", "e2e.agent-loop", "--rogue-writes", "400"],
        env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "the service now has title 'Roadmap'" in out
    # The breaker stopped it either way: refused with BREAKER_OPEN, or (when the trip's auto-revert closed
    # the run between two writes) with RUN_CLOSED. The run's end below says the breaker tripped.
    refused = re.search(r"write (\d+) refused(?: after [\d.]+s: BREAKER_OPEN|: RUN_CLOSED)", out)
    assert refused is not None, out
    assert 1 < int(refused.group(1)) < 400
    run_id = re.search(r"run (\S+) started at e2e.agent-loop", out).group(1)  # type: ignore[union-attr]

    # The default policy reverts a tripped run: it ends REVERTED with nothing left held.
    run = wait_for("the rogue run to be reverted",
                   lambda: (r := operator.run(run_id))["status"] in ("REVERTED", "REVERT_FAILED") and r,
                   timeout_s=120)
    assert run["status"] == "REVERTED" and run["breaker"]["state"] == "OPEN"
    assert run["counts"]["held"] == 0 and run["breaker"]["trippedReason"]
