"""The provider's own view: `/provider/macs` (JSON, for scripts and the daemon) and `/provider` (HTML).

The owner sees every Mac of their account (session cookie or `mp_` key); a Mac's
own `mpp_` token sees that Mac only (`mac-provider-daemon status`).
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.params import FromPath

from schemas import subjects
from services.auth.declared import Auth, requires
from services.auth.owner import Owner, resolve_owner
from services.auth.sessions import session_account
from services.errors import NotFound
from services.openapi import HTML, documented
from services.pages import html_response, message_page
from services.providers import view
from services.providers.page import provider_page
from services.runtime import Runtime


async def _macs(owner: Owner, runtime: Runtime, provider_id: str | None = None) -> list[view.Mac]:
    if owner.provider_id is not None:  # a Mac sees itself only
        if provider_id is not None and provider_id != owner.provider_id:
            return []
        provider_id, account_id = owner.provider_id, None
    else:
        account_id = owner.account_id
    return await view.macs(
        runtime.db,
        runtime.pool,
        account_id=account_id,
        provider_id=provider_id,
        admissions_per_min=runtime.settings.provisional_admissions_per_min,
    )


@get("/provider/macs", **documented(ok=view.MacList, errors=(401, 429, 500)), **requires(Auth.PROVIDER_OWNER))
async def provider_macs(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> view.MacList:
    """Your Macs: admission, models, traffic, violations, and why one gets no traffic."""
    return view.MacList(data=await _macs(await resolve_owner(request, runtime), runtime))


@get(
    "/provider/macs/{provider_id:str}",
    **documented(ok=view.Mac, errors=(401, 404, 429, 500)),
    **requires(Auth.PROVIDER_OWNER),
)
async def provider_mac(
    request: Request[Any, Any, Any], runtime: NamedDependency[Runtime], provider_id: FromPath[str]
) -> view.Mac:
    found = (
        await _macs(await resolve_owner(request, runtime), runtime, provider_id)
        if subjects.valid_token(provider_id)
        else []
    )
    if not found:
        raise NotFound(f"No Mac {provider_id!r} of yours.", param="provider_id")
    return found[0]


@get("/provider", **documented(ok=str, media_type=HTML, errors=(500,)), **requires(Auth.SESSION_PAGE))
async def provider_home(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[str]:
    account_id = await session_account(request, runtime.db, runtime.settings)
    if account_id is None:
        return html_response(
            message_page("Your Macs", "You are not signed in.", link=("/auth/github/start", "Sign in with GitHub"))
        )
    return html_response(provider_page(await _macs(Owner(account_id), runtime)))
