"""Where the `dlq` query and `reprocessDlq` find a component's dead letters: in this process or a backend.

A gateway that keeps its own dead-letter queue answers for the component `gateway` itself; every other
component (and a gateway without one) is asked through its backend. The gateway's own entries are then
never listed twice.
"""

from __future__ import annotations

GATEWAY = "gateway"


def reads_here(has_local: bool, component: str | None) -> bool:
    """Does this process list its own dead letters for a `dlq` query of `component` (None: all)?"""
    return has_local and component in (None, GATEWAY)


def asks_backends(has_local: bool, component: str | None) -> bool:
    """Does a `dlq` query of `component` need the backends? Not when it asked for this gateway's alone."""
    return not (reads_here(has_local, component) and component is not None)


def keeps_backend_answer(has_local: bool, answered: str) -> bool:
    """A backend's answer for `answered` is listed unless this process already listed it as its own."""
    return not (answered == GATEWAY and has_local)


def reprocesses_here(has_local: bool, component: str) -> bool:
    return component == GATEWAY and has_local
