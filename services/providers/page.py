"""`/provider`: the owner's Macs as a page (the same facts as `/provider/macs`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape

from services.pages import page
from services.providers.view import Mac


def _when(value: datetime | None) -> str:
    return "never" if value is None else escape(value.strftime("%Y-%m-%d %H:%M UTC"))


def _duration(seconds: float) -> str:
    minutes, hours = int(seconds // 60), int(seconds // 3600)
    if hours >= 48:
        return f"{hours // 24} days"
    return f"{hours} h {minutes % 60} min" if hours else f"{minutes} min {int(seconds) % 60} s"


def _mac(m: Mac) -> str:
    state = "online" if m.online else "offline"
    models = (
        "".join(
            f"<li><code>{escape(x.id)}</code>: "
            + ("routed" if x.routed else f"not routed ({escape(x.reason or x.verification)})")
            + f", {escape(x.verification)}</li>"
            for x in m.models
        )
        or "<li>none reported</li>"
    )
    why = (
        "<ul>" + "".join(f"<li>{escape(r)}</li>" for r in m.why_no_traffic) + "</ul>"
        if m.why_no_traffic
        else "<p>Nothing holds it back: it gets work whenever buyers ask for its models.</p>"
    )
    speed = f"{m.decode_tokens_per_s} tokens/s measured" if m.decode_tokens_per_s else "speed not measured yet"
    if m.uptime_s is not None:
        speed += f" · up {_duration(m.uptime_s)}"
    return (
        f"<section><h2>{escape(m.name or m.provider_id)}</h2>"
        f"<p><code>{escape(m.provider_id)}</code> · {state} · admission: <b>{escape(m.admission)}</b>"
        + (" · draining" if m.draining else "")
        + f" · worker {escape(m.worker)} · {m.slots_free}/{m.slots} slots free · {escape(speed)}</p>"
        f"<p>Served: {m.served_24h.requests} requests, {m.served_24h.tokens} tokens in 24 h; "
        f"{m.served_30d.requests} requests, {m.served_30d.tokens} tokens in 30 days. "
        f"Violations: {m.violations_24h} in 24 h, {m.violations} in all"
        + (f" (last: {escape(m.last_violation)}, {_when(m.last_violation_at)})" if m.last_violation else "")
        + f". First seen {_when(m.first_seen)}, last seen {_when(m.last_seen)}.</p>"
        + _canaries(m)
        + f"<h3>Models</h3><ul>{models}</ul><h3>Why no traffic?</h3>{why}</section>"
    )


def _canaries(m: Mac) -> str:
    c = m.canaries
    if c.last_result is None:
        return "<p>Canary checks: none yet (spot checks of its answers against a trusted Mac's).</p>"
    measured = (
        f" It answered in {c.first_token_ms:.0f} ms to the first token"
        + (f" at {c.decode_tokens_per_s:.1f} tokens/s" if c.decode_tokens_per_s else "")
        + "."
        if c.first_token_ms is not None
        else ""
    )
    return (
        f"<p>Canary checks (30 days): {c.passed} passed, {c.failed} failed; the last one "
        f"{escape(c.last_result)} {_when(c.last_at)}"
        + (f" ({escape(c.last_detail)})" if c.last_detail else "")
        + f".{escape(measured)} A spot check, not attestation.</p>"
    )


def provider_page(macs: Sequence[Mac]) -> str:
    if not macs:
        body = (
            "<p>You have no Macs yet. On your Mac: <code>brew install mac-provider-daemon</code>, "
            "<code>mac-provider-daemon login</code>, then <code>brew services start mac-provider-daemon</code>.</p>"
        )
    else:
        body = "".join(_mac(m) for m in macs)
    body += '<p>The same facts as JSON: <code>GET /provider/macs</code>. <a href="/account">Your account</a></p>'
    return page("Your Macs", body)
