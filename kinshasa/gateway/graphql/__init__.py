"""The gateway's GraphQL layer: the schema, its types, reads, agent and operator mutations, permissions.

Resolvers here stay thin: they parse arguments, check permission, call a plain function of the gateway
(`runs`, `revert`, `quarantine`, `arguments`, `policy_input`, ...) and map its result to a type.

- `schema`: `build_schema`, the schema for a catalogue and its service declarations
- `types`, `operator_types`, `inputs`, `enums`, `scalars`: what the schema shows and takes
- `queries`, `subscriptions`: the hand-written reads
- `agent_mutations`: one mutation per catalogued operation, generated
- `operator_mutations`: startRun, finishRun and every operator action
- `permissions`: who may call what, checked in one place
"""

from kinshasa.gateway.graphql.operator_mutations import operator_mutation_names
from kinshasa.gateway.graphql.scalars import Long
from kinshasa.gateway.graphql.schema import GatewaySchema, build_schema

__all__ = ["GatewaySchema", "Long", "build_schema", "operator_mutation_names"]
