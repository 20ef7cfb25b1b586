"""A RATE_LIMITED answer read from a GraphQL response body: how long the gateway asked the caller to wait.

The gateway refuses a request over its principal's rate or in-flight cap before anything runs, with
`extensions.code = RATE_LIMITED` and `retryAfterS`, so sending it again after that wait is safe, even
for a write. The operator CLI and the project's own test and bench clients read the body here; the SDK
(kinshasa/client/retries.py) decides the same from its typed errors, as it depends on nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RATE_LIMITED = "RATE_LIMITED"
# When a refusal gives no retryAfterS (the gateway always does), wait this long.
DEFAULT_WAIT_S = 1.0


def rate_limited_wait(
    body: Mapping[str, Any], max_wait_s: float = 30.0, min_wait_s: float = 0.0
) -> float | None:
    """Seconds to wait before sending the request again, if the gateway refused it whole with
    RATE_LIMITED; None if it did not (an answer, or another error), or if it asks for more than
    `max_wait_s` (the caller then raises the refusal rather than wait that long)."""
    if body.get("data") is not None:
        return None
    for error in body.get("errors") or []:
        extensions = error.get("extensions") if isinstance(error, Mapping) else None
        if isinstance(extensions, Mapping) and extensions.get("code") == RATE_LIMITED:
            given = extensions.get("retryAfterS")
            wait = DEFAULT_WAIT_S
            if isinstance(given, int | float) and not isinstance(given, bool):
                wait = float(given)
            if not 0 <= wait <= max_wait_s:
                return None
            return max(wait, min_wait_s)
    return None
