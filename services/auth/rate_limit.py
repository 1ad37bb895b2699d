"""Per-client token buckets in one replica's memory, for cheap abuse limits with no database on the path.

Each client (an IPv4 address or an IPv6 /64: `client_ip.client_key`) has a bucket
of `per_minute` tokens refilled continuously; taking from an empty one is refused
with the seconds until the next token. Memory is bounded: at most `max_clients`
buckets, the least recently used dropped first, and a bucket that has refilled is
dropped as well (a full bucket is the same as none). A flood from more clients
than that makes the oldest of them forget their spending, which gives each at
most one more budget: the bound is on memory, never on correctness of the others.

Each replica counts alone: behind a load balancer spreading a client over R
replicas, the effective limit is up to R times `per_minute`. That is the price of
keeping the database off the path these limits protect; they bound cost, not
exact counts (the demo-token limits, which need exact counts, live in Postgres).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBuckets:
    def __init__(self, *, per_minute: int, max_clients: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(max(1, per_minute))
        self._rate = self.capacity / 60.0  # tokens per second
        self._max_clients = max(1, max_clients)
        self._clock = clock
        # client → (tokens left, when that was true)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, client: str, now: float) -> float:
        entry = self._buckets.get(client)
        if entry is None:
            return self.capacity
        tokens, at = entry
        return min(self.capacity, tokens + (now - at) * self._rate)

    def _store(self, client: str, tokens: float, now: float) -> None:
        if tokens >= self.capacity:
            self._buckets.pop(client, None)
            return
        self._buckets[client] = (tokens, now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)

    def take(self, client: str) -> int | None:
        """Spend one token: None if there was one, else the whole seconds until there is."""
        now = self._clock()
        tokens = self._level(client, now)
        if tokens < 1.0:
            self._store(client, tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self._rate))
        self._store(client, tokens - 1.0, now)
        return None

    def give_back(self, client: str) -> None:
        """Return a token taken for something that turned out not to count (a key that was found)."""
        now = self._clock()
        self._store(client, min(self.capacity, self._level(client, now) + 1.0), now)
