"""Who sees what in the gateway's reads: whose runs a caller lists, whose step states it may read.

Ownership of one run is `runs.check_owner`; these are the rules for lists and for the entity states a
run's steps carry, kept apart from the resolvers so each is one tested decision.
"""

from __future__ import annotations

from kinshasa.gateway.principals import Principal


def runs_agent(principal: Principal, wanted: str | None) -> str | None:
    """The agent whose runs a `runs` query lists: an agent always lists its own, an operator whose it asks."""
    return principal.id if principal.is_agent else wanted


def sees_no_runs(principal: Principal, wanted: str | None) -> bool:
    """An agent asking for another agent's runs gets an empty page, not an error: it has none of them."""
    return principal.is_agent and wanted not in (None, principal.id)


def may_read_step_states(principal: Principal | None, service: str) -> bool:
    """A step's before and after states are entity reads: shown only to a caller who may read `service`."""
    return principal is not None and principal.may_read(service)
