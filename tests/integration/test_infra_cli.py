"""`kinshasa infra up|status|down` starts healthy Kafka, Temporal and PostgreSQL and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kinshasa.infra.process import free_port, pid_alive

REPO = Path(__file__).resolve().parents[2]


def _kinshasa(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kinshasa.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=180, check=False)


def test_infra_up_status_down(tmp_path: Path) -> None:
    # PostgreSQL runs unprivileged when we are root, so its data must sit where that user can reach.
    data_dir = Path(subprocess.check_output(["mktemp", "-d", "/tmp/kinshasa-infra-XXXXXX"],
                                            text=True).strip())
    os.chmod(data_dir, 0o755)
    env = os.environ | {
        "KINSHASA_DATA_DIR": str(data_dir),
        "KINSHASA_INFRA_CACHE_DIR": str(REPO / ".kinshasa" / "cache"),
        "KINSHASA_INFRA_KAFKA_PORT": str(free_port()),
        "KINSHASA_INFRA_KAFKA_CONTROLLER_PORT": str(free_port()),
        "KINSHASA_INFRA_TEMPORAL_PORT": str(free_port()),
        "KINSHASA_INFRA_POSTGRES_PORT": str(free_port()),
    }
    pids: list[int] = []
    try:
        up = _kinshasa(["infra", "up", "--postgres"], env)
        assert up.returncode == 0, up.stdout + up.stderr
        status = _kinshasa(["infra", "status"], env)
        assert status.returncode == 0, status.stdout + status.stderr
        lines = {line.split()[0]: line for line in status.stdout.splitlines()}
        assert set(lines) == {"kafka", "temporal", "postgres"}
        assert all("healthy" in line for line in lines.values()), status.stdout
        pids = [int(line.rsplit("pid=", 1)[1]) for line in lines.values()]
        assert all(pid_alive(pid) for pid in pids)
    finally:
        down = _kinshasa(["infra", "down"], env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert pids and not any(pid_alive(pid) for pid in pids)
    after = _kinshasa(["infra", "status"], env)
    assert after.returncode == 3
    assert "down" in after.stdout
    subprocess.run(["rm", "-rf", str(data_dir)], check=False)


def test_infra_up_with_three_brokers_runs_a_cluster_that_status_and_down_handle(tmp_path: Path) -> None:
    env = os.environ | {
        "KINSHASA_DATA_DIR": str(tmp_path),
        "KINSHASA_INFRA_CACHE_DIR": str(REPO / ".kinshasa" / "cache"),
        "KINSHASA_INFRA_KAFKA_PORT": str(free_port()),
        "KINSHASA_INFRA_KAFKA_CONTROLLER_PORT": str(free_port()),
        "KINSHASA_INFRA_KAFKA_HEAP": "384m",
        "KINSHASA_INFRA_TEMPORAL_PORT": str(free_port()),
    }
    pids: list[int] = []
    try:
        up = _kinshasa(["infra", "up", "--brokers", "3"], env)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "3 brokers, replication factor 3, min.insync.replicas 2" in up.stdout
        lines = {line.split()[0]: line for line in up.stdout.splitlines() if "pid=" in line}
        assert set(lines) == {"kafka-1", "kafka-2", "kafka-3", "temporal"}
        assert all("healthy" in line for line in lines.values()), up.stdout
        pids = [int(line.rsplit("pid=", 1)[1]) for line in lines.values()]
        # A plain `up` keeps the running cluster; asking for one broker meanwhile says what to do.
        again = _kinshasa(["infra", "up"], env)
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
        single = _kinshasa(["infra", "up", "--brokers", "1"], env)
        assert single.returncode == 1 and "kinshasa infra down" in single.stderr
    finally:
        down = _kinshasa(["infra", "down"], env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert pids and not any(pid_alive(pid) for pid in pids)
