"""Reading a component's `/metrics` in integration tests: one sample by name and labels."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: httpx.AsyncClient, token: str) -> Samples:
    response = await http.get("/metrics", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; a sample that is missing is an error (every bounded label value is exposed)."""
    key = (name, frozenset(labels.items()))
    known = sorted(str(dict(k[1])) for k in samples if k[0] == name)
    assert key in samples, f"/metrics has no {name}{labels}; it has {known}"
    return samples[key]


async def scrape_until(http: httpx.AsyncClient, token: str, wanted: Callable[[Samples], bool], what: str,
                       within_s: float = 30.0) -> Samples:
    """Scrape until `wanted` holds (database figures are cached for a few seconds)."""
    deadline = time.monotonic() + within_s
    while True:
        samples = await scrape(http, token)
        if wanted(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics never showed {what} within {within_s} s")
        await asyncio.sleep(0.1)
