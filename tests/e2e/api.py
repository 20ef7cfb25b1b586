"""A small GraphQL client for the e2e suite: the same HTTP calls an agent or an operator makes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from kinshasa.schemas.rate_limits import rate_limited_wait

RUN_FIELDS = """id status finishedAt
  breaker { state writes errors servicesTouched trippedReason }
  counts { held awaitingApproval published applied compensated discarded rejected }"""
RECEIPT = ("commandId runId operation entityId status releaseAt result reason appliedAt rejectedReason "
           "compensatedAt")


class GraphQLError(AssertionError):
    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Api:
    """One principal talking to the gateway; `call` raises GraphQLError with the error's code.

    A RATE_LIMITED answer is waited out as every client of ours does (the console, the SDK, the operator
    CLI): the principal's bucket is shared with whatever else it runs (an open console page), and the
    refusal comes before anything ran.
    """

    url: str
    key: str
    rate_limited_retries: ClassVar[int] = 20

    def call(self, query: str, **variables: Any) -> dict[str, Any]:
        return self._answer(self._post(query, variables))

    def _post(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(1, self.rate_limited_retries + 1):
            response = httpx.post(self.url, json={"query": query, "variables": variables},
                                  headers={"Authorization": f"Bearer {self.key}"}, timeout=30.0)
            body: dict[str, Any] = response.json()
            wait = rate_limited_wait(body, min_wait_s=0.05)
            if wait is None or attempt == self.rate_limited_retries:
                break
            time.sleep(wait)
        return body

    @staticmethod
    def _answer(body: dict[str, Any]) -> dict[str, Any]:
        if body.get("errors"):
            first = body["errors"][0]
            code = (first.get("extensions") or {}).get("code")
            raise GraphQLError(f"{code}: {first.get('message')}", code)
        data: dict[str, Any] = body["data"]
        return data

    def error_code(self, query: str, **variables: Any) -> str | None:
        """The error code the gateway answers with; fails the test if the call succeeds."""
        try:
            self._answer(self._post(query, variables))
        except GraphQLError as exc:
            return exc.code
        raise AssertionError(f"expected an error from {query.split('(')[0]!r}, the call succeeded")

    # agent verbs

    def start_run(self, entry_point: str) -> str:
        data = self.call("mutation($e: String!) { startRun(entryPoint: $e) { id } }", e=entry_point)
        return str(data["startRun"]["id"])

    def finish_run(self, run_id: str) -> None:
        self.call("mutation($id: ID!) { finishRun(runId: $id) { id } }", id=run_id)

    def write(self, run_id: str, mutation: str, **input: Any) -> dict[str, Any]:
        """An input-object mutation (createDocument, openAccount, postEntry, link, sendEmail)."""
        kind = f"{mutation[:1].upper()}{mutation[1:]}Input!"
        query = f"mutation($r: ID!, $i: {kind}) {{ {mutation}(runId: $r, input: $i) {{ {RECEIPT} }} }}"
        data = self.call(query, r=run_id, i=input)
        receipt: dict[str, Any] = data[mutation]
        return receipt

    def rename(self, run_id: str, document_id: str, title: str) -> dict[str, Any]:
        data = self.call(f"""mutation($r: ID!, $d: ID!, $t: String!) {{
            renameDocument(runId: $r, documentId: $d, title: $t) {{ {RECEIPT} }} }}""",
                         r=run_id, d=document_id, t=title)
        receipt: dict[str, Any] = data["renameDocument"]
        return receipt

    # reads

    def run(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self.call(f"query($id: ID!) {{ run(id: $id) {{ {RUN_FIELDS} }} }}",
                                        id=run_id)["run"]
        return run

    def commands(self, run_id: str) -> list[dict[str, Any]]:
        data = self.call(f"query($id: ID!) {{ run(id: $id) {{ commands(first: 200) {{ {RECEIPT} }} }} }}",
                         id=run_id)
        found: list[dict[str, Any]] = data["run"]["commands"]
        return found

    def command(self, command_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.call(f"query($id: ID!) {{ command(id: $id) {{ {RECEIPT} }} }}",
                                          id=command_id)["command"]
        return found

    def steps(self, run_id: str) -> list[dict[str, Any]]:
        """Every step of the run, newest first, following the steps connection page by page."""
        found: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = self.call("""query($id: ID!, $after: String) { run(id: $id) {
                steps(first: 200, after: $after) { nodes { stepId forwardType entityKey status }
                                                   pageInfo { hasNextPage endCursor } } } }""",
                             id=run_id, after=after)["run"]["steps"]
            found += page["nodes"]
            if not page["pageInfo"]["hasNextPage"]:
                return found
            after = page["pageInfo"]["endCursor"]

    def set_policy(self, entry_point: str, **settings: Any) -> None:
        """Exactly these settings for the entry point (loosen: a layer otherwise only tightens)."""
        self.call("""mutation($s: String!, $p: PolicyInput!) {
            setPolicy(scope: ENTRY_POINT, subject: $s, settings: $p, reason: "e2e", loosen: true)
            { version } }""",
                  s=entry_point, p=settings)
