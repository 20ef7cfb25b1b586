"""The soak for 35 seconds (`python -m bench.soak --seconds 35`): a fault injected, every check passed.

Two gateway replicas (the soak's default, on PostgreSQL), and the one fault kills one of them while the
agents write, so failing over to the other replica is part of every run. One fault, not two: the second
was drawn at random (a broker paused or killed, Temporal restarted, ...), and its recovery made this test
take 83 to 132 s; `make soak` draws them for ten minutes, and tests/faults has each of them on its own.

The ten-minute soak is `make soak`; this run keeps the soak itself working in `make test`. It runs as a
subprocess because the soak starts and kills the whole stack's processes, as `make soak` does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Stack start-up, 35 s of load and faults, the drain and the stop, with room for a busy machine.
TIMEOUT_S = 900


def test_a_short_soak_injects_faults_and_passes_every_check(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.soak", "--seconds", "35", "--fault-every", "30",
                           "--first-fault", "gateway-2",
                           "--results-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    output = f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert done.returncode == 0, output

    figures = json.loads((tmp_path / "soak.json").read_text())["figures"]
    # The first fault comes 15 to 30 s in, the next no sooner than 21 s after it: past the 35 s.
    assert figures["faults"] == 1 and len(figures["fault_log"]) == 1, output
    assert figures["gateways"] == 2 and figures["fault_log"][0]["target"] == "gateway-2", output
    assert figures["writes"] > 0 and figures["passed"], output
    checks = figures["checks"]
    assert {"commands_settled", "applied_exactly_once", "reverts_reverted", "dlq_empty"} <= set(checks)
    assert all(check["passed"] for check in checks.values()), output
    assert figures["write_ms_per_minute"] and figures["write_ms_per_minute"][0]["p99"] is not None
