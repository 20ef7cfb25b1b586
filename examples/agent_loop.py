"""A scripted agent (no model) on the Python SDK: it does a little honest work, then goes rogue on purpose
and is stopped by its run's circuit breaker.

Point it at a running stack (`make run`); it finds the dev stack's agent key by itself:

    python examples/agent_loop.py [--url http://127.0.0.1:8000/graphql] [--key-file F] [--rogue-writes 400]

1. It starts a run at the entry point `agent-loop`, creates a document and waits on the receipt until the
   documents service applied it (the write sits out the run's quarantine window first), then reads it.
2. It "goes rogue": a loop renaming that document as fast as the gateway answers, as a confused agent
   might. The breaker counts the writes; past the policy's velocity (or write) limit it trips, the next
   write is refused with BREAKER_OPEN and the agent stops. With the default policy the trip also reverts
   the run: the held renames are discarded and the applied steps undone by the coordinator.

It prints what happened and exits 0 when the breaker stopped it, 1 when it never tripped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from kinshasa.client import BreakerOpen, Kinshasa, RunClosed

ENTRY_POINT = "agent-loop"


def default_key() -> str:
    """KINSHASA_KEY, else the first agent key of the dev stack's credentials file."""
    if key := os.environ.get("KINSHASA_KEY", "").strip():
        return key
    data_dir = Path(os.environ.get("KINSHASA_DATA_DIR", ".kinshasa"))
    document = json.loads((data_dir / "credentials.json").read_text(encoding="utf-8"))
    return next(str(p["key"]) for p in document["principals"] if p["kind"] == "agent")


async def agent_loop(url: str, key: str, rogue_writes: int, entry_point: str = ENTRY_POINT) -> bool:
    """Run the script; True when the breaker stopped the rogue loop."""
    async with Kinshasa(url, key) as client, client.run(entry_point, purpose="tidy the roadmap") as run:
        print(f"run {run.id} started at {entry_point}")

        created = await run.create_document(title="Roadmap", body="Q1: ship the ring")
        print(f"createDocument -> {created.status} (command {created.command_id})")
        applied = await created.applied(timeout=60)
        document = await client.entity("documents", "document", applied.entity_id)
        title = document["title"] if document else None
        print(f"applied at {applied.applied_at:%H:%M:%S}; the service now has title {title!r}")

        print(f"going rogue: up to {rogue_writes} renames as fast as the gateway answers")
        started = time.monotonic()
        for n in range(1, rogue_writes + 1):
            try:
                await run.rename_document(applied.entity_id, title=f"Roadmap v{n}")
            except BreakerOpen as stop:
                took = time.monotonic() - started
                snapshot = stop.breaker
                print(f"write {n} refused after {took:.1f}s: {stop.code}: {stop.message}")
                print(f"breaker {snapshot.get('state')}: {snapshot.get('trippedReason')}")
                print("stopping, as BREAKER_OPEN asks: an operator has been alerted")
                break
            except RunClosed as closed:
                # The trip's auto-revert closed the run between two writes: stopped all the same.
                print(f"write {n} refused: {closed.code}: {closed.message}")
                break
        else:
            print(f"the breaker never tripped in {rogue_writes} writes")
            return False
        final = await run.get()
        print(f"run {run.id} is {final['status']}; counts {final['counts']}")
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("KINSHASA_URL", "http://127.0.0.1:8000/graphql"))
    parser.add_argument("--key-file", type=Path, help="a file holding an agent key (default: KINSHASA_KEY, "
                        "else the dev stack's credentials file)")
    parser.add_argument("--rogue-writes", type=int, default=400)
    parser.add_argument("--entry-point", default=ENTRY_POINT)
    args = parser.parse_args()
    key = args.key_file.read_text(encoding="utf-8").strip() if args.key_file else default_key()
    stopped = asyncio.run(agent_loop(args.url, key, args.rogue_writes, args.entry_point))
    sys.exit(0 if stopped else 1)


if __name__ == "__main__":
    main()
