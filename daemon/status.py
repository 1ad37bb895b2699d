"""`mac-provider-daemon status`: this Mac as its owner needs to see it.

Two views side by side: the daemon's own (its local admin API: running? connected
to the pool? which model, how many requests served) and the control plane's
(`/provider/macs/<id>`, asked with this Mac's own provider token: admission,
whether each model is verified and routed, traffic, violations, and a plain
answer to "why am I getting no traffic?"). Either may be unreachable; the command
says so and still shows the other.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx

from daemon.admin.token import AdminTokenError, read_admin_token
from daemon.credentials import ProviderCredentials, load
from daemon.settings import DaemonSettings, credentials_path

_TIMEOUT_S = 5.0


def _local(settings: DaemonSettings) -> dict[str, Any]:
    if not settings.admin_port:
        return {"error": "the admin API is off (MP_ADMIN_PORT=0)"}
    try:
        token = read_admin_token(settings.admin_token_file)
        r = httpx.get(
            f"http://127.0.0.1:{settings.admin_port}/admin/status",
            headers={"Authorization": f"Bearer {token}"},
            timeout=_TIMEOUT_S,
        )
    except AdminTokenError as exc:
        return {"error": str(exc)}
    except httpx.HTTPError:
        return {"error": f"the daemon is not running (nothing answers on 127.0.0.1:{settings.admin_port})"}
    if r.status_code != 200:
        return {"error": f"the daemon's admin API answered {r.status_code}"}
    body: dict[str, Any] = r.json()
    return body


def _remote(creds: ProviderCredentials | None) -> dict[str, Any]:
    if creds is None:
        return {"error": "this Mac is not signed in: run `mac-provider-daemon login`"}
    if not creds.control_url:
        return {"error": "the credentials name no control plane: run `mac-provider-daemon login --url …` again"}
    try:
        r = httpx.get(
            f"{creds.control_url.rstrip('/')}/provider/macs/{creds.provider_id}",
            headers={"Authorization": f"Bearer {creds.token}"},
            timeout=_TIMEOUT_S,
        )
    except httpx.HTTPError as exc:
        return {"error": f"the control plane is unreachable ({type(exc).__name__})"}
    if r.status_code == 401:
        return {"error": "the control plane refused this Mac's token (revoked?): run `mac-provider-daemon login`"}
    if r.status_code != 200:
        return {"error": f"the control plane answered {r.status_code}"}
    body: dict[str, Any] = r.json()
    return body


def _print(local: dict[str, Any], remote: dict[str, Any], creds: ProviderCredentials | None) -> None:
    out = sys.stdout.write
    name = creds.name if creds and creds.name else "this Mac"
    out(f"{name} ({creds.provider_id if creds else 'not signed in'})\n")
    if "error" in local:
        out(f"  daemon:   {local['error']}\n")
    else:
        pool = local.get("pool", {})
        model = local.get("model", {})
        out(
            f"  daemon:   {local.get('status')}, up {local.get('uptime_s')} s, "
            f"{'connected to' if pool.get('connected') else 'NOT connected to'} the pool, "
            f"served {pool.get('served', 0)} requests\n"
        )
        out(f"  model:    {model.get('name')} ({'loaded' if model.get('loaded') else 'not loaded'})\n")
    if "error" in remote:
        out(f"  pool:     {remote['error']}\n")
        return
    out(
        f"  pool:     admission {remote['admission']}{', draining' if remote['draining'] else ''}, "
        f"{'online' if remote['online'] else 'offline'}, "
        f"{remote['served_24h']['requests']} requests / {remote['served_24h']['tokens']} tokens in 24 h, "
        f"{remote['violations_24h']} violations in 24 h\n"
    )
    for m in remote.get("models", []):
        routed = "routed" if m["routed"] else f"NOT routed: {m['reason'] or m['verification']}"
        out(f"  {m['id']}: {m['verification']}, {routed}\n")
    why = remote.get("why_no_traffic") or []
    if why:
        out("  why no traffic:\n" + "".join(f"    - {line}\n" for line in why))
    else:
        out("  nothing holds it back: it gets work whenever buyers ask for its models\n")


def run_status(settings: DaemonSettings, env: dict[str, str], *, as_json: bool) -> int:
    """0 when the daemon runs and the pool routes to it; 1 otherwise (scripts can test it)."""
    creds = load(credentials_path(env, settings.state_dir))
    local, remote = _local(settings), _remote(creds)
    if as_json:
        sys.stdout.write(json.dumps({"daemon": local, "pool": remote}, indent=1) + "\n")
    else:
        _print(local, remote, creds)
    ok = "error" not in local and "error" not in remote and remote.get("traffic") == "routable"
    return 0 if ok else 1
