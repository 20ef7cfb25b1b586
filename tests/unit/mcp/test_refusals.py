"""A refused call reads as its error code, then one sentence of what to do next."""

from __future__ import annotations

import pytest

from kinshasa.client.errors import ERRORS
from kinshasa.mcp.refusals import NEXT_STEP, refusal_text


def test_a_breaker_refusal_starts_with_its_code_and_tells_the_agent_to_stop() -> None:
    text = refusal_text("BREAKER_OPEN", "run r-1's circuit breaker is OPEN (max_writes)",
                        {"breaker": {"state": "OPEN", "trippedReason": "max_writes: 11 > 10"}})
    assert text.startswith("BREAKER_OPEN: stop writing in this run; an operator has been alerted.")
    assert "run r-1's circuit breaker is OPEN" in text
    assert "Breaker: max_writes: 11 > 10." in text


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_every_gateway_error_code_has_a_next_step(code: str) -> None:
    assert code in NEXT_STEP
    assert refusal_text(code, "the gateway's words").startswith(f"{code}: {NEXT_STEP[code]}.")


def test_field_errors_and_retry_after_are_spelt_out() -> None:
    text = refusal_text("VALIDATION", "invalid input",
                        {"fields": [{"path": "title", "message": "required"}]})
    assert "- title: required" in text
    assert "Retry after 2.5 s." in refusal_text("RATE_LIMITED", "slow down", {"retryAfterS": 2.5})


def test_an_unknown_code_still_leads_the_text() -> None:
    assert refusal_text("SOMETHING_NEW", "new words").startswith("SOMETHING_NEW: read the message below")
