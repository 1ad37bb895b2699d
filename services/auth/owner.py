"""Who may see a provider's Macs: its owner (session cookie or `mp_` key) or the Mac itself (`mpp_`).

A Mac's own token sees that Mac only, so `mac-provider-daemon status` can ask the
control plane "why am I getting no traffic?" with the credential it already has.
Unknown tokens spend the same per-client budget as unknown API keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from litestar import Request

from services.auth import bearer
from services.auth.client_ip import client_ip, client_key
from services.auth.sessions import session_account
from services.errors import InvalidApiKey, NotSignedIn, RateLimited
from services.keys.format import PROVIDER_TOKENS
from services.providers import tokens

if TYPE_CHECKING:
    from services.runtime import Runtime

_STATE_KEY = "mp_provider_owner"


@dataclass(frozen=True, slots=True)
class Owner:
    """An account (all its Macs), or one Mac speaking for itself."""

    account_id: int | None
    provider_id: str | None = None


async def _lookup(request: Request[Any, Any, Any], runtime: Runtime) -> Owner:
    if not (request.headers.get("authorization") or "").strip():
        account_id = await session_account(request, runtime.db, runtime.settings)
        if account_id is None:
            raise NotSignedIn(
                "Sign in (/auth/github/start), or send 'Authorization: Bearer mp_...' (your key) "
                "or 'Bearer mpp_...' (a Mac's own token)."
            )
        return Owner(account_id)
    token = bearer.bearer_token(request)
    if not token.startswith(PROVIDER_TOKENS.prefix):
        principal = await bearer.resolve(request, runtime, api_key_header=False)
        if principal.account_id is None:
            raise InvalidApiKey("A demo token cannot see providers; use your mp_ key or sign in.")
        return Owner(principal.account_id)
    if not PROVIDER_TOKENS.well_formed(token):
        raise InvalidApiKey("Invalid provider token: it is not a well-formed mpp_ token.")
    client = client_key(client_ip(request, trusted_hops=runtime.settings.trusted_proxy_hops))
    budget = runtime.keys.failed_lookups
    wait = budget.take(client)
    if wait is not None:
        raise RateLimited(
            f"Too many requests with unknown tokens from this address; try again in {wait} s.",
            headers={"retry-after": str(wait)},
        )
    try:
        found = await tokens.owner_of(runtime.db, token)
    except BaseException:
        budget.give_back(client)
        raise
    if found is None:
        raise InvalidApiKey("Invalid provider token: unknown or revoked (run `mac-provider-daemon login` again).")
    budget.give_back(client)
    return Owner(found.account_id, found.provider_id)


async def resolve_owner(request: Request[Any, Any, Any], runtime: Runtime) -> Owner:
    known: Owner | None = request.state.get(_STATE_KEY)
    if known is None:
        known = await _lookup(request, runtime)
        request.state[_STATE_KEY] = known
    return known
