"""How many quota lease statements a gateway ran, by what its leases ran short of (`mp_quota_lease_grants_total`).

Read from the gateway's own /metrics between rounds, so a benchmark can show lease statements per request
beside its timings: a lease covers about 2 s of a subject's rate, and more than a few per thousand requests on
one key is churn (each is a PostgreSQL statement the requests waiting for it wait on).
"""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

METRIC = "mp_quota_lease_grants"
SHORT = ("requests", "tokens", "slots", "none", "ahead")
# The metrics token a gateway made under its MP_HOME (services/settings.py), where none was given.
TOKEN_FILE = "metrics_token"


class GrantProbe:
    """One gateway's lease grants so far, by what ran short."""

    def __init__(self, base_url: str, home: Path) -> None:
        self.url = f"{base_url}/metrics"
        self.home = home

    async def snapshot(self, client: httpx.AsyncClient) -> dict[str, float] | None:
        """The counter's values now; None where the gateway's metrics cannot be read."""
        try:
            token = (self.home / TOKEN_FILE).read_text().strip()
            response = await client.get(self.url, headers={"authorization": f"Bearer {token}"}, timeout=10)
        except (OSError, httpx.HTTPError):
            return None
        if response.status_code != 200:
            return None
        found = dict.fromkeys(SHORT, 0.0)
        for family in text_string_to_metric_families(response.text):
            if family.name == METRIC:
                for sample in family.samples:
                    if sample.name == f"{METRIC}_total" and sample.labels.get("short") in found:
                        found[sample.labels["short"]] += sample.value
        return found

    @staticmethod
    def used(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
        if before is None or after is None:
            return None
        return {k: after[k] - before[k] for k in SHORT}
