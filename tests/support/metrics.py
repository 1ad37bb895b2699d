"""Reading a Prometheus scrape in tests: every sample by name and labels."""

from __future__ import annotations

from collections.abc import Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def scrape(url: str, token: str) -> tuple[Samples, str]:
    r = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    return parse(r.text), r.text


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value (0 if it does not exist yet: a counter never incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def label_values(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], label: str) -> set[str]:
    return {v for (_, labels) in samples for k, v in labels if k == label}
