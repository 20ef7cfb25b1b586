"""An incidents cursor that this gateway did not issue is a VALIDATION error, never a database error."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from kinshasa.gateway.errors import Invalid
from kinshasa.gateway.incidents import Incident, IncidentKind, _decode_cursor, encode_cursor


def _cursor(raw: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(raw).encode()).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        _cursor(["2020-01-01T00:00:00", "x"]),  # no zone: the UTC column would refuse it
        _cursor({"opened": "2020-01-01T00:00:00+00:00"}),
        _cursor([1, 2]),
        _cursor(["2020-01-01T00:00:00+00:00"]),
    ],
)
def test_a_cursor_not_issued_here_is_a_validation_error(cursor: str) -> None:
    with pytest.raises(Invalid) as refused:
        _decode_cursor(cursor)
    assert refused.value.code == "VALIDATION"


def test_an_issued_cursor_reads_back() -> None:
    opened = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    incident = Incident("i-1", IncidentKind.TRIP, None, None, None, None, None, None, None, None, (), 0, (),
                        opened)
    assert _decode_cursor(encode_cursor(incident)) == (opened, "i-1")
