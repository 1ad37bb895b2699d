"""Device login (RFC 8628): `mac-provider-daemon login` as a real process, the owner in the "browser".

A gateway of this module's own polls fast (interval 1 s) and budgets wrong user codes
tightly; it shares the auth stack's Postgres, NATS, secret key, public URL and
loopback GitHub, so a browser signs in on any replica and comes back to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import secrets
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from daemon import credentials
from daemon.keychain import Keychain
from daemon.login import LoginError, check_url
from infra.components import Child, DaemonChild, start_gateway, wait_model
from infra.ports import free_port
from schemas.device import GRANT_TYPE, normalize_user_code
from services.auth.return_path import safe_return_path
from services.keys.format import PROVIDER_TOKENS
from services.providers import tokens
from services.settings import without_credentials
from tests.support.auth_stack import AuthStack
from tests.support.daemons import start_signed_in_daemon, wait_pool_connected, wait_worker
from tests.support.daemons import status as daemon_status
from tests.support.github import User
from tests.support.ledger import written

_ids = iter(range(int(time.time()) % 10_000_000 * 100 + 50, 1 << 62))
_USER_CODE = re.compile(r"^\s+([BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4})\s*$")
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
WRONG_CODES_PER_MIN = 4
_JOINED_MODEL = "tiny-joined"


def new_user() -> User:
    n = next(_ids)
    return User(id=n, login=f"mac-owner-{n}")


@dataclass
class DeviceGateway:
    url: str
    child: Child
    auth: AuthStack


@pytest.fixture(scope="module")
def gw(auth_stack: AuthStack) -> Iterator[DeviceGateway]:
    stack, port = auth_stack.stack, free_port()
    child = start_gateway(
        stack.home,
        port=port,
        nats=stack.nats,
        database_url=stack.database_url,
        name="gateway-device",
        env={
            **auth_stack.github.settings_env(),
            # One deployment behind one public URL: GitHub calls back to replica a, any replica serves /device.
            "MP_PUBLIC_URL": auth_stack.public_url,
            "MP_TRUSTED_PROXY_HOPS": "1",
            "MP_DEVICE_POLL_INTERVAL_S": "1",
            "MP_DEVICE_WRONG_CODES_PER_MIN": str(WRONG_CODES_PER_MIN),
            "MP_LOG_LEVEL": "info",
        },
    )
    try:
        yield DeviceGateway(f"http://127.0.0.1:{port}", child, auth_stack)
    finally:
        child.stop()


def owner_of(database_url: str, token: str) -> tokens.TokenOwner | None:
    async def go() -> tokens.TokenOwner | None:
        conn = await asyncpg.connect(database_url)
        try:
            return await tokens.owner_of(conn, token)
        finally:
            await conn.close()

    return asyncio.run(go())


def account_of(gw: DeviceGateway, user: User) -> int:
    return int(gw.auth.stack.postgres.psql(f"SELECT id FROM accounts WHERE github_id = {user.id}").strip())


def signed_in(gw: DeviceGateway, user: User | None = None) -> tuple[httpx.Client, User]:
    browser, user = gw.auth.browser(), user or new_user()
    gw.auth.sign_up(browser, user)
    return browser, user


def csrf_of(html: str) -> str:
    found = _CSRF.findall(html)
    assert len(set(found)) == 1, html
    return found[0]


def decide(
    browser: httpx.Client, gw: DeviceGateway, code: str, *, action: str = "approve", name: str = "", **headers: str
) -> httpx.Response:
    page = browser.get(f"{gw.url}/device", params={"user_code": code})
    assert page.status_code == 200, page.text
    form = {"csrf": csrf_of(page.text), "user_code": code, "name": name, "action": action}
    return browser.post(f"{gw.url}/device", data=form, headers=headers)


def new_code(gw: DeviceGateway, client: str, **params: str) -> dict:
    r = httpx.post(f"{gw.url}/provider/device/code", data=params, headers={"X-Forwarded-For": client})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    gw.auth.secrets_seen.append(r.json()["device_code"])  # for test_keys_secrets: never stored or logged
    return r.json()


def poll(gw: DeviceGateway, device_code: str, *, as_json: bool = False) -> httpx.Response:
    params = {"grant_type": GRANT_TYPE, "device_code": device_code}
    if as_json:
        return httpx.post(f"{gw.url}/provider/device/token", json=params)
    return httpx.post(f"{gw.url}/provider/device/token", data=params)


def oauth_error(r: httpx.Response) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert "message" not in body, "OAuth's shape, not the OpenAI envelope"
    return str(body["error"])


class Login:
    """`mac-provider-daemon login` running as a real process, with its own state folder."""

    def __init__(self, gw: DeviceGateway, state_dir: Path, *, name: str = "Studio") -> None:
        self.state_dir = state_dir
        env = {
            **os.environ,
            "MP_STATE_DIR": str(state_dir),
            "MP_KEYCHAIN": "off",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("MP_CONTROL_URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "login", "--url", gw.url, "--name", name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def user_code(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, self.finish()
                continue
            self.stdout.append(line)
            m = _USER_CODE.match(line)
            if m:
                return m.group(1)
        raise AssertionError(f"no user code printed: {self.stdout}")

    def finish(self, timeout: float = 20.0) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.05)  # the reader thread drains the pipe
        while not self.lines.empty():
            self.stdout.append(self.lines.get())
        assert self.proc.stderr is not None
        return code, "".join(self.stdout), self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def login_dir(tmp_path: Path) -> Path:
    return tmp_path / "mac-state"


def test_a_mac_signs_in_through_the_browser_and_its_owner_revokes_it(gw: DeviceGateway, login_dir: Path) -> None:
    browser, user = signed_in(gw)
    login = Login(gw, login_dir, name="suggested-name")
    try:
        code = login.user_code()
        assert f"    {gw.auth.public_url}/device\n" in login.stdout
        # The owner types the code in lower case without the dash, and names the Mac.
        r = decide(browser, gw, code.replace("-", "").lower(), name="Studio")
        assert r.status_code == 200, r.text
        assert "return to your mac" in r.text.lower()
        started = time.monotonic()
        status, out, err = login.finish()
        print(f"daemon signed in {time.monotonic() - started:.2f} s after the approval")
    finally:
        login.kill()
    assert status == 0, (out, err)
    assert f"{gw.auth.public_url}/device?user_code={code}" in out
    assert "brew services start mac-provider-daemon" in out

    path = login_dir / credentials.FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    creds = credentials.load(path)
    assert creds is not None
    assert PROVIDER_TOKENS.well_formed(creds.token)
    assert creds.token not in out + err, "the token is never printed"
    assert (creds.name, creds.control_url, creds.keychain) == ("Studio", gw.url, "")
    assert "@" not in creds.nats_url
    assert creds.nats_url == without_credentials(gw.auth.stack.nats.url)
    gw.auth.secrets_seen.append(creds.token)

    owner = owner_of(gw.auth.stack.database_url, creds.token)
    assert owner is not None
    assert (owner.provider_id, owner.account_id) == (creds.provider_id, account_of(gw, user))

    # The Mac joins with nothing but its credentials file (as `brew services` starts it), passes the
    # NATS auth callout with its token, is admitted and serves a buyer (another account) through the pool.
    stack = gw.auth.stack
    daemon = start_signed_in_daemon(
        login_dir, model_id=_JOINED_MODEL, model_path=stack.model_path, log_dir=stack.home / "logs"
    )
    try:
        wait_worker(daemon)
        wait_model(gw.url, _JOINED_MODEL, timeout=60, daemon=daemon)
        answer = httpx.post(
            f"{gw.url}/v1/chat/completions",
            headers=stack.auth(),
            json={"model": _JOINED_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        written(stack.nats_url)
        served_by = stack.postgres.psql(
            f"SELECT provider_id FROM usage_ledger WHERE request_id = '{answer.headers['x-request-id']}'"
        ).strip()
        assert served_by == creds.provider_id
        # A long answer is running when the owner revokes the Mac.
        long = threading.Thread(target=_long_answer, args=(gw.url, stack.auth()), daemon=True)
        long.start()
        _until_running(daemon)
        _revoke_on_the_account_page(gw, browser, creds, owner)
        # Cut off at once, and refused when it tries again.
        cut_s = wait_pool_connected(daemon, False, timeout=5)
        print(f"revoked on the account page -> daemon disconnected in {cut_s * 1000:.0f} ms")
        assert cut_s < 1.0
        # Its answers can reach no one now: it stops generating rather than burn its owner's Mac.
        _until_running(daemon, 0, timeout=5)
        time.sleep(2.0)  # it retries every 0.5 s
        assert daemon_status(daemon)["pool"]["connected"] is False
        assert daemon.alive()
        assert "pool_refused" in daemon.log_tail()
    finally:
        daemon.stop()


def _long_answer(url: str, auth: dict[str, str]) -> None:
    body = {"model": _JOINED_MODEL, "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 20000}
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{url}/v1/chat/completions", headers=auth, json={**body, "stream": True}, timeout=60)


def _until_running(daemon: DaemonChild, count: int | None = None, timeout: float = 30.0) -> None:
    """Until the daemon runs `count` requests (None: at least one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = daemon_status(daemon)["requests"]["in_flight"]
        if (running >= 1) if count is None else (running == count):
            return
        time.sleep(0.05)
    raise AssertionError(f"never {count} running:\n{daemon.log_tail()}")


def _revoke_on_the_account_page(
    gw: DeviceGateway,
    browser: httpx.Client,
    creds: credentials.ProviderCredentials,
    owner: tokens.TokenOwner,
) -> None:
    # The account page lists the Mac; revoking needs the form's CSRF token, then cuts the token off.
    page = browser.get(f"{gw.auth.a}/account")
    assert page.status_code == 200
    assert "Studio" in page.text
    assert creds.provider_id in page.text
    assert creds.token[:10] in page.text
    assert creds.token not in page.text
    action = f"/account/macs/{owner.token_id}/revoke"
    assert f'action="{action}"' in page.text
    forged = browser.post(f"{gw.url}{action}", data={})
    assert forged.status_code == 403
    assert owner_of(gw.auth.stack.database_url, creds.token) is not None
    # Another account's browser cannot revoke it either (nothing happens).
    stranger, _ = signed_in(gw)
    their_page = stranger.get(f"{gw.url}/device")  # their own valid CSRF token
    stranger.post(f"{gw.url}{action}", data={"csrf": csrf_of(their_page.text)})
    assert owner_of(gw.auth.stack.database_url, creds.token) is not None

    r = browser.post(f"{gw.url}{action}", data={"csrf": csrf_of(page.text)})
    assert (r.status_code, r.headers["location"]) == (303, "/account")
    assert owner_of(gw.auth.stack.database_url, creds.token) is None
    assert "revoked" in browser.get(f"{gw.url}/account").text


def test_a_denied_login_exits_non_zero_and_saves_nothing(gw: DeviceGateway, login_dir: Path) -> None:
    browser, _ = signed_in(gw)
    login = Login(gw, login_dir)
    try:
        r = decide(browser, gw, login.user_code(), action="deny")
        assert r.status_code == 200
        assert "Denied" in r.text
        status, out, err = login.finish()
    finally:
        login.kill()
    assert status == 3, (out, err)
    assert "access denied" in err.lower()
    assert not (login_dir / credentials.FILE_NAME).exists()


def test_polling_too_fast_slows_down_and_a_code_is_exchanged_once(gw: DeviceGateway) -> None:
    code = new_code(gw, "192.0.2.10", name="Fast poller")
    assert (code["interval"], code["expires_in"]) == (1, 600)
    assert code["verification_uri"] == f"{gw.auth.public_url}/device"
    assert code["verification_uri_complete"] == f"{gw.auth.public_url}/device?user_code={code['user_code']}"
    # This code's interval made 5 s, so that "again at once" is too fast even on a loaded machine.
    gw.auth.stack.postgres.psql(
        f"UPDATE device_authorizations SET interval_s = 5 WHERE user_code = '{code['user_code'].replace('-', '')}'"
    )
    assert oauth_error(poll(gw, code["device_code"])) == "authorization_pending"
    # Again at once: too fast, and each time too fast the interval grows by 5 s, for good.
    r = poll(gw, code["device_code"])
    assert (oauth_error(r), r.json()["interval"]) == ("slow_down", 10)
    r = poll(gw, code["device_code"], as_json=True)
    assert (oauth_error(r), r.json()["interval"]) == ("slow_down", 15)

    # An approved code: four polls race for it, one gets the token, the others invalid_grant.
    browser, user = signed_in(gw)
    code = new_code(gw, "192.0.2.11")
    assert decide(browser, gw, code["user_code"], name="Raced").status_code == 200
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: poll(gw, code["device_code"], as_json=True), range(4)))
    granted = [r for r in answers if r.status_code == 200]
    assert len(granted) == 1, [r.text for r in answers]
    assert sorted(oauth_error(r) for r in answers if r.status_code != 200) == ["invalid_grant"] * 3
    body = granted[0].json()
    gw.auth.secrets_seen.append(body["access_token"])
    assert (body["token_type"], body["name"]) == ("Bearer", "Raced")
    assert granted[0].headers["cache-control"] == "no-store"
    time.sleep(1.1)
    assert oauth_error(poll(gw, code["device_code"])) == "invalid_grant", "spent for good"
    count = gw.auth.stack.postgres.psql(
        f"SELECT count(*) FROM provider_tokens WHERE account_id = {account_of(gw, user)}"
    )
    assert int(count.strip()) == 1

    # Requests a device client may send wrong.
    assert oauth_error(poll(gw, secrets.token_urlsafe(32))) == "invalid_grant"
    r = httpx.post(f"{gw.url}/provider/device/token", data={"grant_type": "password", "device_code": "x"})
    assert oauth_error(r) == "unsupported_grant_type"
    r = httpx.post(f"{gw.url}/provider/device/token", data={"grant_type": GRANT_TYPE})
    assert oauth_error(r) == "invalid_request"
    twice = f"grant_type={quote(GRANT_TYPE)}&device_code=a&device_code=b"
    form = {"content-type": "application/x-www-form-urlencoded"}
    r = httpx.post(f"{gw.url}/provider/device/token", content=twice, headers=form)
    assert oauth_error(r) == "invalid_request"
    r = httpx.post(f"{gw.url}/provider/device/code", data={"name": "bad\x1b[31mname"})
    assert oauth_error(r) == "invalid_request"


def test_an_expired_code_is_refused(gw: DeviceGateway) -> None:
    code = new_code(gw, "192.0.2.12")
    # Ten minutes later (aged in the database rather than waited for).
    gw.auth.stack.postgres.psql(
        "UPDATE device_authorizations SET created_at = now() - interval '11 min', expires_at = now() - interval '1 min'"
        f" WHERE user_code = '{normalize_user_code(code['user_code'])}'"
    )
    assert oauth_error(poll(gw, code["device_code"])) == "expired_token"
    browser, _ = signed_in(gw)
    r = decide(browser, gw, code["user_code"])
    assert r.status_code == 400
    assert "Unknown or expired code" in r.text


def test_wrong_user_codes_are_refused_and_rate_limited(gw: DeviceGateway) -> None:
    browser, _ = signed_in(gw)
    page = browser.get(f"{gw.url}/device")
    csrf = csrf_of(page.text)

    def attempt(b: httpx.Client, token: str, code: str, client: str) -> httpx.Response:
        form = {"csrf": token, "user_code": code, "name": "", "action": "approve"}
        return b.post(f"{gw.url}/device", data=form, headers={"X-Forwarded-For": client})

    # Not even a code: said so, and not counted.
    for _ in range(WRONG_CODES_PER_MIN + 1):
        r = attempt(browser, csrf, "12345678", "198.51.100.20")
        assert r.status_code == 400
        assert "not a code" in r.text
    wrong = "BBBB-BBBB"  # never drawn in practice (1 in 2.6e10)
    for _ in range(WRONG_CODES_PER_MIN):
        r = attempt(browser, csrf, wrong, "198.51.100.20")
        assert r.status_code == 400
        assert "Unknown or expired code" in r.text
    r = attempt(browser, csrf, wrong, "198.51.100.20")
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    # The account is out of guesses from any address...
    assert attempt(browser, csrf, wrong, "198.51.100.21").status_code == 429
    # ...and so is the address, for any account.
    other, _ = signed_in(gw)
    other_csrf = csrf_of(other.get(f"{gw.url}/device").text)
    assert attempt(other, other_csrf, wrong, "198.51.100.20").status_code == 429
    # A right code from a fresh address and account goes through.
    code = new_code(gw, "192.0.2.13")
    assert attempt(other, other_csrf, code["user_code"], "198.51.100.22").status_code == 200


def test_the_device_form_needs_a_session_and_its_csrf_token(gw: DeviceGateway) -> None:
    code = new_code(gw, "192.0.2.14")
    user_code = code["user_code"]
    # Signed out: through GitHub sign-in and back to the page, with the code.
    browser, user = gw.auth.browser(), new_user()
    r = browser.get(f"{gw.url}/device", params={"user_code": user_code.lower()})
    assert r.status_code == 303
    assert r.headers["location"] == "/auth/github/start?next=" + quote(f"/device?user_code={user_code}", safe="")
    gw.auth.github.sign_in(user)
    r = browser.get(f"{gw.url}{r.headers['location']}")
    assert r.status_code == 302
    callback = browser.get(r.headers["location"]).headers["location"]
    r = browser.get(gw.auth.on(gw.auth.b, callback))
    # A new account sees its one-shot key first, then goes on to the device page.
    assert r.status_code == 200
    gw.auth.key_from_page(r.text)
    assert f'href="/device?user_code={user_code}"' in r.text
    # A returning owner (another browser) comes straight back.
    again = gw.auth.browser()
    gw.auth.github.sign_in(user)
    r = again.get(f"{gw.url}/auth/github/start", params={"next": f"/device?user_code={user_code}"})
    callback = again.get(r.headers["location"]).headers["location"]
    r = again.get(gw.auth.on(gw.auth.a, callback))
    assert (r.status_code, r.headers["location"]) == (303, f"/device?user_code={user_code}")
    # Elsewhere is never a place to come back to.
    for evil in ("https://evil.example/", "//evil.example/device", "/\\evil.example", "/device/../x", "/auth/logout"):
        gw.auth.github.sign_in(user)
        r = again.get(f"{gw.url}/auth/github/start", params={"next": evil})
        callback = again.get(r.headers["location"]).headers["location"]
        r = again.get(gw.auth.on(gw.auth.a, callback))
        assert (r.status_code, r.headers["location"]) == (303, "/account"), evil

    # No CSRF token, or another session's: refused, nothing approved.
    form = {"user_code": user_code, "name": "x", "action": "approve"}
    r = browser.post(f"{gw.url}/device", data=form)
    assert r.status_code == 403
    assert "Nothing was done" in r.text
    r = browser.post(f"{gw.url}/device", data={**form, "csrf": csrf_of(again.get(f"{gw.url}/device").text)})
    assert r.status_code == 403
    # Signed out, the form does nothing either.
    r = httpx.post(f"{gw.url}/device", data={**form, "csrf": csrf_of(browser.get(f"{gw.url}/device").text)})
    assert (r.status_code, r.headers["location"]) == (303, "/device")
    assert oauth_error(poll(gw, code["device_code"])) == "authorization_pending"

    # The page loads nothing and runs nothing.
    page = browser.get(f"{gw.url}/device")
    assert "<script" not in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"


def test_device_login_units() -> None:
    assert normalize_user_code(" bcdf-ghjk ") == "BCDFGHJK"
    assert normalize_user_code("BCDFGHJ") is None
    assert normalize_user_code("BCDF-GHJA") is None, "no vowels in the alphabet"
    assert safe_return_path("/device?user_code=BCDF-GHJK&x=1") == "/device?user_code=BCDF-GHJK"
    for evil in ("https://e.example", "//e.example", "/\\e.example", "/device\n", "/account/../x", "device"):
        assert safe_return_path(evil) is None, evil
    assert without_credentials("nats://u:p@h1:4222,tls://tok@h2:4443?token=t") == "nats://h1:4222,tls://h2:4443"
    assert check_url("https://pool.example/") == "https://pool.example"
    assert check_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080"
    for bad in ("http://pool.example", "ftp://pool.example", "https://u:p@pool.example", "pool.example"):
        with pytest.raises(LoginError):
            check_url(bad)


# A stand-in for /usr/bin/security with the three commands daemon/keychain.py uses; it records
# every argv it is started with, so the test sees whether a secret ever appeared in one.
_FAKE_SECURITY = """#!/usr/bin/env python3
import json, shlex, sys
from pathlib import Path
here = Path(__file__).parent
store = here / "items.json"
items = json.loads(store.read_text()) if store.exists() else {}
with (here / "argv.log").open("a") as log:
    log.write(json.dumps(sys.argv) + "\\n")

def opts(args):
    return {args[i]: args[i + 1] if i + 1 < len(args) else "" for i in range(len(args)) if args[i].startswith("-")}

def run(args):
    o = opts(args[1:])
    key = o.get("-s", "") + "/" + o.get("-a", "")
    if args[0] == "add-generic-password":
        if key in items and "-U" not in args:
            return 45
        items[key] = o["-w"]
    elif args[0] == "find-generic-password":
        if key not in items:
            return 44
        print(items[key])
    elif args[0] == "delete-generic-password":
        return 0 if items.pop(key, None) is not None else 44
    return 0

if sys.argv[1:] == ["-i"]:
    for line in sys.stdin:
        run(shlex.split(line))
    code = 0
else:
    code = run(sys.argv[1:])
store.write_text(json.dumps(items))
sys.exit(code)
"""


def test_the_token_in_the_keychain_never_passes_through_an_argv(tmp_path: Path) -> None:
    tool = tmp_path / "bin" / "security"
    tool.parent.mkdir()
    tool.write_text(_FAKE_SECURITY)
    tool.chmod(0o755)
    token, provider_id = PROVIDER_TOKENS.generate(), tokens.new_provider_id()
    chain = Keychain(tool=tool)
    chain.store(provider_id, token)
    assert chain.read(provider_id) == token
    path = tmp_path / "state" / credentials.FILE_NAME
    stored = credentials.ProviderCredentials(provider_id, "", "nats://pool.example:4222", keychain=chain.service)
    credentials.save(path, stored)
    assert token not in path.read_text(), "the file names the keychain item, it does not hold the token"
    loaded = credentials.load(path, keychain_tool=tool)
    assert loaded is not None
    assert loaded.token == token
    assert token not in (tool.parent / "argv.log").read_text()
    chain.delete(provider_id)
    with pytest.raises(credentials.CredentialsError, match="login keychain"):
        credentials.load(path, keychain_tool=tool)
