"""Who a request is for, once authenticated (services/auth/bearer.py decides).

Its own module so that what only needs the type (metering, the surfaces) does not
import the authentication code, which imports the runtime, which imports metering.
"""

from __future__ import annotations

import msgspec


# msgspec rather than a frozen dataclass: made per request, and a frozen dataclass sets each field through
# object.__setattr__ (a Struct is built in C, several times faster).
class Principal(msgspec.Struct, frozen=True, gc=False):
    """An API key of an account, or an anonymous browser demo token (no account)."""

    account_id: int | None
    key_id: int | None
    demo_token_id: str | None = None

    @property
    def is_demo(self) -> bool:
        return self.demo_token_id is not None
