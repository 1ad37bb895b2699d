"""The auth callout's pieces without a server: nkeys, NATS JWTs, xkey sealing and the responder's checks."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from infra.nats import find_nats_server
from infra.ports import free_port
from schemas.permissions import control_plane_permissions
from services.natsauth import jwt, keys
from services.natsauth.claims import REQUEST_AUDIENCE
from services.natsauth.decide import Authorizer, Grant, Refusal
from services.natsauth.responder import MAX_REQUEST_BYTES, Responder
from services.settings import Settings, SettingsError

# Pure: no server, no process, no network (`just test -m unit`).
pytestmark = pytest.mark.unit
_CONTROL_PASSWORD = "control-plane-password-never-echoed"


def _server_key() -> keys.SigningKey:
    return keys.SigningKey.from_seed(keys.encode_seed(keys.PREFIX_SERVER, b"\x07" * 32), keys.PREFIX_SERVER)


def _user_nkey() -> str:
    return keys.encode_public(keys.PREFIX_USER, b"\x05" * 32)


def _parts(token: str) -> list[Any]:
    head, body, _ = token.split(".")
    return [json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in (head, body)]


def test_nkeys_have_their_prefixes_and_checksums() -> None:
    seed = keys.new_account_seed()
    assert seed.startswith("SA")
    assert len(seed) == 58
    public = keys.account_public_key(seed)
    assert public.startswith("A")
    assert len(public) == 56
    assert keys.is_public(public, keys.PREFIX_ACCOUNT)
    assert not keys.is_public(public, keys.PREFIX_USER), "an account key is not a user key"
    flipped = public[:10] + ("B" if public[10] != "B" else "C") + public[11:]
    assert not keys.is_public(flipped, keys.PREFIX_ACCOUNT), "the checksum catches one changed character"
    assert keys.curve_public_key(keys.new_curve_seed()).startswith("X")
    with pytest.raises(keys.NkeyError):
        keys.decode_seed(keys.new_curve_seed(), keys.PREFIX_ACCOUNT)


def test_a_jwt_round_trips_and_any_change_breaks_it() -> None:
    server = _server_key()
    token = jwt.encode({"aud": "x", "sub": _user_nkey(), "nats": {"type": "t", "version": 2}}, server).encode()
    header, claims = _parts(token.decode())
    assert header == {"typ": "JWT", "alg": "ed25519-nkey"}
    assert claims["iss"] == server.public
    assert claims["jti"] == jwt.jti(claims)

    class Claims(msgspec.Struct):
        iss: str
        aud: str
        exp: int = 0

    assert jwt.decode(token, Claims, issuer_prefix=keys.PREFIX_SERVER, max_bytes=4096).aud == "x"
    head, body, sig = token.split(b".")
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "aud": "y"}).encode()).rstrip(b"=")
    for bad, why in [
        (head + b"." + forged + b"." + sig, "not signed by its issuer"),
        (head + b"." + body, "not three parts"),
        (b"x" * 5000, "over 4096 bytes"),
        (head + b".!!!." + sig, "not base64url"),
    ]:
        with pytest.raises(jwt.JwtError, match=why):
            jwt.decode(bad, Claims, issuer_prefix=keys.PREFIX_SERVER, max_bytes=4096)
    with pytest.raises(jwt.JwtError, match="not signed"):
        jwt.decode(token, Claims, issuer_prefix=keys.PREFIX_ACCOUNT, max_bytes=4096)  # a server, not an account
    expired = jwt.encode({"aud": "x", "exp": int(time.time()) - 5, "sub": "s"}, server).encode()
    with pytest.raises(jwt.JwtError, match="expired"):
        jwt.decode(expired, Claims, issuer_prefix=keys.PREFIX_SERVER, max_bytes=4096)


def test_xkeys_seal_for_one_recipient_only() -> None:
    ours, server, stranger = (keys.CurveKey.from_seed(keys.new_curve_seed()) for _ in range(3))
    sealed = server.seal(b"hello", ours.public)
    assert sealed.startswith(b"xkv1")
    assert b"hello" not in sealed
    assert ours.open(sealed, server.public) == b"hello"
    with pytest.raises(keys.NkeyError):
        stranger.open(sealed, server.public)
    with pytest.raises(keys.NkeyError):
        ours.open(b"xkv1" + b"\0" * 40, server.public)


class _NoDb:
    """The control plane's login needs no query; a provider token would."""

    async def fetchrow(self, *_: Any) -> None:
        raise AssertionError("no query expected")


def _responder(issuer: keys.SigningKey, xkey: keys.CurveKey | None = None) -> Responder:
    authorizer = Authorizer(_NoDb(), control_user="gateway", control_password=_CONTROL_PASSWORD)  # type: ignore[arg-type]
    return Responder(None, authorizer, issuer, xkey, "APP", 60.0)  # type: ignore[arg-type]


def _request(issuer: str, *, server: keys.SigningKey | None = None, **overrides: Any) -> dict[str, Any]:
    server = server or _server_key()
    claims: dict[str, Any] = {
        "aud": REQUEST_AUDIENCE,
        "sub": issuer,
        "exp": int(time.time()) + 2,
        "nats": {
            "server_id": {"id": server.public, "name": "n1", "host": "127.0.0.1"},
            "user_nkey": _user_nkey(),
            "client_info": {"host": "127.0.0.1", "id": 7, "kind": "Client", "type": "nats"},
            "connect_opts": {"user": "gateway", "pass": _CONTROL_PASSWORD, "protocol": 1},
            "type": "authorization_request",
            "version": 2,
        },
    }
    claims.update(overrides)
    return claims


async def test_the_responder_answers_a_good_request_with_a_signed_user_jwt() -> None:
    issuer = keys.SigningKey.from_seed(keys.new_account_seed())
    server = _server_key()
    out = await _responder(issuer).answer(jwt.encode(_request(issuer.public, server=server), server).encode(), "", 0.0)
    assert out is not None
    _, response = _parts(out.decode())
    assert response["iss"] == issuer.public
    assert response["aud"] == server.public
    assert response["sub"] == _user_nkey()
    assert response["nats"]["type"] == "authorization_response"
    _, user = _parts(response["nats"]["jwt"])
    assert user["iss"] == issuer.public
    assert user["sub"] == _user_nkey()
    assert user["aud"] == "APP"
    assert user["name"] == "control-plane"
    assert "exp" not in user, "the control plane's connection is never closed under its streams"
    assert user["nats"]["pub"]["allow"] == list(control_plane_permissions().publish)
    assert user["nats"]["sub"]["allow"] == list(control_plane_permissions().subscribe)
    # A password long enough not to turn up in base64 by chance ("pw" did, now and then).
    answer = out.decode()
    claims = [base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)) for part in answer.split(".")[:2]]
    assert _CONTROL_PASSWORD not in answer, "the answer never repeats the credential"
    assert all(_CONTROL_PASSWORD.encode() not in c for c in claims), "nor do its claims"


async def test_the_responder_seals_its_answer_when_the_request_came_sealed() -> None:
    issuer = keys.SigningKey.from_seed(keys.new_account_seed())
    ours, servers = keys.CurveKey.from_seed(keys.new_curve_seed()), keys.CurveKey.from_seed(keys.new_curve_seed())
    request = servers.seal(jwt.encode(_request(issuer.public), _server_key()).encode(), ours.public)
    out = await _responder(issuer, ours).answer(request, servers.public, 0.0)
    assert out is not None
    assert out.startswith(b"xkv1")
    assert _parts(servers.open(out, ours.public).decode())[1]["nats"]["jwt"]
    # Sealed, but we hold no xkey: nothing to answer with (the server refuses when it times out).
    assert await _responder(issuer).answer(request, servers.public, 0.0) is None


@pytest.mark.parametrize(
    "what",
    ["garbage", "oversized", "another issuer", "signed by another server", "expired", "no user nkey", "not a request"],
)
async def test_the_responder_ignores_what_is_not_a_request_for_it(what: str) -> None:
    issuer = keys.SigningKey.from_seed(keys.new_account_seed())
    server = _server_key()
    claims = _request(issuer.public, server=server)
    if what == "garbage":
        data = b"\x00\xff not a jwt"
    elif what == "oversized":
        claims["nats"]["connect_opts"]["name"] = "n" * MAX_REQUEST_BYTES
        data = jwt.encode(claims, server).encode()
    else:
        if what == "another issuer":
            claims["sub"] = keys.account_public_key(keys.new_account_seed())
        elif what == "expired":
            claims["exp"] = int(time.time()) - 10
        elif what == "no user nkey":
            claims["nats"]["user_nkey"] = "nobody"
        elif what == "not a request":
            claims["aud"] = "something else"
        signer = server
        if what == "signed by another server":
            signer = keys.SigningKey.from_seed(keys.encode_seed(keys.PREFIX_SERVER, b"\x09" * 32), keys.PREFIX_SERVER)
        data = jwt.encode(claims, signer).encode()
    assert await _responder(issuer).answer(data, "", 0.0) is None


async def test_the_control_plane_credential_is_exact() -> None:
    authorizer = Authorizer(_NoDb(), control_user="gateway", control_password="pw")  # type: ignore[arg-type]
    from services.natsauth.claims import ConnectOptions

    assert isinstance(await authorizer.decide(ConnectOptions(user="gateway", password="pw")), Grant)
    for user, password in [("gateway", "pw "), ("gateway", ""), ("Gateway", "pw"), ("gateway", "p" * 10_000)]:
        assert isinstance(await authorizer.decide(ConnectOptions(user=user, password=password)), Refusal)
    unset = Authorizer(_NoDb(), control_user="", control_password="")  # type: ignore[arg-type]
    assert isinstance(await unset.decide(ConnectOptions(user="", password="")), Refusal)
    assert isinstance(await unset.decide(ConnectOptions(user="x", password="")), Refusal)


def test_callout_settings_refuse_a_wrong_seed_without_quoting_it(tmp_path: Path) -> None:
    curve = keys.new_curve_seed()
    with pytest.raises(SettingsError, match="MP_NATS_ISSUER_SEED is not an account nkey seed") as caught:
        Settings.from_env({"MP_HOME": str(tmp_path), "MP_NATS_ISSUER_SEED": curve})
    assert curve not in str(caught.value)
    with pytest.raises(SettingsError, match="MP_NATS_ACCOUNT"):
        Settings.from_env({"MP_HOME": str(tmp_path), "MP_NATS_ACCOUNT": "A B"})
    settings = Settings.from_env({"MP_HOME": str(tmp_path), "MP_NATS_XKEY_SEED": curve})
    assert settings.nats_xkey_seed == curve
    assert curve not in repr(settings)


def test_the_operator_gets_secrets_and_a_server_config_that_nats_server_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.natsauth import admin

    seed = keys.new_account_seed()
    assert admin.run(Settings.from_env({"MP_HOME": str(tmp_path), "MP_NATS_ISSUER_SEED": seed})) == 0
    out = capsys.readouterr().out
    env = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("MP_"))
    assert env["MP_NATS_ISSUER_SEED"] == seed, "a seed already set is kept"
    config = out[out.index("accounts {") :]
    for name in ("MP_NATS_ISSUER_SEED", "MP_NATS_XKEY_SEED", "MP_NATS_AUTH_PASSWORD", "MP_NATS_SYS_PASSWORD"):
        assert env[name] not in config, f"{name} stays out of the server's config"
    assert f'issuer: "{keys.account_public_key(seed)}"' in config
    assert Settings.from_env({"MP_HOME": str(tmp_path), **env}).nats_xkey_seed == env["MP_NATS_XKEY_SEED"]
    (tmp_path / "nats.conf").write_text(f"listen: 127.0.0.1:{free_port()}\n{config}")
    checked = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(tmp_path / "nats.conf")], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def _allowed(patterns: tuple[str, ...], subject: str) -> bool:
    return any(_matches(p, subject) for p in patterns)


def test_the_control_plane_may_use_the_usage_stream_and_nothing_else_of_jetstream() -> None:
    from schemas import subjects

    pub = control_plane_permissions().publish
    consumer = subjects.usage_consumer("gw-1")
    # What nats-py 2.16 sends for add_stream, update_stream, stream_info, pull_subscribe (consumer_info then
    # add_consumer with a name and filter), the legacy durable create, fetch, ack, delete_consumer, publish.
    for subject in (
        "$JS.API.STREAM.CREATE.MP_USAGE",
        "$JS.API.STREAM.UPDATE.MP_USAGE",
        "$JS.API.STREAM.INFO.MP_USAGE",
        f"$JS.API.CONSUMER.INFO.MP_USAGE.{consumer}",
        f"$JS.API.CONSUMER.CREATE.MP_USAGE.{consumer}.{subjects.usage_events('gw-1')}",
        f"$JS.API.CONSUMER.CREATE.MP_USAGE.{consumer}",
        f"$JS.API.CONSUMER.DURABLE.CREATE.MP_USAGE.{consumer}",
        f"$JS.API.CONSUMER.MSG.NEXT.MP_USAGE.{consumer}",
        f"$JS.ACK.MP_USAGE.{consumer}.1.5.5.1733000000000000000.0",
        f"$JS.API.CONSUMER.DELETE.MP_USAGE.{consumer}",
        subjects.usage_events("gw-1"),
    ):
        assert _allowed(pub, subject), subject
    for subject in (
        "$JS.API.STREAM.CREATE.OTHER",
        "$JS.API.STREAM.INFO.OTHER",
        "$JS.API.STREAM.DELETE.MP_USAGE",
        "$JS.API.STREAM.PURGE.MP_USAGE",
        "$JS.API.STREAM.MSG.GET.MP_USAGE",
        "$JS.API.STREAM.MSG.DELETE.MP_USAGE",
        "$JS.API.STREAM.SNAPSHOT.MP_USAGE",
        "$JS.API.STREAM.RESTORE.MP_USAGE",
        "$JS.API.CONSUMER.CREATE.OTHER.MP_USAGE.x",  # a consumer named like our stream, on another one
        "$JS.API.CONSUMER.DURABLE.CREATE.OTHER.MP_USAGE",
        "$JS.API.CONSUMER.MSG.NEXT.OTHER.MP_USAGE",
        "$JS.API.CONSUMER.CREATE.MP_USAGE",  # unnamed (ephemeral): nats-py always names its consumers
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.LIST",
        "$JS.API.INFO",
        "$JS.API.SERVER.REMOVE",
        "$JS.API.META.LEADER.STEPDOWN",
        "$JS.ACK.OTHER.c.1.1.1.1.0",
        "_INBOX_CP.x",
        "_INBOX.x",
    ):
        assert not _allowed(pub, subject), subject
    sub = control_plane_permissions().subscribe
    assert _allowed(sub, f"{subjects.CONTROL_INBOX_PREFIX}.abc.def")
    assert not _allowed(sub, "_INBOX.abc")
    assert not _allowed(sub, "$JS.API.STREAM.INFO.MP_USAGE")


def test_a_provider_gets_nothing_of_jetstream_or_the_control_planes_inbox() -> None:
    from schemas import subjects
    from schemas.permissions import provider_permissions

    p = provider_permissions("mac-1")
    for subject in (subjects.usage_events("mac-1"), "$JS.API.STREAM.INFO.MP_USAGE", "$JS.ACK.MP_USAGE.c.1.1.1.1.0"):
        assert not _allowed(p.publish, subject), subject
    assert not any(s.startswith(("$JS", "_INBOX", subjects.PREFIX + ".usage")) for s in (*p.publish, *p.subscribe))


def test_jetstream_is_on_in_every_server_config_we_write_and_only_the_app_account_has_it(tmp_path: Path) -> None:
    from infra.nats import NatsServer
    from services.natsauth import server_config
    from services.natsauth.server_config import Login

    conf = NatsServer._render_config(tmp_path, 4222, tmp_path / "nats.log", "")
    assert "jetstream {" in conf
    assert f"store_dir: {json.dumps(str(tmp_path))}" in conf
    assert "max_memory_store: 64MB" in conf
    assert "max_file_store: 4GB" in conf
    accounts = server_config.render(
        issuer_public="A" * 56, xkey_public="X" * 56, callout=Login("natsauth", "h"), system=Login("system", "h")
    )
    lines = {line.split("{", 1)[0].strip(): line for line in accounts.splitlines() if "users:" in line}
    assert "jetstream: enabled" in lines[server_config.APP_ACCOUNT]
    assert "jetstream" not in lines[server_config.AUTH_ACCOUNT] + lines[server_config.SYS_ACCOUNT]
