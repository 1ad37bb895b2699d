"""This replica's view of the provider pool, rebuilt from heartbeats (soft state).

Nothing here is durable: a restarted gateway asks every daemon for a heartbeat
(`PROBE`) and is routable again within one round trip.

Heartbeats are claims (services/gateway/membership.py bounds them); routing
leans on what this replica sees itself wherever it can: the requests it has
running at each provider (a provider cannot hide load from the replica that
sent it the work), the time to first token and the decoding speed it measured,
and whether the provider failed it lately.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from schemas.bus import Heartbeat

LostCallback = Callable[[str], None]

# Weight of a new measurement in the moving averages.
_ALPHA = 0.3
# A provider that failed this replica (vanished, stalled, broke the protocol) goes behind
# the others for this long.
SUSPECT_S = 60.0
# Answer length the routing compares providers on: first-token time + this many tokens.
_TYPICAL_TOKENS = 128
# A decoding speed is measured on answers at least this long (tokens and seconds).
_MIN_RATE_TOKENS = 16
_MIN_RATE_S = 0.2
# A claimed decoding speed counts for the pool's status only up to this until measured.
UNMEASURED_TPS_CAP = 100.0


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - _ALPHA) * old + _ALPHA * new


@dataclass(slots=True)
class Observed:
    """What this replica measured of one provider itself (kept across heartbeats)."""

    # Requests of this replica running there now.
    inflight: int = 0
    first_token_s: float | None = None
    decode_tps: float | None = None
    failed_at: float = float("-inf")
    # The daemon run (boot id) heard last, and when (wall clock) this replica first heard it: a
    # lower bound on that run's uptime, shown to its owner (services/providers/view.py).
    boot_id: str = ""
    up_since: float = 0.0

    def expected_s(self) -> float:
        """Seconds a typical answer takes there; 0 until measured (new providers get tried)."""
        if self.first_token_s is None:
            return 0.0
        return self.first_token_s + (_TYPICAL_TOKENS / self.decode_tps if self.decode_tps else 0.0)


@dataclass(slots=True)
class ProviderState:
    heartbeat: Heartbeat
    last_seen: float
    # Requests this replica sent since the provider's last heartbeat and that are
    # still running: the heartbeat does not count them yet, so we do, to avoid
    # piling onto one Mac. Ones that finish before the next heartbeat give their
    # place back (see `PoolView.note_finished`).
    sent_since_heartbeat: int = 0
    # Which heartbeat this state was built from; a new heartbeat makes a new state.
    epoch: int = 0
    observed: Observed = field(default_factory=Observed)

    @property
    def provider_id(self) -> str:
        return self.heartbeat.provider_id

    def free_slots(self) -> int:
        hb = self.heartbeat
        return min(hb.slots_free - self.sent_since_heartbeat, hb.slots - self.observed.inflight)

    def room(self) -> int:
        """Requests it can take now, running or queued on the daemon."""
        hb = self.heartbeat
        claimed = hb.slots_free + max(0, hb.queue_limit - hb.queue_depth) - self.sent_since_heartbeat
        return min(claimed, hb.slots + hb.queue_limit - self.observed.inflight)

    def load(self) -> float:
        hb = self.heartbeat
        busy = max(hb.slots - hb.slots_free + hb.queue_depth + self.sent_since_heartbeat, self.observed.inflight)
        return busy / max(1, hb.slots)

    def decode_tps(self) -> float:
        """Measured here if it was; until then the claim, capped (for the pool's status, not routing)."""
        measured = self.observed.decode_tps
        return measured if measured is not None else min(self.heartbeat.decode_tps, UNMEASURED_TPS_CAP)

    def serves(self, model: str, *, structured: bool = False) -> bool:
        """It has `model` loaded (and, if `structured`, can constrain its output to JSON)."""
        return any(m.id == model and (m.structured_output or not structured) for m in self.heartbeat.models)


@dataclass
class PoolView:
    heartbeat_misses: int = 3
    clock: Callable[[], float] = time.monotonic
    routing: str = "least-loaded"
    providers: dict[str, ProviderState] = field(default_factory=dict)
    _watchers: dict[str, dict[int, LostCallback]] = field(default_factory=dict)
    _next_watch: int = 0
    _epochs: int = 0
    # Measurements outlive heartbeats and short absences (a provider that rejoins is not new).
    _observed: dict[str, Observed] = field(default_factory=dict)

    def observe(self, hb: Heartbeat) -> None:
        if hb.draining:
            # A draining daemon finishes its work but takes nothing new.
            self.providers.pop(hb.provider_id, None)
            return
        self._epochs += 1
        observed = self._observed.get(hb.provider_id)
        if observed is None:
            self._prune_observed()
            observed = self._observed[hb.provider_id] = Observed()
        if observed.boot_id != hb.boot_id:
            observed.boot_id, observed.up_since = hb.boot_id, time.time()
        self.providers[hb.provider_id] = ProviderState(
            heartbeat=hb, last_seen=self.clock(), epoch=self._epochs, observed=observed
        )

    def _prune_observed(self) -> None:
        """Forget idle measurements of providers gone from the pool, once they outnumber it."""
        if len(self._observed) > 2 * len(self.providers) + 256:
            for pid in [p for p, o in self._observed.items() if p not in self.providers and o.inflight == 0]:
                del self._observed[pid]

    # ---- what this replica measured -----------------------------------------------------

    def measured(self, provider_id: str) -> Observed:
        observed = self._observed.get(provider_id)
        if observed is None:
            observed = self._observed[provider_id] = Observed()
        return observed

    def note_first_token(self, provider_id: str, seconds: float) -> None:
        o = self.measured(provider_id)
        o.first_token_s = _ewma(o.first_token_s, seconds)

    def note_decoding(self, provider_id: str, tokens: int, seconds: float) -> None:
        # Short answers arrive in a burst or two: their rate says more about the network than the Mac.
        if tokens >= _MIN_RATE_TOKENS and seconds >= _MIN_RATE_S:
            o = self.measured(provider_id)
            o.decode_tps = _ewma(o.decode_tps, tokens / seconds)

    def note_failure(self, provider_id: str) -> None:
        """The provider failed a request of ours: it goes behind the others for a while."""
        self.measured(provider_id).failed_at = self.clock()

    def suspect(self, state: ProviderState) -> bool:
        return self.clock() - state.observed.failed_at < SUSPECT_S

    def remove(self, provider_id: str, boot_id: str | None = None) -> bool:
        state = self.providers.get(provider_id)
        if state is None or (boot_id is not None and state.heartbeat.boot_id != boot_id):
            return False
        del self.providers[provider_id]
        self._notify_lost(provider_id)
        return True

    def withdraw(self, provider_id: str, *, fail_in_flight: bool) -> None:
        """Stop routing to a provider now, whatever its heartbeats say (an operator's drain or ban).

        A drain lets its running requests finish; a ban fails them here (the
        failover moves them elsewhere), even if it was already out of routing.
        """
        self.providers.pop(provider_id, None)
        if fail_in_flight:
            self._notify_lost(provider_id)

    def expire(self) -> list[str]:
        """Drop providers whose heartbeats stopped; returns their ids."""
        now = self.clock()
        gone = [
            pid
            for pid, state in self.providers.items()
            if now - state.last_seen > self.heartbeat_misses * state.heartbeat.interval_s
        ]
        for pid in gone:
            del self.providers[pid]
            self._notify_lost(pid)
        return gone

    def candidates(
        self, model: str, conversation: str | None = None, *, structured: bool = False
    ) -> list[ProviderState]:
        """Providers that can take a request for `model` now, best first.

        Rule: a provider that failed this replica lately goes last; then one
        with a free slot beats one that would queue; then the least loaded (busy
        + queued per slot, and never less than what this replica has running
        there); then the one with more slots (a queued request waits for the
        first of them to finish, so more slots means a shorter wait); then the
        one this replica measured fastest (untried ones first). But a
        provider whose prompt cache holds the conversation (`conversation`, a
        key from schemas.conversations) goes first when it has a free slot, or
        when it is at most one request per slot busier than the best: re-reading
        a long conversation costs more than that. A request for JSON output
        (`structured`) only goes to providers that can constrain it.
        """
        able = [s for s in self.providers.values() if s.serves(model, structured=structured) and s.room() > 0]
        if self.routing == "random":
            random.shuffle(able)  # the benchmark's baseline, never the default
            return able
        able.sort(
            key=lambda s: (self.suspect(s), s.free_slots() <= 0, s.load(), -s.heartbeat.slots, s.observed.expected_s())
        )
        if conversation and able:
            best = able[0]
            warm = next((s for s in able if conversation in s.heartbeat.cached_conversations), None)
            if warm is not None and warm is not best and (warm.free_slots() > 0 or warm.load() <= best.load() + 1):
                able.remove(warm)
                able.insert(0, warm)
        return able

    def silent(self, provider_id: str, intervals: float) -> bool:
        """True if the provider's heartbeats stopped for `intervals` of its own intervals."""
        state = self.providers.get(provider_id)
        if state is None:
            return False  # already gone: its watchers were told
        return self.clock() - state.last_seen > intervals * state.heartbeat.interval_s

    def note_sent(self, provider_id: str) -> int:
        """Count a request sent to the provider; returns a token for `note_finished`."""
        self.measured(provider_id).inflight += 1
        state = self.providers.get(provider_id)
        if state is None:
            return 0
        state.sent_since_heartbeat += 1
        return state.epoch

    def note_finished(self, provider_id: str, epoch: int) -> None:
        """A request ended; if no heartbeat has counted it since it was sent, un-count it."""
        observed = self._observed.get(provider_id)
        if observed is not None and observed.inflight > 0:
            observed.inflight -= 1
        state = self.providers.get(provider_id)
        if state is not None and state.epoch == epoch and state.sent_since_heartbeat > 0:
            state.sent_since_heartbeat -= 1

    def serves_model(self, model: str) -> bool:
        """Some provider in the view serves `model` now (busy or not)."""
        return any(s.serves(model) for s in self.providers.values())

    def can_structure(self, model: str) -> bool:
        """Some provider serving `model` can constrain its output to JSON (busy or not)."""
        return any(s.serves(model, structured=True) for s in self.providers.values())

    def models(self) -> dict[str, list[ProviderState]]:
        served: dict[str, list[ProviderState]] = {}
        for state in self.providers.values():
            for m in state.heartbeat.models:
                served.setdefault(m.id, []).append(state)
        return served

    def watch(self, provider_id: str, callback: LostCallback) -> int:
        """Call `callback(provider_id)` if the provider leaves the pool; returns a handle."""
        self._next_watch += 1
        self._watchers.setdefault(provider_id, {})[self._next_watch] = callback
        return self._next_watch

    def unwatch(self, provider_id: str, handle: int) -> None:
        watchers = self._watchers.get(provider_id)
        if watchers is not None:
            watchers.pop(handle, None)
            if not watchers:
                del self._watchers[provider_id]

    def _notify_lost(self, provider_id: str) -> None:
        for callback in list(self._watchers.pop(provider_id, {}).values()):
            callback(provider_id)
