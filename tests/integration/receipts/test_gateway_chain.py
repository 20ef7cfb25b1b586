"""The gateway's receipt chain on a real gateway, database and Kafka: one receipt per emission, in its
transaction; tampering named by `kinshasa receipts verify` and by the operator's `receipts` query."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from kinshasa.gateway.store import commands
from kinshasa.kernel.outbox import outbox
from kinshasa.kernel.receipts import decode_source, receipts
from tests.integration.gateway.conftest import AGENT_KEY, OPERATOR_KEY, Harness
from tests.integration.gateway.test_group_commit import _parts, _record_batches
from tests.integration.receipts.conftest import (
    chain_report,
    kinshasa_cli,
    running_gateway,
    tamper,
)

CREATE = ("mutation($r: ID!, $t: String!, $k: String) { createDocument(runId: $r, input: {title: $t}, "
          "idempotencyKey: $k) { commandId status } }")


async def _chain(harness: Harness) -> list[Any]:
    async with harness.gateway.engine.connect() as conn:
        return list(await conn.execute(select(receipts).where(receipts.c.component == "gateway",
                                                              receipts.c.seq > 0).order_by(receipts.c.seq)))


async def _outbox(harness: Harness) -> dict[str, bytes]:
    async with harness.gateway.engine.connect() as conn:
        return {str(r.message_id): bytes(r.value)
                for r in await conn.execute(select(outbox.c.message_id, outbox.c.value))}


async def _command_receipts(harness: Harness, run_id: str) -> list[Any]:
    return [r for r in await _chain(harness) if decode_source(r.source)[:2] == ("command", run_id)]


async def test_a_group_commit_appends_one_receipt_per_published_command(
    database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str, monkeypatch: Any
) -> None:
    async with running_gateway(database_url, kafka.bootstrap, tmp_path, examples_catalogue) as harness:
        await harness.client.set_policy({"quarantineWindowS": 0, "maxWrites": 100})
        run_id = await harness.client.start_run()
        writer, principal, spec = _parts(harness)
        sizes = _record_batches(writer, monkeypatch)
        answers = await asyncio.gather(*(writer.submit(principal, spec, run_id,
                                                       spec.payload_model(title=f"t{i}"))
                                         for i in range(24)))
        assert sizes == [24], "the writes must have shared one transaction"
        assert {a.status for a in answers} == {"PUBLISHED"}

        found = await _command_receipts(harness, run_id)
        assert sorted(decode_source(r.source)[2] for r in found) == sorted(a.command_id for a in answers)
        assert [r.message_id for r in found] == [decode_source(r.source)[2] for r in found]
        # Each receipt's digest is the digest of exactly the bytes its outbox row publishes.
        sent = await _outbox(harness)
        assert all(r.payload_digest == hashlib.sha256(sent[r.message_id]).hexdigest() for r in found)
        # One statement for the batch still chains them: consecutive seqs, each linked to the one before.
        seqs = [r.seq for r in found]
        assert seqs == list(range(seqs[0], seqs[0] + 24))

        result = await kinshasa_cli("receipts", "verify", "-c", "gateway", "--database-url", database_url)
        assert result.code == 0, result.output
        assert "OK: gateway receipt chain intact" in result.output


async def test_a_held_command_gets_its_receipt_when_released_and_a_retry_adds_none(
    database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str
) -> None:
    async with running_gateway(database_url, kafka.bootstrap, tmp_path, examples_catalogue) as harness:
        c = harness.client
        await c.set_policy({"quarantineWindowS": 5})  # the write and the check below fit inside it
        run_id = await c.start_run()
        key = f"k-{uuid.uuid4()}"
        first = (await c.data(CREATE, {"r": run_id, "t": "a", "k": key}, AGENT_KEY))["createDocument"]
        assert first["status"] == "HELD"
        assert await _command_receipts(harness, run_id) == [], "nothing left the gateway yet"

        async def released() -> bool:
            async with harness.gateway.engine.connect() as conn:
                status = await conn.scalar(select(commands.c.status).where(
                    commands.c.command_id == first["commandId"]))
            return status == "PUBLISHED"

        for _ in range(600):
            if await released():
                break
            await asyncio.sleep(0.05)
        assert await released()
        again = (await c.data(CREATE, {"r": run_id, "t": "a", "k": key}, AGENT_KEY))["createDocument"]
        assert again["commandId"] == first["commandId"]
        found = await _command_receipts(harness, run_id)
        assert [decode_source(r.source)[2] for r in found] == [first["commandId"]]
        # The run's other emissions (its start fact) have theirs too, named by topic and run.
        others = [decode_source(r.source) for r in await _chain(harness)
                  if decode_source(r.source)[0] != "command"]
        assert any(s[0] == "kinshasa.runs" and s[1] == run_id for s in others)


async def test_a_tampered_gateway_receipt_is_named_by_the_cli_and_the_query(
    database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str
) -> None:
    async with running_gateway(database_url, kafka.bootstrap, tmp_path, examples_catalogue) as harness:
        c = harness.client
        await c.set_policy({"quarantineWindowS": 0})
        run_id = await c.start_run()
        for i in range(3):
            await c.data(CREATE, {"r": run_id, "t": f"t{i}", "k": None}, AGENT_KEY)
        intact = await chain_report(c, "gateway")
        assert intact["verified"] is True and intact["problems"] == []
        length = intact["length"]
        assert isinstance(length, int) and length >= 4  # the run's start and its three commands

        victim = (await _command_receipts(harness, run_id))[1]
        # Point the receipt at another payload, as someone hiding what was really sent would.
        await tamper(database_url, "UPDATE receipts SET payload_digest = :d WHERE component = 'gateway' "
                                   "AND seq = :s", d="1" * 64, s=victim.seq)

        result = await kinshasa_cli("receipts", "verify", "-c", "gateway", "--database-url", database_url)
        assert result.code == 1, result.output
        assert f"bad hash: receipt seq {victim.seq} was altered" in result.output
        assert f"altered emission: outbox message {victim.message_id}" in result.output
        assert "FAILED: gateway" in result.output

        report = await chain_report(c, "gateway")
        assert report["verified"] is False and report["length"] == length
        problems = report["problems"]
        assert isinstance(problems, list)
        assert f"bad hash: receipt seq {victim.seq} was altered (its content no longer matches its hash)" \
            in problems


async def test_a_deleted_gateway_receipt_is_a_gap_and_an_emission_without_receipt(
    database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str
) -> None:
    async with running_gateway(database_url, kafka.bootstrap, tmp_path, examples_catalogue) as harness:
        c = harness.client
        await c.set_policy({"quarantineWindowS": 0})
        run_id = await c.start_run()
        for i in range(3):
            await c.data(CREATE, {"r": run_id, "t": f"t{i}", "k": None}, AGENT_KEY)
        victim = (await _command_receipts(harness, run_id))[0]
        await tamper(database_url, "DELETE FROM receipts WHERE component = 'gateway' AND seq = :s",
                     s=victim.seq)

        result = await kinshasa_cli("receipts", "verify", "-c", "gateway", "--database-url", database_url)
        assert result.code == 1, result.output
        assert f"gap: receipt seq {victim.seq} is missing" in result.output
        assert f"broken link: receipt seq {victim.seq + 1}" in result.output
        assert f"missing receipt: outbox message {victim.message_id}" in result.output

        problems = (await chain_report(c, "gateway"))["problems"]
        assert isinstance(problems, list)
        assert any(p.startswith(f"missing receipt: outbox message {victim.message_id}") for p in problems)


async def test_a_receipt_whose_command_is_gone_is_missing_its_source(
    database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str
) -> None:
    async with running_gateway(database_url, kafka.bootstrap, tmp_path, examples_catalogue) as harness:
        c = harness.client
        await c.set_policy({"quarantineWindowS": 0})
        run_id = await c.start_run()
        command_id = (await c.data(CREATE, {"r": run_id, "t": "t", "k": None}, AGENT_KEY))[
            "createDocument"]["commandId"]
        await tamper(database_url, "DELETE FROM gw_commands WHERE command_id = :c", c=command_id)
        problems = (await chain_report(c, "gateway"))["problems"]
        assert isinstance(problems, list)
        assert any(f"records command {command_id} of run {run_id}, which the gateway's store does not "
                   "hold" in p for p in problems), problems


async def test_the_query_is_for_operators_and_names_unknown_or_silent_components(
    database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str
) -> None:
    # Nothing listens on port 9 of loopback (discard): the coordinator is down.
    down = "http://127.0.0.1:9"
    async with running_gateway(database_url, kafka.bootstrap, tmp_path, examples_catalogue,
                               admin_urls={"coordinator": down}, internal_token="t" * 40) as harness:
        c = harness.client
        refused = await c.error(
            'query { receipts(component: "gateway") { verified } }', key=AGENT_KEY)
        assert refused["extensions"]["code"] == "FORBIDDEN"
        unknown = await c.error('query { receipts(component: "nope") { verified } }', key=OPERATOR_KEY)
        assert unknown["extensions"]["code"] == "VALIDATION" and "coordinator" in unknown["message"]
        silent = await c.error('query { receipts(component: "coordinator") { verified } }',
                               key=OPERATOR_KEY)
        assert silent["extensions"]["code"] == "BACKEND_UNAVAILABLE"
        assert "coordinator" in silent["message"] and "127.0.0.1" not in str(silent)


async def test_a_revert_request_and_its_discards_leave_receipts_too(
    database_url: str, kafka: Any, tmp_path: Path, examples_catalogue: str
) -> None:
    async with running_gateway(database_url, kafka.bootstrap, tmp_path, examples_catalogue) as harness:
        c = harness.client
        await c.set_policy({"quarantineWindowS": 300})
        run_id = await c.start_run()
        await c.data(CREATE, {"r": run_id, "t": "held", "k": None}, AGENT_KEY)
        await c.data(f'mutation {{ revertRun(runId: "{run_id}", reason: "rogue") {{ id }} }}',
                     key=OPERATOR_KEY)

        sent = await _outbox(harness)
        chain = {r.message_id: decode_source(r.source) for r in await _chain(harness)}
        # Every message the gateway put in its outbox has its receipt: the run's start, the discard of
        # its held command and the revert request, each named by its topic and run.
        assert set(sent) <= set(chain)
        facts = [s for s in chain.values() if s[0] == "kinshasa.runs" and s[1] == run_id]
        assert len(facts) >= 3, facts
        assert await _command_receipts(harness, run_id) == [], "a discarded command never left"
        result = await kinshasa_cli("receipts", "verify", "-c", "gateway", "--database-url", database_url)
        assert result.code == 0, result.output
