"""The coordinator's receipt chain on a real revert (Kafka, Temporal, the example services as processes):
one receipt per compensation, committed with its outbox row; tampering named by `kinshasa receipts
verify` and by the gateway's `receipts` query, which asks the coordinator's admin endpoint."""

from __future__ import annotations

import hashlib
import random
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from kinshasa.infra.temporal import TemporalServer
from kinshasa.kernel.admin_api import load_or_create_internal_token
from kinshasa.kernel.database import create_engine
from kinshasa.kernel.outbox import outbox
from kinshasa.kernel.receipts import decode_source, receipts
from tests.integration.coordinator.harness import ServiceFleet, Workload, coordinator_stack
from tests.integration.receipts.conftest import chain_report, kinshasa_cli, running_gateway, tamper


async def _chain(url: str) -> tuple[list[Any], dict[str, bytes]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            rows = list(await conn.execute(select(receipts).where(
                receipts.c.component == "coordinator", receipts.c.seq > 0).order_by(receipts.c.seq)))
            sent = {str(r.message_id): bytes(r.value)
                    for r in await conn.execute(select(outbox.c.message_id, outbox.c.value))}
        return rows, sent
    finally:
        await engine.dispose()


async def test_each_compensation_leaves_a_receipt_and_tampering_is_named(
    fleet: ServiceFleet, temporal: TemporalServer, tmp_path: Path, unique: str, kafka: Any,
    examples_catalogue: str
) -> None:
    async with coordinator_stack(fleet, temporal.address, tmp_path, unique) as stack:
        work = Workload(random.Random(11))
        run_id = f"run-{uuid.uuid4()}"
        await stack.start_run(run_id, "agent-r")
        commands = [work.create_doc(run_id, "agent-r") for _ in range(5)]
        await stack.publish(commands)
        await stack.wait_results(run_id, len(commands))
        await stack.request_revert(run_id, len(commands))
        outcome = await stack.revert_result(run_id)
        assert outcome.status == "REVERTED" and outcome.compensated == 5

        rows, sent = await _chain(stack.coordinator_url)
        sources = [decode_source(r.source) for r in rows]
        compensations = [(r, s) for r, s in zip(rows, sources, strict=True) if s[0] == "compensate"]
        # One receipt per compensate command, naming the run, the forward event it undoes and the attempt.
        assert len(compensations) == 5
        assert {s[1] for _, s in compensations} == {run_id}
        assert all(r.payload_digest == hashlib.sha256(sent[r.message_id]).hexdigest()
                   for r, _ in compensations)
        # ... and one for the outcome the coordinator published on the run's topic.
        assert [s for s in sources if s[0] == stack.topics.runs and s[1] == run_id]

        result = await kinshasa_cli("receipts", "verify", "-c", "coordinator",
                                    "--database-url", stack.coordinator_url)
        assert result.code == 0, result.output
        assert f"OK: coordinator receipt chain intact, {len(rows)} receipts verified" in result.output

        assert stack.coordinator is not None
        runtime = stack.coordinator[0]
        token = load_or_create_internal_token(tmp_path)
        gateway_url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.sqlite3'}"
        async with running_gateway(gateway_url, kafka.bootstrap, tmp_path / "gateway", examples_catalogue,
                                   admin_urls={"coordinator": runtime.api_url},
                                   internal_token=token) as harness:
            intact = await chain_report(harness.client, "coordinator")
            assert intact == {"component": "coordinator", "length": len(rows), "verified": True,
                              "problems": []}

            victim = compensations[2][0]
            await tamper(stack.coordinator_url, "UPDATE receipts SET message_id = :m "
                         "WHERE component = 'coordinator' AND seq = :s", m=str(uuid.uuid4()), s=victim.seq)

            result = await kinshasa_cli("receipts", "verify", "-c", "coordinator",
                                        "--database-url", stack.coordinator_url)
            assert result.code == 1, result.output
            assert f"bad hash: receipt seq {victim.seq} was altered" in result.output
            assert "FAILED: coordinator" in result.output

            report = await chain_report(harness.client, "coordinator")
            assert report["verified"] is False and report["length"] == len(rows)
            problems = report["problems"]
            assert isinstance(problems, list)
            assert (f"bad hash: receipt seq {victim.seq} was altered (its content no longer matches its "
                    "hash)") in problems
            # The outbox row it stood for is now an emission without a receipt, when not yet pruned.
            if victim.message_id in sent:
                assert any(p.startswith(f"missing receipt: outbox message {victim.message_id}")
                           for p in problems), problems
