"""Per-client abuse limits, on gateways started for these tests on a database of their own.

- `edge` trusts one proxy hop, so each test stands for many clients by sending
  X-Forwarded-For as a load balancer would; it is given its NATS password inside
  NATS_URL, and never writes it to its log.
- `direct` trusts none: the peer (127.0.0.1) is the client, whatever headers say.

Both start with small budgets: 2 demo tokens per address, 3 per IPv6 /64,
4 failed key lookups and 3 sign-in starts per client per minute. The global demo
budget is tested on two in-process replicas sharing a second fresh database.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from litestar.testing import AsyncTestClient

from infra.components import Child, start_gateway
from infra.ports import free_port
from services.app import create_app
from services.auth.client_ip import client_key
from services.auth.rate_limit import TokenBuckets
from services.keys import format as key_format
from services.settings import Settings
from tests.support.accounts import fetch, make_account, make_account_async
from tests.support.databases import fresh_database
from tests.support.stack import Stack

_client = httpx.Client(timeout=30)
LIMITS = {
    "MP_DEMO_TOKENS_PER_IP": "2",
    "MP_DEMO_TOKENS_PER_NET64": "3",
    "MP_DEMO_TOKENS_GLOBAL": "1000",
    "MP_FAILED_AUTH_PER_MIN": "4",
    "MP_GITHUB_START_PER_MIN": "3",
    # Configured, so that a sign-in start writes its state row (GitHub itself is never called).
    "MP_GITHUB_CLIENT_ID": "limits-test",
    "MP_GITHUB_CLIENT_SECRET": "limits-test-secret",
}


def net() -> str:
    """A fresh documentation-range IPv6 /64, as its first four groups."""
    return f"2001:db8:{secrets.token_hex(2)}:{secrets.token_hex(2)}"


def v6() -> str:
    return f"{net()}::{secrets.token_hex(2)}"


def v4() -> str:
    return "10." + ".".join(str(b) for b in secrets.token_bytes(3))


@dataclass
class Limited:
    edge: str
    direct: str
    database_url: str
    children: list[Child]


@pytest.fixture(scope="module")
def limited(stack: Stack) -> Iterator[Limited]:
    database_url = fresh_database(stack.postgres, "limits", migrated=False)
    ports = {"edge": free_port(), "direct": free_port()}
    envs = {
        "edge": {
            **LIMITS,
            "MP_TRUSTED_PROXY_HOPS": "1",
            # The control plane's password rides in the URL here.
            "NATS_URL": stack.nats.gateway_url,
            "MP_NATS_USER": "",
            "MP_NATS_PASSWORD": "",
        },
        "direct": {**LIMITS, "MP_TRUSTED_PROXY_HOPS": "0"},
    }

    def start(name: str) -> Child:
        return start_gateway(
            stack.home,
            port=ports[name],
            nats=stack.nats,
            database_url=database_url,
            name=f"gateway-limits-{name}",
            env=envs[name],
        )

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start, name) for name in ports]
    children = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:
            f.result()
        yield Limited(
            edge=f"http://127.0.0.1:{ports['edge']}",
            direct=f"http://127.0.0.1:{ports['direct']}",
            database_url=database_url,
            children=children,
        )
    finally:
        for child in children:
            child.stop()


def _demo(base: str, client: str, **headers: str) -> httpx.Response:
    return _client.post(f"{base}/auth/demo", headers={"X-Forwarded-For": client, **headers})


def _refused(r: httpx.Response, words: str, *, most: int) -> None:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limited"), r.text
    assert words in error["message"], r.text
    assert 1 <= int(r.headers["retry-after"]) <= most


def test_an_ipv6_network_gets_no_more_demo_tokens_by_changing_address(limited: Limited) -> None:
    # Twelve addresses of one /64 at once: the network's three, however the requests interleave.
    flood = net()
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: _demo(limited.edge, f"{flood}::{i + 1:x}"), range(12)))
    assert sorted(r.status_code for r in answers) == [201] * 3 + [429] * 9
    _refused(next(r for r in answers if r.status_code == 429), "this network (IPv6 /64)", most=3600)
    _refused(_demo(limited.edge, f"{flood}:ffff:ffff:ffff:ffff"), "/64", most=3600)
    # The next /64, and IPv4 clients, are not affected.
    assert _demo(limited.edge, f"{v6()}").status_code == 201
    assert _demo(limited.edge, v4()).status_code == 201
    # Per address still holds inside a network with room left.
    client = v6()
    assert [_demo(limited.edge, client).status_code for _ in range(2)] == [201, 201]
    _refused(_demo(limited.edge, client), "from this address", most=3600)
    # An IPv4 client behind a dual-stack socket is one client, however it is spelled.
    mapped = v4()
    assert [_demo(limited.edge, f"::ffff:{mapped}").status_code for _ in range(2)] == [201, 201]
    _refused(_demo(limited.edge, mapped), "from this address", most=3600)


def test_forwarded_headers_from_a_loopback_client_change_nothing_without_trusted_hops(limited: Limited) -> None:
    # uvicorn would take these from any client on 127.0.0.1; with no trusted hop the peer is the client.
    spoofs = [
        {"X-Forwarded-For": v4(), "X-Real-IP": v4(), "Forwarded": f"for={v4()}", "X-Forwarded-Proto": "https"}
        for _ in range(4)
    ]
    statuses = [_client.post(f"{limited.direct}/auth/demo", headers=h).status_code for h in spoofs]
    assert statuses == [201, 201, 429, 429]


def _models(base: str, client: str, key: str) -> httpx.Response:
    return _client.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": client})


def test_failed_key_lookups_are_limited_per_client_and_honest_keys_never_are(limited: Limited) -> None:
    honest = make_account(limited.database_url)
    attacker = v6()
    assert _models(limited.edge, attacker, honest.key).status_code == 200  # known to this replica from now on

    # Well-formed keys with a valid checksum cost a query each: four per minute, then 429.
    for _ in range(4):
        r = _models(limited.edge, attacker, key_format.generate())
        assert (r.status_code, r.json()["error"]["code"]) == (401, "invalid_api_key"), r.text
    _refused(_models(limited.edge, attacker, key_format.generate()), "unknown API keys", most=15)
    # The same /64 is the same client; the Anthropic surface shares the budget (in its own envelope).
    _refused(_models(limited.edge, f"{attacker.rsplit(':', 1)[0]}:beef", key_format.generate()), "unknown", most=15)
    r = _client.post(
        f"{limited.edge}/v1/messages",
        headers={"x-api-key": key_format.generate(), "X-Forwarded-For": attacker},
        json={"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert (r.status_code, r.json()["error"]["type"]) == (429, "rate_limit_error"), r.text
    assert int(r.headers["retry-after"]) >= 1
    # Garbage costs no query and is refused as before; the key the attacker's address already used still works.
    r = _models(limited.edge, attacker, "mp_" + "A" * 36)
    assert (r.status_code, r.json()["error"]["code"]) == (401, "invalid_api_key")
    assert _models(limited.edge, attacker, honest.key).status_code == 200

    # Honest clients: six keys this replica has never seen, from one address, then its own mistakes.
    keys = asyncio.run(_accounts(limited.database_url, 6))
    honest_client = v4()
    assert [_models(limited.edge, honest_client, key).status_code for key in keys] == [200] * 6
    assert [_models(limited.edge, honest_client, key).status_code for key in keys] == [200] * 6
    statuses = [_models(limited.edge, honest_client, key_format.generate()).status_code for _ in range(5)]
    assert statuses == [401] * 4 + [429], "finding a key spent nothing of the budget"


def test_an_honest_key_arriving_many_times_at_once_is_one_lookup(limited: Limited) -> None:
    """An agent fleet behind one address sends 24 requests at once with a key this replica has not
    cached (new, or its cache entry just expired). They once each took a unit of the failed-lookup
    budget before their query (4 here), and all but the first few were refused 429; they share one
    query now. Guesses still count against the address."""
    honest = make_account(limited.database_url)
    fleet = v4()
    with ThreadPoolExecutor(24) as pool:
        statuses = list(pool.map(lambda _: _models(limited.edge, fleet, honest.key).status_code, range(24)))
    assert statuses == [200] * 24, statuses
    guess = key_format.generate()
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda _: _models(limited.edge, fleet, guess).status_code, range(12)))
    assert statuses.count(401) >= 1, statuses
    assert set(statuses) <= {401, 429}, statuses
    # Guesses are still bounded: by now the address has used its 4 failed lookups.
    after = [_models(limited.edge, fleet, key_format.generate()).status_code for _ in range(5)]
    assert after[-1] == 429, after


def test_many_keys_never_seen_arriving_together_from_one_address_are_all_served(limited: Limited) -> None:
    """A company's agents behind one address, each with its own key, starting together (or any busy
    address right after a replica started): 12 keys this replica never saw, at once, against a budget
    of 4 lookups. Each lookup holds a unit until it finds its key, so all past the 4th were refused 429
    (`just bench hotpath`, 64 keys at once: 21). They wait for the address's lookups under way now.
    Guesses arriving together are still bounded: 4 queries, then refusals."""
    keys = asyncio.run(_accounts(limited.database_url, 12))
    office = v4()
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda key: _models(limited.edge, office, key).status_code, keys))
    assert statuses == [200] * 12, statuses
    attacker = v4()
    with ThreadPoolExecutor(12) as pool:
        guesses = list(pool.map(lambda _: _models(limited.edge, attacker, key_format.generate()), range(12)))
    statuses = sorted(r.status_code for r in guesses)
    assert statuses == [401] * 4 + [429] * 8, statuses
    refused = next(r for r in guesses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    # The office's keys are known now: a guess from there still spends its own budget only.
    assert [_models(limited.edge, office, key).status_code for key in keys[:3]] == [200] * 3


def test_keys_whose_cache_entries_expired_together_are_refreshed_without_the_budget(stack: Stack) -> None:
    """An agent fleet's keys, cached together, expire together (MP_KEY_CACHE_TTL_S). Their refreshes are
    no guesses: they once each took a unit of the failed-lookup budget before their query, and with 12 keys
    at once from one address, 8 were refused 429 (`just bench hotpath` saw 26 of 64)."""
    database_url = fresh_database(stack.postgres, "stale", migrated=True)
    port = free_port()
    gateway = start_gateway(
        stack.home,
        port=port,
        nats=stack.nats,
        database_url=database_url,
        name="gateway-limits-stale",
        env={"MP_FAILED_AUTH_PER_MIN": "4", "MP_KEY_CACHE_TTL_S": "0.5", "MP_TRUSTED_PROXY_HOPS": "0"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        keys = asyncio.run(_accounts(database_url, 12))
        client = v4()  # ignored (no trusted hop): every request comes from 127.0.0.1
        # One at a time: each lookup's unit is given back before the next is taken.
        assert [_models(base, client, key).status_code for key in keys] == [200] * 12
        time.sleep(0.7)  # every entry expired
        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(lambda key: _models(base, client, key).status_code, keys))
        assert statuses == [200] * 12, statuses
        # Guesses from that address still spend the budget, and are refused past it.
        statuses = [_models(base, client, key_format.generate()).status_code for _ in range(5)]
        assert statuses == [401] * 4 + [429], statuses
    finally:
        gateway.stop()


async def _accounts(database_url: str, n: int) -> list[str]:
    return [(await make_account_async(database_url)).key for _ in range(n)]


def test_sign_in_starts_are_limited_per_client(limited: Limited) -> None:
    async def states() -> int:
        return int((await fetch(limited.database_url, "SELECT count(*) FROM oauth_states"))[0][0])

    before = asyncio.run(states())
    client = v6()
    starts = [_client.get(f"{limited.edge}/auth/github/start", headers={"X-Forwarded-For": client}) for _ in range(3)]
    assert [r.status_code for r in starts] == [302] * 3
    _refused(_client.get(f"{limited.edge}/auth/github/start", headers={"X-Forwarded-For": client}), "sign-ins", most=20)
    assert asyncio.run(states()) == before + 3, "a refused start writes nothing"
    assert _client.get(f"{limited.edge}/auth/github/start", headers={"X-Forwarded-For": v6()}).status_code == 302


def test_a_nats_password_given_in_the_url_stays_out_of_the_gateway_log(stack: Stack, limited: Limited) -> None:
    assert _client.get(f"{limited.edge}/health").json()["nats"] is True, "it logged in with the URL's password"
    password = stack.nats.gateway.password
    assert password in stack.nats.gateway_url
    log = next(c for c in limited.children if c.name == "gateway-limits-edge").log_path.read_text()
    assert "control_plane_ready" in log
    assert password not in log


async def test_the_global_demo_budget_holds_across_replicas(stack: Stack) -> None:
    database_url = fresh_database(stack.postgres, "global", migrated=False)
    env = {
        **os.environ,
        "MP_HOME": str(stack.home),
        "DATABASE_URL": database_url,
        "NATS_URL": stack.nats_url,
        "MP_TRUSTED_PROXY_HOPS": "1",
        "MP_DEMO_TOKENS_PER_IP": "10",
        "MP_DEMO_TOKENS_PER_NET64": "10",
        "MP_DEMO_TOKENS_GLOBAL": "5",
    }
    replicas = [create_app(Settings.from_env(env)), create_app(Settings.from_env(env))]
    async with AsyncTestClient(replicas[0]) as a, AsyncTestClient(replicas[1]) as b:
        answers = await asyncio.gather(
            *((a, b)[i % 2].post("/auth/demo", headers={"X-Forwarded-For": v6() if i % 3 else v4()}) for i in range(16))
        )
        assert sorted(r.status_code for r in answers) == [201] * 5 + [429] * 11
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.json()["error"]["code"] == "rate_limited"
        assert "all its tokens" in refused.json()["error"]["message"]
        assert 1 <= int(refused.headers["retry-after"]) <= 3600
        # Any newcomer, on either replica, is refused until the window ends.
        for client in (a, b):
            r = await client.post("/auth/demo", headers={"X-Forwarded-For": v6()})
            assert r.status_code == 429, r.text


def test_token_buckets_refill_and_stay_bounded_under_a_flood_of_clients() -> None:
    now = [1000.0]
    buckets = TokenBuckets(per_minute=30, max_clients=1000, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(30)] == [None] * 30
    assert buckets.take("a") == 2, "one token every 2 s"
    now[0] += 2.0
    assert buckets.take("a") is None
    buckets.give_back("a")
    assert buckets.take("a") is None
    assert buckets.take("a") == 2
    # A flood from 100k addresses keeps at most 1000 buckets; each got its full budget once.
    for i in range(100_000):
        assert buckets.take(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}") is None
    assert len(buckets) == 1000
    # A bucket that has refilled is forgotten: it is the same as none.
    now[0] += 60.0
    buckets.take("b")
    assert len(buckets) == 1000
    buckets.give_back("b")
    assert len(buckets) == 999
    # Every address of one IPv6 /64 is one client; an IPv4 address is itself.
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("192.0.2.7") == "192.0.2.7"
