"""This Mac's provider credentials: what `mac-provider-daemon login` receives, kept 0600.

The file (`<state dir>/provider.json`, or MP_PROVIDER_CREDENTIALS) holds the
control plane's URL, the NATS URL, the provider id the control plane assigned and
the `mpp_` token that proves it. The token is the provider's only secret: the
NATS auth callout checks it on every connect, so revoking it (the owner's page,
the operator's CLI) cuts the daemon off at once.

On a Mac, `login` keeps the token in the owner's login keychain instead
(daemon/keychain.py): the file then names the keychain item (`keychain`: its
service; the account is the provider id) and holds no token, and `load` reads it.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from daemon.keychain import Keychain, KeychainError
from schemas.private_file import PrivateFileError, read_private, write_private

FILE_NAME = "provider.json"
_MAX_BYTES = 16 * 1024


class CredentialsError(Exception):
    """The credentials file cannot be used; the message says why and what to do."""


class ProviderCredentials(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    provider_id: str
    token: str
    nats_url: str
    # The control plane the Mac signed in to (where `status` and a new `login` go).
    control_url: str = ""
    # The name the owner gave this Mac in the browser.
    name: str = ""
    # Not empty: the token is in the login keychain under this service (account: provider_id).
    keychain: str = ""

    def __repr__(self) -> str:  # never the token, whatever prints this
        return f"ProviderCredentials(provider_id={self.provider_id!r}, name={self.name!r}, token=<redacted>)"


def load(path: Path, *, with_token: bool = True, keychain_tool: Path | None = None) -> ProviderCredentials | None:
    """The credentials in `path`; None when there is no such file (not signed in).

    A token kept in the keychain is read from it unless `with_token` is False (then the
    answer's token is empty): `login` only wants the file's URL and provider id.
    """
    try:
        raw = read_private(path, max_bytes=_MAX_BYTES, what="provider credentials file")
    except FileNotFoundError:
        return None
    except PrivateFileError as exc:
        raise CredentialsError(f"{exc}, then run `mac-provider-daemon login` again") from None
    try:
        found = msgspec.json.decode(raw, type=ProviderCredentials)
    except msgspec.DecodeError as exc:
        raise CredentialsError(
            f"the provider credentials file {path} is unreadable ({exc}): run `mac-provider-daemon login` again"
        ) from None
    if found.token or not found.keychain or not with_token:
        return found
    try:
        keychain = Keychain(found.keychain) if keychain_tool is None else Keychain(found.keychain, keychain_tool)
        token = keychain.read(found.provider_id)
    except KeychainError as exc:
        raise CredentialsError(f"{exc}: run `mac-provider-daemon login` again") from None
    if token is None:
        raise CredentialsError(
            f"{path} says this Mac's provider token is in the login keychain (service {found.keychain!r}, "
            f"account {found.provider_id!r}), but it is not there or the keychain is locked: "
            "unlock it, or run `mac-provider-daemon login` again"
        )
    return msgspec.structs.replace(found, token=token)


def save(path: Path, credentials: ProviderCredentials) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, msgspec.json.format(msgspec.json.encode(credentials)) + b"\n")
