"""The provider token in the macOS login keychain, through Apple's `/usr/bin/security`.

How the token reaches `security`: never as an argument. `add-generic-password -w <token>`
would put it in the process's argv, which any user on the Mac can read (`ps`) while it
runs. A bare trailing `-w` makes `security` prompt through readpassphrase(3), which reads
the controlling terminal when there is one (there is, during `login`) rather than our pipe,
and asks twice. So we run `security -i` (interactive mode), which reads whole commands from
its standard input: the token travels only through a pipe between this process and
`security`. `-i` does not report a failed command in its exit status, so the item is read
back (`find-generic-password -w` prints it to our pipe) and compared.

An item made by `/usr/bin/security` lists `security` itself as an application allowed to
read it, so the daemon, started by launchd as the owner, reads it back the same way
without a prompt while the login keychain is unlocked.
"""

from __future__ import annotations

import hmac
import platform
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TOOL = Path("/usr/bin/security")
SERVICE = "mac-provider"
# What may appear in a command line of `security -i` unquoted: service, account (provider id), token.
_PLAIN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_TIMEOUT_S = 30.0


class KeychainError(Exception):
    """The keychain could not be used; the message says why."""


@dataclass(frozen=True, slots=True)
class Keychain:
    service: str = SERVICE
    tool: Path = TOOL

    def __post_init__(self) -> None:
        if not _PLAIN.match(self.service):
            raise KeychainError(f"keychain service name {self.service!r}: use letters, digits, . _ -")

    def _run(self, args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [str(self.tool), *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KeychainError(f"{self.tool} failed: {type(exc).__name__}") from None

    def store(self, account: str, secret: str) -> None:
        """Add or replace the item (service, account) holding `secret`; KeychainError if it did not stick."""
        if not _PLAIN.match(account) or not _PLAIN.match(secret):
            raise KeychainError("refusing to store a name or secret with characters security -i would misread")
        self._run(["-i"], stdin=f"add-generic-password -U -s {self.service} -a {account} -w {secret}\n")
        found = self.read(account)
        if found is None or not hmac.compare_digest(found.encode(), secret.encode()):
            raise KeychainError("the login keychain did not keep the token (is it locked?)")

    def read(self, account: str) -> str | None:
        """The secret of (service, account), or None if there is none (or the keychain refuses)."""
        if not _PLAIN.match(account):
            return None
        done = self._run(["find-generic-password", "-s", self.service, "-a", account, "-w"])
        value = done.stdout.strip()
        return value if done.returncode == 0 and value else None

    def delete(self, account: str) -> None:
        if _PLAIN.match(account):
            self._run(["delete-generic-password", "-s", self.service, "-a", account])


def login_keychain(env: Mapping[str, str]) -> Keychain | None:
    """The owner's login keychain on a Mac with `security`; None elsewhere, or with MP_KEYCHAIN=off."""
    if env.get("MP_KEYCHAIN", "auto") == "off" or platform.system() != "Darwin" or not TOOL.exists():
        return None
    return Keychain()
