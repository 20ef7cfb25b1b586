"""The result of a conformance run: one row per check, and the plain-text table the command prints."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class Check(NamedTuple):
    """One check's row: its name (`apply:open`), whether the service passed it, and what was seen."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class ConformanceReport:
    """Every check of one run against one service; `ok` only if all of them passed."""

    service: str
    run_id: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(1 for c in self.checks if c.passed)

    @property
    def failed(self) -> int:
        return len(self.checks) - self.passed

    @property
    def ok(self) -> bool:
        return bool(self.checks) and self.failed == 0

    def summary(self) -> str:
        """The closing line, `N passed, M failed`."""
        return f"{self.passed} passed, {self.failed} failed"

    def render(self) -> str:
        """The table, then the closing line alone on its own line."""
        return f"{render_table(self.checks)}\n{self.summary()}"


def render_table(checks: Sequence[Check]) -> str:
    """Checks as aligned plain-text columns CHECK, RESULT, DETAIL; a detail stays on one line."""
    rows = [("CHECK", "RESULT", "DETAIL")]
    rows += [(c.name, "PASS" if c.passed else "FAIL", " ".join(c.detail.split())) for c in checks]
    name_width = max(len(r[0]) for r in rows)
    result_width = max(len(r[1]) for r in rows)
    return "\n".join(f"{n.ljust(name_width)}  {r.ljust(result_width)}  {d}".rstrip() for n, r, d in rows)
