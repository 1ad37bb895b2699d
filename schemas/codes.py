"""The bus's vocabulary: the codes a request fails with, worker states, how an exchange ends.

Defined once, as `Literal`s, so mypy checks every producer (the daemon raising an
`EngineError`, the gateway ending a call) and every consumer sorts a code by the
sets below instead of by its spelling. On the wire a code stays an open string
(`bus.Failed.code`): a newer peer may send a code this one does not know, and
it is then the provider's failure, never the buyer's.
"""

from __future__ import annotations

import typing
from typing import Literal

# The request itself cannot run: the buyer's error (a 400 naming `param`).
RequestFault = Literal[
    "invalid_value",
    "invalid_messages",
    "context_length_exceeded",
    "context_over_budget",
    "unsupported_value",
    # A chat template or JSON schema that takes the provider longer than its time limit.
    "request_too_complex",
]

# The provider failed, not the request: another provider may take it over (before or during generation).
Recoverable = Literal[
    "worker_crashed",
    "worker_restarting",
    "worker_unavailable",
    "provider_stopping",
    "provider_draining",
    "provider_internal_error",
    "provider_busy",
    "engine_error",
    "model_not_loaded",
    # The provider stopped it because its gateway replica fell silent (daemon/gateways.py): if that replica
    # was only paused, not dead, another provider continues the answer.
    "gateway_unheard",
]

# The provider failed and handing the request on would not help (or is not safe).
ProviderFault = Literal[
    "bad_request",
    "load_failed",
    "model_not_found",
    "invalid_continuation",
]

# Every code a daemon fails a request with (`bus.Failed.code`, `EngineError.code`).
FailCode = RequestFault | Recoverable | ProviderFault

# How a gateway's call or exchange ends when it is not the provider's own code.
StreamEnd = Literal[
    "ok",
    "error",
    "client_disconnected",
    "internal_error",
    "provider_lost",
    "provider_timeout",
    "provider_protocol_error",
    "first_token_timeout",
    "route_closed",
    # The replica's shutdown grace ran out (services/gateway/dispatch.py: `Dispatcher.cut`).
    "shutting_down",
]

# The inference worker as a heartbeat reports it: "restarting" (crashed, coming back) and
# "idle" (unloaded, reloads on demand) mean no room now; "none" means no model was ever loaded.
WorkerState = Literal["healthy", "starting", "idle", "restarting", "stopping", "none"]

REQUEST_FAULTS: frozenset[str] = frozenset(typing.get_args(RequestFault))
RECOVERABLE: frozenset[str] = frozenset(typing.get_args(Recoverable))
FAIL_CODES: frozenset[str] = frozenset(REQUEST_FAULTS | RECOVERABLE | set(typing.get_args(ProviderFault)))
STREAM_ENDS: frozenset[str] = frozenset(typing.get_args(StreamEnd))
WORKER_STATES: frozenset[str] = frozenset(typing.get_args(WorkerState))


def is_request_fault(code: str) -> bool:
    """The buyer's fault: only a known code (anything else a provider says is its own failure)."""
    return code in REQUEST_FAULTS


def is_recoverable(code: str) -> bool:
    return code in RECOVERABLE
