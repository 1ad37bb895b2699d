"""Which gateways are still there for the requests they sent here.

A gateway replica that dies (killed, out of memory, its host gone) cannot cancel its
requests, and a provider's frames to it go nowhere without a word: NATS drops a message
nobody subscribes to. Without this, the Mac would generate each of them on to max_tokens
or the request's deadline (10 minutes by default) for nobody, its batch slots taken from
live buyers. A gateway that asks for it (`InferenceRequest.keepalive_ms`) says every so
often that it is still there (`bus.GatewayAlive`); its work messages say so too. Its
requests stop once it has been silent for `MISSED` of its intervals. A gateway that
asks for nothing (an older one) is never judged.

Each `GatewayAlive` also lists the gateway's requests open with this provider: one that
`UNWANTED_AFTER` notices in a row leave out is not wanted any more (its cancel was lost
while this provider's connection was down) and stops too (daemon/provider.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

# Intervals a gateway may miss before its requests stop: a late timer or a dropped message is not death.
MISSED = 3
# Notices in a row that must leave a request out before it stops: one could cross its work message.
UNWANTED_AFTER = 2


class GatewayWatch:
    """When each gateway was last heard from (a work message or a `GatewayAlive`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heard: dict[str, float] = {}

    def heard(self, gateway_id: str) -> None:
        self._heard[gateway_id] = self._clock()

    def silent(self, gateway_id: str, keepalive_s: float) -> bool:
        """Whether a gateway that promised a word every `keepalive_s` has said nothing for MISSED of them."""
        if keepalive_s <= 0:
            return False
        heard = self._heard.get(gateway_id)
        return heard is not None and self._clock() - heard > MISSED * keepalive_s

    def keep_only(self, gateway_ids: Iterable[str]) -> None:
        """Forget the gateways with no request here any more (a gateway id is one replica's life)."""
        keep = set(gateway_ids)
        for gateway_id in [g for g in self._heard if g not in keep]:
            del self._heard[gateway_id]
