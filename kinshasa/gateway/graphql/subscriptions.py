"""Operator subscriptions over graphql-transport-ws: alerts as they are raised, and one run as it changes."""

from collections.abc import AsyncGenerator

import strawberry

from kinshasa.gateway import live
from kinshasa.gateway.arguments import check_length
from kinshasa.gateway.graphql.operator_types import Alert
from kinshasa.gateway.graphql.permissions import OPERATOR, ctx
from kinshasa.gateway.graphql.types import Run


@strawberry.type(description="Operator only, over graphql-transport-ws; connection_init's payload carries "
                 '{"authorization": "Bearer <operator key>"}.')
class Subscription:
    @strawberry.subscription(
        permission_classes=OPERATOR,
        description="Each alert as it is raised, those of the 30 s before subscribing first, so listing "
        "`alerts` and then subscribing misses none (an alert may come twice: dedupe by id).",
    )
    async def alert_raised(self, info: strawberry.Info) -> AsyncGenerator[Alert, None]:
        context = ctx(info)
        async with context.services.alert_feed.subscribe() as queue:
            while True:
                yield Alert.of(await queue.get())

    @strawberry.subscription(
        permission_classes=OPERATOR, description="The run now, then each time it changes (its revert too)."
    )
    async def run_changed(self, info: strawberry.Info, id: strawberry.ID) -> AsyncGenerator[Run, None]:
        context = ctx(info)
        check_length(str(id), "id")
        connect = lambda: context.reads.database()  # noqa: E731 - the reads of the event being resolved
        async for record in live.run_changes(connect, context.services.backends, str(id)):
            context.renew()
            yield Run.of(record)
