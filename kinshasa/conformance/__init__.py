"""The conformance kit: checks a running service, in any language, against docs/service-contract.md.

`kinshasa conformance --service NAME` (or `run_conformance` in-process) reads the service's declaration
from `kinshasa.catalogue`, drives the service over its commands and events topics on a run id of its
own, reads its HTTP read API, and reports one row per check of the contract's section 10.

Modules, one concern each:

* `subject` is the service under test, as its declaration (`kinshasa.schemas.declaration`) describes it;
* `checks` holds the pure decisions: which payload to send, whether an answer keeps the contract;
* `driver` is the I/O: the catalogue read, commands out, the service's events in, its read API;
* `suite` runs each check by driving the service through the driver and judging with `checks`;
* `report` is the result and its table; `cli` the `kinshasa conformance` command.
"""

from kinshasa.conformance.errors import CheckFailed, SetupError
from kinshasa.conformance.report import Check, ConformanceReport
from kinshasa.conformance.suite import run_conformance

__all__ = ["Check", "CheckFailed", "ConformanceReport", "SetupError", "run_conformance"]
