"""`kinshasa revert` selects runs by the gateway's own rule: what the CLI sends is what the gateway reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from kinshasa.operator.gateway_client import GatewayError, selection
from kinshasa.schemas.run_selection import MAX_SELECTED, RunSelection, SelectionError

SINCE = datetime(2025, 1, 1, 12, 0)
CASES = [
    (["r1"], None, None, None, None),
    (["r1", "r2"], "agent-7", None, None, None),
    ([], None, "chat", SINCE, None),
    ([], "agent-7", "chat", SINCE, SINCE + timedelta(hours=1)),
    ([], None, None, SINCE.replace(tzinfo=timezone(timedelta(hours=2))), None),
]


@pytest.mark.parametrize(("run_ids", "agent", "entry_point", "since", "until"), CASES)
def test_the_gateway_reads_back_exactly_the_selection_the_cli_checked(
    run_ids: list[str], agent: str | None, entry_point: str | None, since: datetime | None,
    until: datetime | None,
) -> None:
    chosen = selection(run_ids, agent, entry_point, since, until)
    # The gateway parses the RunSelector input and checks it by the same rule.
    assert RunSelection.from_graphql(chosen.to_graphql()).checked() == chosen


def test_a_time_without_a_zone_is_utc_and_one_with_a_zone_is_converted() -> None:
    assert selection([], "a", None, SINCE, None).started_after == SINCE.replace(tzinfo=UTC)
    paris = datetime(2025, 1, 1, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    assert selection([], "a", None, paris, None).started_after == datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def test_the_cli_refuses_what_the_gateway_refuses_in_the_words_of_its_options() -> None:
    bad = [
        ((["r1"], None, None, SINCE, SINCE), "startedAfter must be before startedBefore",
         "--since must be before --until"),
        (([f"r{i}" for i in range(MAX_SELECTED + 1)], None, None, None, None),
         f"at most {MAX_SELECTED} runIds", f"at most {MAX_SELECTED} --run ids"),
        (([], None, None, None, None), "the selector is empty", "say which runs: --run ID"),
    ]
    for (run_ids, agent, entry_point, since, until), gateway_words, cli_words in bad:
        with pytest.raises(SelectionError, match=gateway_words):
            RunSelection(tuple(run_ids) or None, agent, entry_point, since, until).checked()
        with pytest.raises(GatewayError, match=cli_words):
            selection(run_ids, agent, entry_point, since, until)


def test_only_run_ids_must_all_exist_while_other_criteria_narrow_a_search() -> None:
    assert RunSelection(run_ids=("r1",)).names_runs_only()
    assert not RunSelection(run_ids=("r1",), agent_id="a").names_runs_only()
    assert not RunSelection(agent_id="a").names_runs_only()
