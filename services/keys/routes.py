"""The keys service, JSON: a signed-in account lists, creates and revokes its keys.

Authenticated by the session cookie from GitHub sign-in (not by an API key: a
leaked key must not be able to mint more keys or revoke its owner's others).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

import msgspec
import structlog
from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from services.auth.declared import Auth, requires
from services.auth.sessions import require_account
from services.errors import NotFound
from services.gateway.requests import decode_body
from services.keys.store import KeyInfo, create_key, get_key, list_keys, revoke_key
from services.openapi import documented
from services.runtime import Runtime

log = structlog.get_logger("keys")

MAX_NAME = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAX_ID = 2**63 - 1


class ApiKeyView(msgspec.Struct, frozen=True):
    id: int
    prefix: str
    name: str
    created_at: int
    last_used_at: int | None
    revoked_at: int | None
    object: str = "api_key"
    # Only in the answer to the request that created it; never again.
    key: str | msgspec.UnsetType = msgspec.UNSET


class ApiKeyList(msgspec.Struct, frozen=True):
    data: list[ApiKeyView]
    object: str = "list"


class NewKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(max_length=MAX_NAME)] = ""


def _epoch(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def view(info: KeyInfo, key: str | msgspec.UnsetType = msgspec.UNSET) -> ApiKeyView:
    return ApiKeyView(
        id=info.key_id,
        prefix=info.prefix,
        name=info.name,
        created_at=int(info.created_at.timestamp()),
        last_used_at=_epoch(info.last_used_at),
        revoked_at=_epoch(info.revoked_at),
        key=key,
    )


def clean_name(name: str) -> str:
    return _CONTROL.sub("", name).strip()[:MAX_NAME]


@get("/account/keys", **documented(ok=ApiKeyList, errors=(401, 500)), **requires(Auth.SESSION))
async def keys_list(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> ApiKeyList:
    account_id = await require_account(request, runtime.db, runtime.settings)
    return ApiKeyList(data=[view(k) for k in await list_keys(runtime.db, account_id)])


@post(
    "/account/keys",
    status_code=201,
    **documented(ok=ApiKeyView, status=201, body=NewKey, errors=(400, 401, 403, 413, 500)),
    **requires(Auth.SESSION),
)
async def keys_create(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[ApiKeyView]:
    account_id = await require_account(request, runtime.db, runtime.settings)
    body = await request.body()
    name = clean_name(decode_body(body, NewKey).name) if body.strip() else ""
    key, record = await create_key(runtime.db, account_id, name=name)
    log.info("api_key_created", account_id=account_id, key_id=record.key_id)
    info = await get_key(runtime.db, account_id, record.key_id)
    assert info is not None
    return Response(view(info, key=key), status_code=201, headers={"cache-control": "no-store"})


@delete(
    "/account/keys/{key_id:int}",
    status_code=200,
    **documented(ok=ApiKeyView, errors=(400, 401, 403, 404, 500)),
    **requires(Auth.SESSION),
)
async def keys_revoke(
    request: Request[Any, Any, Any], runtime: NamedDependency[Runtime], key_id: FromPath[int]
) -> ApiKeyView:
    account_id = await require_account(request, runtime.db, runtime.settings)
    # Someone else's key and no key at all look the same: ids are not probeable.
    info = await revoke_key(runtime.db, account_id, key_id) if 0 < key_id <= _MAX_ID else None
    if info is None:
        raise NotFound("No such key on this account.")
    # This replica refuses the key at once; the others when the revocation's NOTIFY lands.
    runtime.keys.cache.invalidate(key_id)
    log.info("api_key_revoked", account_id=account_id, key_id=key_id)
    return view(info)
