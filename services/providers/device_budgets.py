"""Per-replica abuse budgets of device login (services/auth/rate_limit.py explains their bounds).

- `codes`: device codes one client may ask for per minute (each writes a row);
- `unknown_codes`: polls with a device code that matches nothing, per client (each costs a
  query; taken before it and given back when the code is found, so an honest daemon never
  spends any);
- `wrong_codes_client` / `wrong_codes_account`: user codes typed on /device that match no
  live code, per client and per signed-in account (the user code is short: ~34 bits).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.auth.rate_limit import TokenBuckets
from services.settings import Settings

# The app state key of this replica's budgets (made by create_app).
DEVICE_BUDGETS = "device_budgets"


@dataclass(frozen=True)
class DeviceBudgets:
    codes: TokenBuckets
    unknown_codes: TokenBuckets
    wrong_codes_client: TokenBuckets
    wrong_codes_account: TokenBuckets


def device_budgets(settings: Settings) -> DeviceBudgets:
    clients = settings.rate_limit_clients
    return DeviceBudgets(
        codes=TokenBuckets(per_minute=settings.device_codes_per_min, max_clients=clients),
        unknown_codes=TokenBuckets(per_minute=settings.failed_auth_per_min, max_clients=clients),
        wrong_codes_client=TokenBuckets(per_minute=settings.device_wrong_codes_per_min, max_clients=clients),
        wrong_codes_account=TokenBuckets(per_minute=settings.device_wrong_codes_per_min, max_clients=clients),
    )
