"""`mac-provider-daemon login`: sign this Mac in to the pool with the device flow (RFC 8628).

The daemon asks the control plane for a device code, prints where to confirm it
(the verification URL and the short user code), and polls, honouring `interval`,
`slow_down` and `expires_in`, while the owner, signed in with GitHub in a browser,
approves the code and names the Mac. The answer is a provider token (`mpp_…`) and
the provider id it speaks for, kept in the credentials file (0600) that `serve`
reads, and on a Mac in the login keychain (daemon/keychain.py), the file then
naming the keychain item instead of holding the token.

Exit codes: 0 signed in; 1 failed (unreachable, refused, odd answers); 2 bad
usage or settings; 3 the owner denied it; 4 the code expired; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

import httpx2
import msgspec

from daemon import credentials
from daemon.keychain import Keychain, KeychainError, login_keychain
from daemon.settings import credentials_path, is_loopback, merged_env, state_dir_of
from schemas.device import (
    GRANT_TYPE,
    MAX_INTERVAL_S,
    MAX_NAME,
    SLOW_DOWN_STEP_S,
    DeviceCode,
    DeviceToken,
    OAuthError,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DENIED, EXIT_EXPIRED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
CLIENT_ID = "mac-provider-daemon"
NEXT_STEP = "brew services start mac-provider-daemon"
_HTTP_TIMEOUT_S = 15.0
# Backoff while the control plane is unreachable (RFC 8628 §3.5: back off on errors).
_MAX_BACKOFF_S = 60.0
_MAX_ANSWER = 64 * 1024


class LoginError(Exception):
    """Login cannot start; the message says why (exit code 2)."""


@dataclass(frozen=True, slots=True)
class LoginSettings:
    control_url: str
    name: str
    credentials_path: Path
    # The login keychain on a Mac (None: the 0600 file only).
    keychain: Keychain | None


def check_url(raw: str) -> str:
    """The control plane's base URL: https, or http only to this machine (a token over plain http leaks)."""
    parts = urlsplit(raw.strip())
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise LoginError(f"--url {raw!r}: expected https://host (the pool's control plane)")
    if parts.scheme == "http" and not is_loopback(host):
        raise LoginError(f"--url {raw!r}: refusing plain http to another machine; the token would cross in clear")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise LoginError(f"--url {raw!r}: give the base URL only (no user, query or fragment)")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _default_name() -> str:
    return platform.node().split(".")[0][:MAX_NAME] or "Mac"


def login_settings(
    env: Mapping[str, str] | None = None, *, url: str | None, name: str | None, config_file: Path | None = None
) -> LoginSettings:
    """From the arguments, MP_CONTROL_URL, and the Mac's previous sign-in (its control URL)."""
    merged = merged_env(env, config_file)
    path = credentials_path(merged, state_dir_of(merged))
    previous = None
    if not url and not merged.get("MP_CONTROL_URL"):
        try:
            previous = credentials.load(path, with_token=False)
        except credentials.CredentialsError:
            previous = None  # a broken file is what login replaces
    raw = url or merged.get("MP_CONTROL_URL") or (previous.control_url if previous else "")
    if not raw:
        raise LoginError("which pool? pass --url https://… (or set MP_CONTROL_URL)")
    chosen = (name if name is not None else _default_name()).strip()
    if len(chosen) > MAX_NAME or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in chosen):
        raise LoginError(f"--name: at most {MAX_NAME} characters, no control characters")
    return LoginSettings(check_url(raw), chosen, path, login_keychain(merged))


def _problem(response: httpx2.Response) -> OAuthError | None:
    try:
        return msgspec.json.decode(response.content[:_MAX_ANSWER], type=OAuthError)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _say(out: TextIO, text: str = "") -> None:
    print(text, file=out, flush=True)


def _store(settings: LoginSettings, token: DeviceToken, err: TextIO) -> str:
    """Write the credentials (the token in the keychain when there is one); where the token went."""
    try:
        previous = credentials.load(settings.credentials_path, with_token=False)
    except credentials.CredentialsError:
        previous = None
    in_keychain = ""
    if settings.keychain is not None:
        try:
            settings.keychain.store(token.provider_id, token.access_token)
            in_keychain = settings.keychain.service
        except KeychainError as exc:
            _say(err, f"mac-provider-daemon: not kept in the login keychain ({exc}); the file alone holds it")
    creds = credentials.ProviderCredentials(
        provider_id=token.provider_id,
        token="" if in_keychain else token.access_token,
        nats_url=token.nats_url,
        control_url=settings.control_url,
        name=token.name,
        keychain=in_keychain,
    )
    credentials.save(settings.credentials_path, creds)
    if previous is not None and previous.provider_id != token.provider_id and previous.keychain and settings.keychain:
        # The old identity's token is no use on this Mac any more; the owner revokes it on the account page.
        with contextlib.suppress(KeychainError):
            Keychain(previous.keychain, settings.keychain.tool).delete(previous.provider_id)
    if previous is not None and previous.provider_id != token.provider_id:
        _say(
            err,
            f"This Mac was signed in as {previous.provider_id}; it is now {token.provider_id}. "
            "Revoke the old one on your account page if nothing else uses it.",
        )
    return f"the login keychain (service {in_keychain!r})" if in_keychain else str(settings.credentials_path)


def run_login(settings: LoginSettings, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        with httpx2.Client(
            base_url=settings.control_url,
            timeout=_HTTP_TIMEOUT_S,
            # A redirect could take the token request to another host, or to plain http.
            follow_redirects=False,
            headers={"User-Agent": CLIENT_ID, "Accept": "application/json"},
        ) as client:
            return _login(client, settings, out, err)
    except KeyboardInterrupt:
        _say(err, "\nmac-provider-daemon: login cancelled; nothing was saved.")
        return EXIT_INTERRUPTED


def _login(client: httpx2.Client, settings: LoginSettings, out: TextIO, err: TextIO) -> int:
    url = settings.control_url
    try:
        r = client.post("/provider/device/code", data={"client_id": CLIENT_ID, "name": settings.name})
    except httpx2.HTTPError as exc:
        _say(err, f"mac-provider-daemon: cannot reach {url}: {type(exc).__name__}")
        return EXIT_FAILED
    if r.status_code != 200:
        problem = _problem(r)
        why = problem.error_description or problem.error if problem else f"HTTP {r.status_code}"
        _say(err, f"mac-provider-daemon: {url} refused to start a sign-in: {why}")
        return EXIT_FAILED
    try:
        code = msgspec.json.decode(r.content[:_MAX_ANSWER], type=DeviceCode)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        _say(err, f"mac-provider-daemon: {url} is not a Mac Provider control plane (bad device code answer: {exc})")
        return EXIT_FAILED

    minutes = max(1, code.expires_in // 60)
    _say(out, "To sign this Mac in, open this page in a browser where you can sign in with GitHub:")
    _say(out, f"    {code.verification_uri}")
    _say(out, "and enter the code:")
    _say(out, f"    {code.user_code}")
    _say(out, f"(or open {code.verification_uri_complete} )")
    _say(out, f"Waiting for you to approve it (the code expires in {minutes} min; Ctrl-C cancels)...")

    deadline = time.monotonic() + code.expires_in
    interval = float(code.interval)
    backoff = 0.0
    form = {"grant_type": GRANT_TYPE, "device_code": code.device_code, "client_id": CLIENT_ID}
    while True:
        wait = max(interval, backoff)
        if time.monotonic() + wait >= deadline:
            _say(err, "mac-provider-daemon: the code expired before it was approved. Run `login` again.")
            return EXIT_EXPIRED
        time.sleep(wait)
        try:
            r = client.post("/provider/device/token", data=form)
        except httpx2.HTTPError as exc:
            backoff = min(_MAX_BACKOFF_S, max(backoff * 2, interval))
            _say(err, f"mac-provider-daemon: {url} unreachable ({type(exc).__name__}); trying again")
            continue
        if r.status_code == 200:
            try:
                token = msgspec.json.decode(r.content[:_MAX_ANSWER], type=DeviceToken)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                _say(err, f"mac-provider-daemon: {url} answered the token request oddly ({exc})")
                return EXIT_FAILED
            where = _store(settings, token, err)
            _say(out, f"Signed in: this Mac is {token.provider_id} ({token.name!r}); its token is in {where}.")
            _say(out, f"Credentials: {settings.credentials_path} (readable by you only).")
            _say(out, f"Next: {NEXT_STEP}")
            return EXIT_OK
        problem = _problem(r)
        if problem is None:
            if r.status_code >= 500:
                backoff = min(_MAX_BACKOFF_S, max(backoff * 2, interval))
                _say(err, f"mac-provider-daemon: {url} answered HTTP {r.status_code}; trying again")
                continue
            _say(err, f"mac-provider-daemon: {url} answered HTTP {r.status_code} to the token request")
            return EXIT_FAILED
        backoff = 0.0
        if problem.error == "authorization_pending":
            interval = max(interval, float(problem.interval or 0))
        elif problem.error == "slow_down":
            # RFC 8628 §3.5: 5 s more for this and every later poll (or what the server says, if more).
            interval = min(float(MAX_INTERVAL_S), max(interval + SLOW_DOWN_STEP_S, float(problem.interval or 0)))
        elif problem.error == "rate_limited":
            backoff = min(_MAX_BACKOFF_S, max(1.0, _retry_after(r)))
        elif problem.error == "access_denied":
            _say(err, "mac-provider-daemon: access denied: the sign-in was denied in the browser. Nothing was saved.")
            return EXIT_DENIED
        elif problem.error == "expired_token":
            _say(err, "mac-provider-daemon: the code expired before it was approved. Run `login` again.")
            return EXIT_EXPIRED
        else:
            why = problem.error_description or problem.error
            _say(err, f"mac-provider-daemon: sign-in failed: {problem.error}: {why}")
            return EXIT_FAILED


def _retry_after(r: httpx2.Response) -> float:
    try:
        return float(r.headers.get("retry-after", "5"))
    except ValueError:
        return 5.0


def main(url: str | None, name: str | None, config_file: Path | None) -> int:
    try:
        settings = login_settings(url=url, name=name, config_file=config_file)
    except (LoginError, ValueError) as exc:
        print(f"mac-provider-daemon: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_login(settings)
