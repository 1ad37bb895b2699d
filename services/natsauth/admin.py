"""`mac-provider admin nats-callout`: new secrets for the callout, and the nats-server block that goes with them.

For a deployment that runs its own NATS (a cluster in the cloud): it prints the
control plane's MP_NATS_* settings (fresh seeds and passwords; seeds already set
in the environment are kept) and the block every nats-server node includes. The
secrets go to the control plane's secret store, never into the server's config,
which holds public keys and bcrypt hashes only.
"""

from __future__ import annotations

import argparse
import secrets

from services.natsauth import keys, server_config
from services.settings import Settings

CALLOUT_USER = "natsauth"
SYSTEM_USER = "system"


def add_commands(admin: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    admin.add_parser(
        "nats-callout",
        help="print new auth-callout secrets (MP_NATS_*) and the nats-server config block for them",
    )


def _bcrypt(password: str) -> str:
    try:
        import bcrypt
    except ImportError:
        raise SystemExit("mac-provider: the server config holds bcrypt hashes: pip install bcrypt") from None
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(11)).decode()


def run(settings: Settings) -> int:
    issuer_seed = settings.nats_issuer_seed or keys.new_account_seed()
    xkey_seed = settings.nats_xkey_seed or keys.new_curve_seed()
    passwords = {name: secrets.token_urlsafe(32) for name in (CALLOUT_USER, SYSTEM_USER)}
    control_password = settings.nats_password if settings.nats_user else secrets.token_urlsafe(32)
    control_user = settings.nats_user or "gateway"
    env = {
        "MP_NATS_ISSUER_SEED": issuer_seed,
        "MP_NATS_XKEY_SEED": xkey_seed,
        "MP_NATS_AUTH_USER": CALLOUT_USER,
        "MP_NATS_AUTH_PASSWORD": passwords[CALLOUT_USER],
        "MP_NATS_SYS_USER": SYSTEM_USER,
        "MP_NATS_SYS_PASSWORD": passwords[SYSTEM_USER],
        "MP_NATS_ACCOUNT": settings.nats_account,
        "MP_NATS_USER": control_user,
        "MP_NATS_PASSWORD": control_password,
    }
    config = server_config.render(
        issuer_public=keys.account_public_key(issuer_seed),
        xkey_public=keys.curve_public_key(xkey_seed),
        callout=server_config.Login(CALLOUT_USER, _bcrypt(passwords[CALLOUT_USER])),
        system=server_config.Login(SYSTEM_USER, _bcrypt(passwords[SYSTEM_USER])),
        app_account=settings.nats_account,
    )
    print("# Control plane settings (secrets: keep them in your secret store, give them to every replica):")
    print("".join(f"{name}={value}\n" for name, value in env.items()))
    print("# nats-server: include this on every node (public keys and bcrypt hashes only; restart to apply):")
    print(config)
    return 0
