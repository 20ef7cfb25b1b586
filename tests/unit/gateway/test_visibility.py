"""Who sees what: agents list their own runs only, step states follow read scopes."""

from __future__ import annotations

from kinshasa.gateway.principals import Principal
from kinshasa.gateway.visibility import may_read_step_states, runs_agent, sees_no_runs

AGENT = Principal(id="a1", kind="agent", scopes=frozenset({"documents.*"}))
READER = Principal(id="a2", kind="agent", scopes=frozenset({"documents:read"}))
OPERATOR = Principal(id="op", kind="operator", scopes=frozenset())


def test_an_agent_lists_its_own_runs_whatever_agent_it_names() -> None:
    assert runs_agent(AGENT, None) == "a1"
    assert runs_agent(AGENT, "a1") == "a1"


def test_an_agent_naming_another_agent_sees_no_runs_rather_than_an_error() -> None:
    assert sees_no_runs(AGENT, "someone-else")
    assert not sees_no_runs(AGENT, "a1")
    assert not sees_no_runs(AGENT, None)


def test_an_operator_lists_the_runs_of_the_agent_it_asks_for_or_all() -> None:
    assert runs_agent(OPERATOR, "a1") == "a1"
    assert runs_agent(OPERATOR, None) is None
    assert not sees_no_runs(OPERATOR, "a1")


def test_step_states_need_a_read_scope_not_a_write_scope() -> None:
    assert not may_read_step_states(AGENT, "documents")
    assert may_read_step_states(READER, "documents")
    assert not may_read_step_states(READER, "ledger")
    assert may_read_step_states(OPERATOR, "ledger")
    assert not may_read_step_states(None, "documents")
