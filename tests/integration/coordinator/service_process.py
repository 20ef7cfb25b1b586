"""One example service as its own process, for the coordinator suite and the revert benchmark.

The same `ServiceRuntime` as `kinshasa service <name> --topic-suffix <s>`, with one difference: the
consumer takes one record per poll. `AsyncConsumer.consume(batch, timeout)` waits out the whole poll
timeout whenever fewer than `batch` records are waiting, which puts up to 0.5 s on every hop of a
revert's ack loop at low rates; with a batch of one it returns as soon as a record is there.

    python -m tests.integration.coordinator.service_process <name> <topic-suffix>
"""

from __future__ import annotations

import asyncio
import sys

from kinshasa.kernel.logs import configure_logging
from kinshasa.services.kit.runtime import RuntimeOptions, ServiceRuntime, ServiceTopics, serve_forever
from kinshasa.services.registry import load_service
from kinshasa.settings import ServiceSettings, StackSettings


def main(name: str, suffix: str) -> None:
    stack = StackSettings()
    configure_logging(name, stack.log_level)
    runtime = ServiceRuntime(load_service(name), stack=stack, settings=ServiceSettings.for_service(name),
                             topics=ServiceTopics.for_service(name, suffix),
                             options=RuntimeOptions(consumer_batch_size=1, ensure_topics=True))
    asyncio.run(serve_forever(runtime))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
