"""Usage events: what a gateway replica publishes to the usage stream for the ledger (JetStream).

A request's reservation is opened before any of its answer reaches the buyer and
closed before its response ends; the stream keeps both until a ledger consumer
has written them to Postgres (services/usage/ledger.py). A whole (non-stream)
answer reaches its buyer only at its end, so its reservation goes with its
settlement, in one event (`Whole`). Events a replica
publishes in the same loop turn share one message (services/usage/publisher.py).
Only the control plane publishes or reads them; providers have no access to the stream.
"""

from __future__ import annotations

import datetime as dt

import msgspec


class Opened(msgspec.Struct, tag="open", frozen=True):
    """A request admitted from this replica's quota lease: its reservation."""

    request_id: str
    subject: str
    account_id: int | None
    key_id: int | None
    demo_token_id: str | None
    model: str
    day: dt.date
    tokens: int


class Settlement(msgspec.Struct, frozen=True):
    """How a request ended, for its ledger row."""

    provider_id: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_ms: float | None
    duration_ms: float | None
    outcome: str
    # Nothing reached a provider: the request is not counted against the day.
    refund: bool = False


class Closed(msgspec.Struct, tag="close", frozen=True):
    """How a request ended: its ledger row, and where its concurrency slot goes."""

    request_id: str
    settlement: Settlement
    # The slot goes back to the publishing replica's lease (while it holds one), else to the subject.
    keep_slot: bool


class Whole(msgspec.Struct, tag="whole", frozen=True):
    """A whole (non-stream) answer's reservation and settlement, stored together once it ended.

    Nothing of such an answer reaches its buyer before its settlement is acknowledged, so a replica that
    dies before that leaves nothing to bill, and its lease (which still holds the request) goes back to
    the subject. One event instead of two: one store, acknowledgement, delivery and ack in JetStream, and
    none of a reservation's wait before the provider's answer is read.
    """

    opened: Opened
    closed: Closed

    @property
    def request_id(self) -> str:
        return self.opened.request_id


UsageEvent = Opened | Closed | Whole

ENCODER = msgspec.json.Encoder()
# A message holds one event (an object), or the events a replica published together (an array of them).
_DECODER = msgspec.json.Decoder(UsageEvent | list[UsageEvent])


def decode(data: bytes) -> list[UsageEvent]:
    """The events of one message of the usage stream (raises msgspec.DecodeError)."""
    found = _DECODER.decode(data)
    return found if isinstance(found, list) else [found]
