"""Receipt chains on real SQLite and PostgreSQL: idempotent appends, gapless concurrency, tamper detection."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from kinshasa.kernel.database import create_engine
from kinshasa.kernel.receipts import ReceiptChain, ReceiptError, VerifyReport, payload_digest, receipts
from kinshasa.kernel.receipts_cli import app as receipts_app
from kinshasa.kernel.tables import kernel_metadata

COMPONENT = "documents"


async def _engine(url: str) -> AsyncEngine:
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: kernel_metadata.create_all(sync, tables=[receipts]))
    return engine


async def _append_many(engine: AsyncEngine, n: int, component: str = COMPONENT) -> None:
    chain = ReceiptChain(component)
    for i in range(1, n + 1):
        async with engine.begin() as conn:
            await chain.append(conn, ("kafka", "kinshasa.commands.documents", 0, i), f"m-{i}",
                               payload_digest({"i": i}))


async def _verify(engine: AsyncEngine, component: str = COMPONENT) -> VerifyReport:
    async with engine.connect() as conn:
        return await ReceiptChain(component).verify(conn)


async def test_intact_chain_verifies(database_url: str) -> None:
    engine = await _engine(database_url)
    try:
        await _append_many(engine, 12)
        report = await _verify(engine)
        assert report.ok and report.checked == 12 and report.head_seq == 12
        assert (report.gaps, report.broken_links, report.bad_hashes) == ([], [], [])
    finally:
        await engine.dispose()


async def test_same_source_twice_yields_one_receipt(database_url: str) -> None:
    engine = await _engine(database_url)
    chain = ReceiptChain(COMPONENT)
    try:
        source = ("command", "0b6f2b0e-0000-4000-8000-000000000001")
        async with engine.begin() as conn:
            first = await chain.append(conn, source, "m-1", payload_digest(b"x"))
        async with engine.begin() as conn:
            again = await chain.append(conn, list(source), "m-1", payload_digest(b"x"))
        assert again == first
        async with engine.connect() as conn:
            assert (await conn.scalar(select(func.count()).select_from(receipts))) == 1
            assert await chain.get(conn, source) == first
    finally:
        await engine.dispose()


async def test_rolled_back_append_leaves_no_receipt(database_url: str) -> None:
    engine = await _engine(database_url)
    chain = ReceiptChain(COMPONENT)
    try:
        with pytest.raises(RuntimeError, match="emission failed"):
            async with engine.begin() as conn:
                await chain.append(conn, ("command", "a"), "m-a", payload_digest(b"a"))
                raise RuntimeError("emission failed")
        async with engine.begin() as conn:
            receipt = await chain.append(conn, ("command", "b"), "m-b", payload_digest(b"b"))
        assert receipt.seq == 1
        assert (await _verify(engine)).ok
    finally:
        await engine.dispose()


async def test_append_refuses_a_bad_digest_and_no_transaction(database_url: str) -> None:
    engine = await _engine(database_url)
    chain = ReceiptChain(COMPONENT)
    try:
        async with engine.begin() as conn:
            with pytest.raises(ReceiptError, match="payload_digest"):
                await chain.append(conn, ("command", "a"), "m-a", "not-a-digest")
        async with engine.connect() as conn:
            with pytest.raises(ReceiptError, match="inside the caller's transaction"):
                await chain.append(conn, ("command", "a"), "m-a", payload_digest(b"a"))
    finally:
        await engine.dispose()


async def test_chains_of_two_components_are_independent(database_url: str) -> None:
    engine = await _engine(database_url)
    try:
        await _append_many(engine, 3, "documents")
        await _append_many(engine, 2, "ledger")
        assert (await _verify(engine, "documents")).checked == 3
        ledger = await _verify(engine, "ledger")
        assert ledger.ok and ledger.head_seq == 2
    finally:
        await engine.dispose()


async def test_deleted_row_is_named_by_seq(database_url: str) -> None:
    engine = await _engine(database_url)
    try:
        await _append_many(engine, 10)
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM receipts WHERE component = :c AND seq = 4"),
                               {"c": COMPONENT})
        report = await _verify(engine)
        assert not report.ok
        assert (report.gaps, report.broken_links, report.bad_hashes) == ([4], [5], [])
        assert report.checked == 9
    finally:
        await engine.dispose()


async def test_altered_row_is_named_by_seq(database_url: str) -> None:
    engine = await _engine(database_url)
    try:
        await _append_many(engine, 10)
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE receipts SET message_id = 'forged' "
                                    "WHERE component = :c AND seq = 7"), {"c": COMPONENT})
        report = await _verify(engine)
        assert (report.gaps, report.broken_links, report.bad_hashes) == ([], [], [7])
    finally:
        await engine.dispose()


async def test_concurrent_appends_make_a_gapless_chain(database_url: str) -> None:
    engine = await _engine(database_url)
    chain = ReceiptChain(COMPONENT)

    async def one(i: int) -> int:
        # Each task its own transaction, all started together: they race for the chain head.
        async with engine.begin() as conn:
            receipt = await chain.append(conn, ("command", f"c-{i}"), f"m-{i}", payload_digest({"i": i}))
            await asyncio.sleep(0)
            return receipt.seq

    try:
        seqs = await asyncio.gather(*(one(i) for i in range(50)))
        assert sorted(seqs) == list(range(1, 51))
        report = await _verify(engine)
        assert report.ok and report.checked == 50
    finally:
        await engine.dispose()


async def test_concurrent_appends_of_one_source_yield_one_receipt(database_url: str) -> None:
    engine = await _engine(database_url)
    chain = ReceiptChain(COMPONENT)

    async def one() -> int:
        async with engine.begin() as conn:
            return (await chain.append(conn, ("command", "same"), "m", payload_digest(b"p"))).seq

    try:
        assert set(await asyncio.gather(*(one() for _ in range(10)))) == {1}
        assert (await _verify(engine)).checked == 1
    finally:
        await engine.dispose()


def test_cli_verify_exits_0_when_intact_and_1_naming_the_seq_when_tampered(database_url: str) -> None:
    async def setup() -> None:
        engine = await _engine(database_url)
        try:
            await _append_many(engine, 6)
        finally:
            await engine.dispose()

    async def tamper() -> None:
        engine = create_engine(database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("UPDATE receipts SET payload_digest = :d "
                                        "WHERE component = :c AND seq = 2"),
                                   {"d": "0" * 64, "c": COMPONENT})
                await conn.execute(text("DELETE FROM receipts WHERE component = :c AND seq = 5"),
                                   {"c": COMPONENT})
        finally:
            await engine.dispose()

    asyncio.run(setup())
    runner = CliRunner()
    args = ["verify", "--component", COMPONENT, "--database-url", database_url]
    ok = runner.invoke(receipts_app, args)
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output and "6 receipts" in ok.output

    asyncio.run(tamper())
    bad = runner.invoke(receipts_app, args)
    assert bad.exit_code == 1, bad.output
    assert "bad hash: receipt seq 2" in bad.output
    assert "gap: receipt seq 5 is missing" in bad.output
    assert "broken link: receipt seq 6" in bad.output


def test_cli_refuses_unknown_component_and_missing_store(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(receipts_app, ["verify", "--component", "nope"])
    assert result.exit_code == 2 and "unknown component 'nope'" in result.output
    missing = f"sqlite+aiosqlite:///{tmp_path / 'absent.sqlite3'}"
    result = runner.invoke(receipts_app, ["verify", "-c", "gateway", "--database-url", missing])
    assert result.exit_code == 2 and "no database for gateway" in result.output
    assert not (tmp_path / "absent.sqlite3").exists()


async def test_append_many_builds_the_chain_appending_one_by_one_would(
    database_url: str, other_database_url: str
) -> None:
    singly, together = await _engine(database_url), await _engine(other_database_url)
    chain = ReceiptChain(COMPONENT)
    items = [(("command", f"c-{i % 7}"), f"m-{i}", payload_digest({"i": i})) for i in range(12)]
    try:
        for engine in (singly, together):
            async with engine.begin() as conn:
                await chain.append(conn, ("command", "first"), "m-first", payload_digest(b"f"))
        expected = []
        async with singly.begin() as conn:
            for source, message_id, digest in items:
                expected.append(await chain.append(conn, source, message_id, digest))
        async with together.begin() as conn:
            got = await chain.append_many(conn, items)
        assert [(r.seq, r.hash, r.message_id) for r in got] == [
            (r.seq, r.hash, r.message_id) for r in expected]
        assert [r.seq for r in got] == [2, 3, 4, 5, 6, 7, 8, 2, 3, 4, 5, 6]  # repeats return the first
        report = await _verify(together)
        assert report.ok and report.checked == 8
    finally:
        await singly.dispose()
        await together.dispose()
