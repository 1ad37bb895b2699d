"""Counters touched per request: plain numbers on the event loop, exported as Prometheus counters.

prometheus_client's Counter takes a lock per increment (its value is shared with
threads and, in multiprocess mode, a file): a context manager, a method call and
an ownership check, on every request several times. The gateway's per-request
counters are only touched from the event loop, increments and scrapes alike, so
an attribute addition does. The exposition is a counter's (`<name>_total`),
without prometheus_client's `<name>_created` series, which nothing reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry


class Count:
    """One label tuple's count."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class LoopCounter(Collector):
    """A counter with labels, incremented and scraped on the event loop only."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.label_names = list(labels)
        self._series: dict[tuple[str, ...], Count] = {}
        registry.register(self)

    def labels(self, *values: str) -> Count:
        count = self._series.get(values)
        if count is None:
            if len(values) != len(self.label_names):
                raise ValueError(f"{self.name} takes {len(self.label_names)} label values, not {len(values)}")
            count = self._series[values] = Count()
        return count

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.label_names)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.label_names)
        for values, count in list(self._series.items()):
            family.add_metric(list(values), count.value)
        yield family
