"""Argument checks of the GraphQL resolvers: each refuses bad input with the argument named and a fix."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from kinshasa.gateway.arguments import (
    ID_MAX,
    PAGE_MAX,
    SAFE_INT,
    as_utc,
    check_length,
    check_message_ids,
    check_page,
    optional_reason,
    parse_long,
    policy_reason,
    step_cursor,
)
from kinshasa.gateway.errors import Invalid
from kinshasa.gateway.revert import REASON_MAX


def _fields(exc: pytest.ExceptionInfo[Invalid]) -> list[dict[str, str]]:
    fields: list[dict[str, str]] = exc.value.extensions["fields"]
    return fields


def test_a_value_up_to_the_limit_passes_and_one_past_it_names_the_argument() -> None:
    check_length(None, "after")
    check_length("x" * ID_MAX, "after")
    with pytest.raises(Invalid, match="after is longer than 256 characters") as exc:
        check_length("x" * (ID_MAX + 1), "after")
    assert _fields(exc) == [{"path": "after", "message": "too long"}]
    with pytest.raises(Invalid, match="kind is longer than 64"):
        check_length("k" * 65, "kind", 64)


@pytest.mark.parametrize("first", [1, 50, PAGE_MAX])
def test_a_page_of_one_to_the_maximum_is_taken(first: int) -> None:
    assert check_page(first) == first


@pytest.mark.parametrize("first", [0, -1, PAGE_MAX + 1])
def test_a_page_outside_the_bounds_is_refused(first: int) -> None:
    with pytest.raises(Invalid, match=f"first must be between 1 and {PAGE_MAX}") as exc:
        check_page(first)
    assert _fields(exc) == [{"path": "first", "message": "out of range"}]


def test_a_step_cursor_is_a_positive_step_id_or_absent() -> None:
    assert step_cursor(None) is None
    assert step_cursor("17") == 17


@pytest.mark.parametrize("after", ["0", "-3", "abc", "1.5", "", "1" * 16])
def test_anything_but_a_step_id_is_not_a_step_cursor(after: str) -> None:
    with pytest.raises(Invalid, match=r"pageInfo\.endCursor") as exc:
        step_cursor(after)
    assert _fields(exc) == [{"path": "after", "message": "not a step cursor"}]


def test_an_optional_reason_is_trimmed_and_a_blank_one_is_none() -> None:
    assert optional_reason(None) is None
    assert optional_reason("   ") is None
    assert optional_reason("  stuck run  ") == "stuck run"
    assert optional_reason("r" * REASON_MAX) == "r" * REASON_MAX
    with pytest.raises(Invalid, match=f"at most {REASON_MAX}"):
        optional_reason("r" * (REASON_MAX + 1))


def test_a_policy_change_must_say_why() -> None:
    assert policy_reason("  tighten after incident  ") == "tighten after incident"
    for bad in ("", "   ", "r" * 2001):
        with pytest.raises(Invalid, match="saying why the policy changes") as exc:
            policy_reason(bad)
        assert _fields(exc) == [{"path": "reason", "message": "required"}]


def test_reprocessing_takes_one_to_a_thousand_ids_of_an_ids_length() -> None:
    check_message_ids(["m1"])
    check_message_ids(["m"] * 1000)
    for bad in ([], ["m"] * 1001, ["x" * (ID_MAX + 1)]):
        with pytest.raises(Invalid, match="messageIds must list 1-1000 ids"):
            check_message_ids(bad)


def test_a_moment_without_a_zone_is_utc_and_one_with_a_zone_is_kept() -> None:
    assert as_utc(datetime(2026, 1, 2, 3, 4)) == datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    zoned = datetime(2026, 1, 2, 3, 4, tzinfo=timezone(timedelta(hours=2)))
    assert as_utc(zoned) is zoned


def test_a_long_is_an_integer_every_client_can_represent() -> None:
    assert parse_long(SAFE_INT) == SAFE_INT
    assert parse_long(-SAFE_INT) == -SAFE_INT
    with pytest.raises(ValueError, match="2\\^53"):
        parse_long(SAFE_INT + 1)
    for bad in (True, 1.0, "1", None):
        with pytest.raises(ValueError, match="Long must be an integer"):
            parse_long(bad)
