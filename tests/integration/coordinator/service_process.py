"""One example service as its own process, for the coordinator suite and the revert benchmark.

The same `ServiceRuntime`, with the same options, as `kinshasa service <name> --topic-suffix <s>`; like it,
the process only checks its topics: the fleet creates them first.

    python -m tests.integration.coordinator.service_process <name> <topic-suffix>
"""

from __future__ import annotations

import asyncio
import sys

from kinshasa.kernel.logs import configure_logging
from kinshasa.services.kit.runtime import ServiceRuntime, ServiceTopics, serve_forever
from kinshasa.services.registry import load_service
from kinshasa.settings import ServiceSettings, StackSettings


def main(name: str, suffix: str) -> None:
    stack = StackSettings()
    configure_logging(name, stack.log_level)
    runtime = ServiceRuntime(load_service(name), stack=stack, settings=ServiceSettings.for_service(name),
                             topics=ServiceTopics.for_service(name, suffix))
    asyncio.run(serve_forever(runtime))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
