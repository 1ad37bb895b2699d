"""Every NATS subject the system uses, built here and nowhere else.

Subjects are an API between independently deployed gateways and daemons, so
they are versioned (`mp.v1`). Reply subjects sit under a per-provider prefix
(`mp.v1.reply.<provider>.…`): NATS permissions can then let only that provider
publish there, which also proves to the gateway who sent each chunk.
"""

from __future__ import annotations

PREFIX = "mp.v1"


class SubjectError(ValueError):
    pass


def _token(kind: str, value: str) -> str:
    if not valid_token(value):
        raise SubjectError(f"invalid {kind} {value!r}: use 1-64 of A-Z a-z 0-9 _ -")
    return value


def valid_token(value: str) -> bool:
    """Whether `value` may be a subject token (a provider, gateway or request id): 1-64 of A-Z a-z 0-9 _ -,
    so no dots, wildcards or whitespace.

    Not the regular expression `^[A-Za-z0-9_-]{1,64}$` it replaces: its `$` also matched before a final
    newline (it let "abc\n" through), and a match cost the gateway about 1,500 instructions, 10 per request.
    """
    return 0 < len(value) <= 64 and value.isascii() and value.replace("-", "a").replace("_", "a").isalnum()


def work(provider_id: str) -> str:
    """Inference requests routed to one provider."""
    return f"{PREFIX}.work.{_token('provider id', provider_id)}"


def cancel(provider_id: str) -> str:
    """Cancellations for requests a provider is running."""
    return f"{PREFIX}.cancel.{_token('provider id', provider_id)}"


def notices(provider_id: str) -> str:
    """The control plane's notices to one provider (`bus.PoolNotice`: how the pool sees its models)."""
    return f"{PREFIX}.notice.{_token('provider id', provider_id)}"


def heartbeat(provider_id: str) -> str:
    return f"{PREFIX}.heartbeat.{_token('provider id', provider_id)}"


HEARTBEATS = f"{PREFIX}.heartbeat.*"


def leave(provider_id: str) -> str:
    """A daemon announces it is leaving the pool (drain finished / shutdown)."""
    return f"{PREFIX}.leave.{_token('provider id', provider_id)}"


LEAVES = f"{PREFIX}.leave.*"

# Gateways ask every daemon for an immediate heartbeat (a fresh replica fills its pool view at once).
PROBE = f"{PREFIX}.pool.probe"


def drain(provider_id: str) -> str:
    """An operator asks one provider to finish its in-flight requests and take no new ones."""
    return f"{PREFIX}.drain.{_token('provider id', provider_id)}"


# Every provider's work, cancels, drains and replies: what the control plane's NATS user may touch.
ALL_WORK = f"{PREFIX}.work.*"
ALL_CANCELS = f"{PREFIX}.cancel.*"
ALL_DRAINS = f"{PREFIX}.drain.*"
ALL_NOTICES = f"{PREFIX}.notice.*"
ALL_REPLIES = f"{PREFIX}.reply.>"


def reply(provider_id: str, gateway_id: str, request_id: str) -> str:
    """Where a provider streams one request's frames back to one gateway replica."""
    return (
        f"{PREFIX}.reply.{_token('provider id', provider_id)}."
        f"{_token('gateway id', gateway_id)}.{_token('request id', request_id)}"
    )


def replies_for_gateway(gateway_id: str) -> str:
    """One wildcard subscription per gateway replica receives all its replies."""
    return f"{PREFIX}.reply.*.{_token('gateway id', gateway_id)}.*"


def bundle(provider_id: str, gateway_id: str) -> str:
    """Where a provider sends one gateway replica the frames of several requests in one message.

    Under the provider's reply prefix (so its permission covers it and the subject names the sender),
    one token shorter than a single request's reply subject.
    """
    return f"{PREFIX}.reply.{_token('provider id', provider_id)}.{_token('gateway id', gateway_id)}"


def bundles_for_gateway(gateway_id: str) -> str:
    """One wildcard subscription per gateway replica receives every provider's bundles for it."""
    return f"{PREFIX}.reply.*.{_token('gateway id', gateway_id)}"


def parse_bundle(subject: str) -> str:
    """The provider id of a bundle subject (`bundle`)."""
    parts = subject.split(".")
    if len(parts) != 5 or f"{parts[0]}.{parts[1]}" != PREFIX or parts[2] != "reply":
        raise SubjectError(f"not a bundle subject: {subject!r}")
    return parts[3]


def reply_prefix(provider_id: str) -> str:
    """The prefix a provider may publish replies under (for permissions and checks)."""
    return f"{PREFIX}.reply.{_token('provider id', provider_id)}."


def provider_replies(provider_id: str) -> str:
    """Every reply subject one provider may publish to (its NATS permission)."""
    return f"{reply_prefix(provider_id)}>"


def parse_reply(subject: str) -> tuple[str, str, str]:
    """(provider_id, gateway_id, request_id) of a reply subject."""
    parts = subject.split(".")
    if len(parts) != 6 or f"{parts[0]}.{parts[1]}" != PREFIX or parts[2] != "reply":
        raise SubjectError(f"not a reply subject: {subject!r}")
    return parts[3], parts[4], parts[5]


def parse_provider(subject: str) -> str:
    """The provider id that ends a heartbeat/leave subject."""
    return subject.rsplit(".", 1)[-1]


# ---- usage events: the ledger's durable queue (a JetStream stream) ---------------------------

# Every gateway replica publishes its requests' usage events (reservation opened, settled) on its own
# subject, so one consumer applies one replica's events in the order it published them.
USAGE_STREAM = "MP_USAGE"
ALL_USAGE_EVENTS = f"{PREFIX}.usage.>"


def usage_events(gateway_id: str) -> str:
    return f"{PREFIX}.usage.{_token('gateway id', gateway_id)}"


def usage_consumer(gateway_id: str) -> str:
    """The durable consumer that applies one replica's usage events to the ledger."""
    return f"ledger-{_token('gateway id', gateway_id)}"


# A replica waiting for the ledger (a quota refusal being rechecked, a buyer reading their usage) asks
# every replica's consumer to write what it holds now rather than at the end of its linger. Outside the
# stream's subjects (`ALL_USAGE_EVENTS`): it is not an event and must not be stored.
LEDGER_HURRY = f"{PREFIX}.ledger.hurry"


# JetStream's API and acknowledgements for that stream only: what the control plane's NATS user may use
# of JetStream. These are the requests nats-py (2.16) sends for add_stream / update_stream / stream_info,
# add_consumer and pull_subscribe (CONSUMER.CREATE.<stream>.<name>[.<filter>], or the legacy
# DURABLE.CREATE), consumer_info, delete_consumer and fetch (MSG.NEXT). Each names the stream in a fixed
# position: a wildcard before it (`CONSUMER.*.*.MP_USAGE.>`) would also match
# `CONSUMER.CREATE.<other stream>.MP_USAGE.x`, i.e. a consumer named MP_USAGE reading another stream.
# Nothing of any other stream, no STREAM.DELETE/PURGE/MSG.* of this one (the ledger's unapplied events),
# no STREAM.NAMES/LIST, no `$JS.API.INFO` (account info: nats-py asks only for KV limit markers) and
# nothing that manages the server. js.publish itself is a request on the event's own subject.
_JS_API = "$JS.API"
USAGE_JS_API = (
    f"{_JS_API}.STREAM.CREATE.{USAGE_STREAM}",
    f"{_JS_API}.STREAM.UPDATE.{USAGE_STREAM}",
    f"{_JS_API}.STREAM.INFO.{USAGE_STREAM}",
    f"{_JS_API}.CONSUMER.CREATE.{USAGE_STREAM}.>",
    f"{_JS_API}.CONSUMER.DURABLE.CREATE.{USAGE_STREAM}.*",
    f"{_JS_API}.CONSUMER.INFO.{USAGE_STREAM}.*",
    f"{_JS_API}.CONSUMER.DELETE.{USAGE_STREAM}.*",
    f"{_JS_API}.CONSUMER.MSG.NEXT.{USAGE_STREAM}.*",
)


def js_pull_next(stream: str, durable: str) -> str:
    """Where a pull request for a durable consumer's next messages goes (JetStream's API). `durable` is a
    name made here (`usage_consumer`): one token, already checked."""
    return f"{_JS_API}.CONSUMER.MSG.NEXT.{_token('stream', stream)}.{durable}"


def js_pull_replies(inbox: str) -> str:
    """Where a reader's pulled messages (and the server's word on each pull request) arrive: its inbox."""
    return f"{inbox}.*"


def js_pull_reply(inbox: str, n: int) -> str:
    """The reply subject of one pull request: the server's status for it names it."""
    return f"{inbox}.{n}"


# A pulled message's reply subject: `$JS.ACK.<stream>.<consumer>.<delivered>.<sequences>...`.
USAGE_JS_ACKS = f"$JS.ACK.{USAGE_STREAM}.>"
# The control plane's own inbox: its connections use it instead of nats-py's `_INBOX` (JetStream's API
# answers, PubAcks and pulled messages come back here; nobody else may publish or subscribe to it).
CONTROL_INBOX_PREFIX = "_INBOX_CP"
CONTROL_INBOXES = f"{CONTROL_INBOX_PREFIX}.>"


def usage_acks(inbox: str) -> str:
    """Where one replica's usage-event acknowledgements arrive: under its inbox (`nc.new_inbox()`)."""
    return f"{inbox}.*"


def usage_ack(inbox: str, n: int) -> str:
    """The reply subject of one usage event's publish: JetStream acknowledges it there."""
    return f"{inbox}.{n}"


# ---- the nats-server's own system subjects (not ours to version) ------------------------------

# Where the server sends each connection attempt to the auth callout (in the callout's account).
AUTH_CALLOUT = "$SYS.REQ.USER.AUTH"
# Every server of a cluster answers with its own connections (system account only).
SERVER_CONNZ = "$SYS.REQ.SERVER.PING.CONNZ"


def server_kick(server_id: str) -> str:
    """Closes one connection (`{"cid": ...}`) on the server with this id (system account only)."""
    return f"$SYS.REQ.SERVER.{_token('server id', server_id)}.KICK"
