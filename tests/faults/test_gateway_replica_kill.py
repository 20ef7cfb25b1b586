"""Fault 5: a gateway replica SIGKILLed in the middle of a 64-writer burst on PostgreSQL. Writers whose
replica died retry on the other with the same idempotency key; the breaker trips once and nothing is
admitted past its threshold."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.gateway.conftest import AGENT_KEY, OPERATOR_KEY, PRINCIPALS
from tests.integration.gateway.replicas import gateway_replicas, post

pytestmark = pytest.mark.postgres

LIMIT = 25
WRITERS = 64
ATTEMPTS_PER_WRITER = 3
KILL_AFTER = 10  # answers
WRITE = ('mutation($r: ID!, $k: String!) { createDocument(runId: $r, input: {title: "burst"}, '
         "idempotencyKey: $k) { commandId } }")


def _code(answer: dict[str, Any]) -> str | None:
    errors = answer.get("errors")
    return str(errors[0]["extensions"].get("code")) if errors else None


async def test_a_replica_killed_mid_burst_admits_nothing_past_the_threshold(
        postgres: Any, kafka: Any, tmp_path: Path, examples_catalogue: str) -> None:
    async with gateway_replicas(postgres, kafka.bootstrap, tmp_path, examples_catalogue, PRINCIPALS,
                                [{}, {}]) as gw:
        survivor, doomed = gw.gateways
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
            policy = await post(client, survivor.url, OPERATOR_KEY,
                                'mutation { setPolicy(scope: DEFAULT, reason: "fault", settings: {maxWrites: '
                                f'{LIMIT}, maxVelocity: 100000, quarantineWindowS: 0}}) {{ version }} }}')
            assert not policy.get("errors"), policy
            start = 'mutation { startRun(entryPoint: "f5") { id } }'
            started = await post(client, survivor.url, AGENT_KEY, start)
            run_id = started["data"]["startRun"]["id"]
            gate, midway = asyncio.Event(), asyncio.Event()
            answered = lost = 0

            async def attempt(url: str, key: str) -> dict[str, Any] | None:
                try:
                    return await post(client, url, AGENT_KEY, WRITE, {"r": run_id, "k": key})
                except httpx.TransportError:
                    return None  # the replica died under it: the outcome is unknown

            async def writer(index: int) -> list[dict[str, Any]]:
                nonlocal answered, lost
                await gate.wait()
                answers = []
                for n in range(ATTEMPTS_PER_WRITER):
                    key = f"w{index}-{n}"
                    url = (survivor, doomed)[index % 2].url
                    answer = await attempt(url, key)
                    answered += 1
                    if answered == KILL_AFTER:
                        midway.set()
                    if answer is None:  # a retry with the same key, on the replica that is up
                        lost += 1
                        answer = await attempt(survivor.url, key)
                    for _ in range(5):  # told to retry (a busy database): the same key again
                        if answer is None or _code(answer) != "BACKEND_UNAVAILABLE":
                            break
                        await asyncio.sleep(answer["errors"][0]["extensions"].get("retryAfterS", 1))
                        answer = await attempt(survivor.url, key)
                    assert answer is not None
                    answers.append(answer)
                return answers

            tasks = [asyncio.create_task(writer(i)) for i in range(WRITERS)]
            gate.set()
            await midway.wait()  # mid-burst, before the threshold is reached
            doomed.process.send_signal(signal.SIGKILL)
            results = [r for batch in await asyncio.gather(*tasks) for r in batch]

            accepted = {r["data"]["createDocument"]["commandId"] for r in results if not r.get("errors")}
            refused = [r["errors"][0]["extensions"]["code"] for r in results if r.get("errors")]
            assert lost > 0  # the kill did land on writes
            assert set(refused) <= {"BREAKER_OPEN", "RUN_CLOSED"}, refused
            run = await post(client, survivor.url, OPERATOR_KEY,
                             f'{{ run(id: "{run_id}") {{ breaker {{ state tripCount }} '
                             "commands(first: 200) { commandId } } }")
            stored = {c["commandId"] for c in run["data"]["run"]["commands"]}
            # Exactly the threshold admitted, each an answer some writer got (a retry answered the first).
            assert len(stored) == LIMIT and accepted == stored
            assert run["data"]["run"]["breaker"] == {"state": "OPEN", "tripCount": 1}
        assert doomed.process.wait(timeout=10) == -signal.SIGKILL
