"""The gateway schema, built for an operation catalogue and the service declarations it came from.

Query is the hand-written reads plus those generated from each service's read models; Mutation is the
gateway's own mutations plus one agent mutation per catalogued operation. The schema is rebuilt when the
catalogue changes, so everything here is a function of its inputs.
"""

import logging
import types
from collections.abc import Mapping
from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.schema.config import StrawberryConfig

from kinshasa.gateway.entity_reads import Entity, ReadWiring, entity_query, typed_reads
from kinshasa.gateway.errors import camel, code_errors
from kinshasa.gateway.graphql import (
    enums,
    inputs,
    operator_mutations,
    operator_types,
    queries,
    subscriptions,
)
from kinshasa.gateway.graphql import types as run_types
from kinshasa.gateway.graphql.agent_mutations import build_agent_mutation
from kinshasa.gateway.graphql.permissions import AUTHENTICATED, ctx, visible_run
from kinshasa.gateway.graphql.queries import Query
from kinshasa.gateway.graphql.scalars import LONG_SCALAR, Long
from kinshasa.gateway.graphql.subscriptions import Subscription
from kinshasa.kernel.logs import log_context
from kinshasa.schemas.declaration import ServiceDeclaration
from kinshasa.schemas.operations import OperationCatalogue

log = logging.getLogger(__name__)

# The modules whose types are the schema's own: a type generated from a read model never takes their names.
_TYPE_MODULES = (enums, run_types, operator_types, inputs, queries, operator_mutations, subscriptions)


class GatewaySchema(strawberry.Schema):
    """Strawberry's schema with coded, masked errors instead of a traceback logged per error.

    Strawberry calls `process_errors` for every result, pre-execution failures included. A refused
    write (BREAKER_OPEN, VALIDATION, ...) is the gateway working, not an incident: only errors it
    masks as INTERNAL are logged.
    """

    def process_errors(self, errors: list[GraphQLError], execution_context: Any = None) -> None:
        # The run a failed request named (as a variable; a literal is not worth parsing for) goes on
        # the log line of an unexpected error, so it can be found by run id.
        variables = getattr(execution_context, "variables", None)
        run_id = variables.get("runId") if isinstance(variables, dict) else None
        with log_context(run_id=run_id if isinstance(run_id, str) else None):
            code_errors(errors, log)


def static_type_names() -> set[str]:
    """The names of the schema's own types, besides those generated from the catalogue and read models."""
    names = {"Query", "Mutation", "Subscription", "Entity", "EntityVersion", "JSON", "Long"}
    for module in _TYPE_MODULES:
        for value in list(vars(module).values()):
            definition = getattr(value, "__strawberry_definition__", None)
            if definition is not None:
                names.add(definition.name)
    return names


def _backends(info: strawberry.Info) -> Any:
    return ctx(info).reads


def build_query_type(declarations: Mapping[str, ServiceDeclaration]) -> type:
    """Query: the hand-written reads, `entity`, and the reads generated from each service's read models."""
    wiring = ReadWiring(
        permission=AUTHENTICATED, long_type=Long, visible_run=visible_run, backends=_backends
    )
    taken = {f.graphql_name or camel(f.python_name)
             for f in Query.__strawberry_definition__.fields} | {"entity"}  # type: ignore[attr-defined]
    namespace: dict[str, Any] = {"__module__": __name__, "entity": entity_query(wiring)}
    namespace.update(typed_reads(declarations, taken, static_type_names(), wiring))
    cls = types.new_class("Query", (Query,), {}, lambda ns: ns.update(namespace))
    return strawberry.type(cls)


def build_mutation_type(catalogue: OperationCatalogue) -> type:
    namespace: dict[str, Any] = {"__module__": __name__}
    for spec in catalogue:
        namespace[spec.graphql_name] = build_agent_mutation(spec)
    cls = types.new_class(
        "Mutation", (operator_mutations.OperatorMutations,), {}, lambda ns: ns.update(namespace)
    )
    return strawberry.type(cls)


def build_schema(
    catalogue: OperationCatalogue,
    *,
    dev_mode: bool,
    extensions: list[Any],
    declarations: Mapping[str, ServiceDeclaration] | None = None,
) -> strawberry.Schema:
    """The gateway schema for a catalogue and the declarations it came from; hardening extensions are
    passed in by the app."""
    return GatewaySchema(
        query=build_query_type(declarations or {}),
        mutation=build_mutation_type(catalogue),
        subscription=Subscription,
        types=[Entity],
        extensions=extensions,
        config=StrawberryConfig(disable_field_suggestions=not dev_mode, scalar_map={Long: LONG_SCALAR}),
    )
