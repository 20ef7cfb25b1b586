"""Fixtures of the gateway's unit tests."""

from __future__ import annotations

import pytest
from graphql import GraphQLSchema

from kinshasa.gateway.graphql import build_schema
from kinshasa.services.registry import example_catalogue, example_declarations


@pytest.fixture(scope="session")
def schema() -> GraphQLSchema:
    """The schema a gateway builds for the example services (graphql-core's, as validation sees it)."""
    declarations = {d.service: d for d in example_declarations()}
    built = build_schema(example_catalogue(), dev_mode=False, extensions=[], declarations=declarations)
    graphql_schema: GraphQLSchema = built._schema
    return graphql_schema
