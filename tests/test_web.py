"""The web front door in a real browser: headless Chromium (Debian's) driven by Playwright.

One module, one browser, one stack: the session's sign-up replicas (auth_stack, with the
loopback GitHub) plus one synthetic daemon that streams slowly enough to watch. Every page
is checked with axe-core (vendored in tests/support/axe) and must load with no console
error and no CSP violation; each test leaves a screenshot of its page (MP_WEB_SCREENSHOTS=dir
writes them there, e.g. docs/screenshots).

Without chromium the module skips, unless MP_REQUIRE_BROWSER=1 (CI), where it fails.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.components import DaemonChild, start_daemon, wait_model
from schemas.codes import REQUEST_FAULTS
from services import app as _whole_app  # noqa: F401  (every module that defines an error code is loaded)
from services.errors import ApiError
from tests.support import logs
from tests.support.accounts import query
from tests.support.auth_stack import AuthStack
from tests.support.github import User

# A hung page must not hold the suite for pytest's default 300 s.
pytestmark = pytest.mark.timeout(90)

WEB_MODEL = "web-demo-model"
AXE = Path(__file__).parent / "support" / "axe" / "axe.min.js"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Recorded before any page script runs (init scripts are not subject to the page's CSP).
_WATCH_CSP = """
window.__csp = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));
"""


def _sql(database_url: str, sql: str, *args: object) -> list[Any]:
    # Playwright's sync API keeps an event loop running on this thread: the query gets a thread of its own.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(query, database_url, sql, *args).result()


def _chromium() -> str:
    """The system Chromium, checked when the module is collected: without one no stack is started for nothing."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        reason = "no system chromium (apt-get install chromium) or no playwright (pip install -e '.[dev]')"
        if os.environ.get("MP_REQUIRE_BROWSER") == "1":
            pytest.fail(f"MP_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
    return path


CHROMIUM = _chromium()


@dataclass
class Web:
    auth: AuthStack
    daemon: DaemonChild
    browser: Any
    shots: Path
    axe: str = field(default_factory=lambda: AXE.read_text(), repr=False)
    xff: list[int] = field(default_factory=lambda: [0])

    @property
    def base(self) -> str:
        return self.auth.a

    def page(self) -> Any:
        # Each page comes from its own documentation address (X-Forwarded-For: the replicas trust one hop),
        # so the demo tokens it takes never meet another test's per-address budget.
        self.xff[0] += 1
        context = self.browser.new_context(
            extra_http_headers={"X-Forwarded-For": f"198.51.100.{self.xff[0]}"}, viewport={"width": 1000, "height": 800}
        )
        context.add_init_script(_WATCH_CSP)
        page = context.new_page()
        page.set_default_timeout(10_000)
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"{m.text} ({m.location})") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.problems = problems  # read by check()
        return page

    def check(self, page: Any, name: str | None = None, *, failed_on_purpose: str | None = None) -> None:
        """axe finds no serious or critical violation, nothing was refused by the CSP, no console error; a screenshot.

        `name`: the screenshot's (one per page, for docs/screenshots). `failed_on_purpose`: an API path the
        test made fail; the browser logs its error status, and only that.
        """
        page.evaluate(self.axe + "\n;0")
        violations = page.evaluate(
            """async () => (await axe.run(document, {resultTypes: ["violations"]})).violations
                 .map((v) => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map((n) => n.html)}))"""
        )
        serious = [v for v in violations if v["impact"] in ("serious", "critical")]
        assert serious == [], json.dumps(serious, indent=1)
        assert page.evaluate("window.__csp") == [], page.url
        problems = [p for p in page.problems if not (failed_on_purpose and f"{failed_on_purpose}'" in p)]
        assert problems == [], problems
        if name:
            page.screenshot(path=str(self.shots / f"{name}.png"))


@pytest.fixture(scope="module")
def web(auth_stack: AuthStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    from playwright.sync_api import sync_playwright

    # The stand-in engine (never a model): a fixed text, one token every 20 ms, so streaming can be watched.
    daemon = start_daemon(
        auth_stack.stack.home,
        nats=auth_stack.stack.nats,
        provider_id="web-demo-mac",
        model_id=WEB_MODEL,
        engine="synthetic",
        env={"MP_HEARTBEAT_S": "0.5", "MP_SYNTHETIC_TOKEN_DELAY_S": "0.02"},
    )
    shots = Path(os.environ.get("MP_WEB_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        wait_model(auth_stack.a, WEB_MODEL, timeout=60, daemon=daemon)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield Web(auth=auth_stack, daemon=daemon, browser=browser, shots=shots)
            finally:
                browser.close()
    finally:
        daemon.stop()


def test_landing_docs_and_status_pages(web: Web) -> None:
    page = web.page()
    page.goto(web.base + "/")
    assert page.get_by_role("link", name="Sign up with GitHub").get_attribute("href") == "/auth/github/start"
    text = page.inner_text("main")
    assert "plaintext on provider hardware" in text
    assert "no hardware attestation" in text
    assert "provider-reported" in text
    assert WEB_MODEL in page.inner_text("#pool")
    web.check(page, "home")

    # /docs: the deployment's base URL in every quickstart, and the same routes and errors as the app's own facts.
    page.goto(web.base + "/docs")
    code = page.locator("#quickstart pre").all_inner_texts()
    assert len(code) == 4
    assert all(f"{web.auth.public_url}/v1" in c for c in code), code
    listed = {tuple(row.split("\t")[:2]) for row in page.locator("#routes tbody tr").all_inner_texts()}
    document = httpx.get(f"{web.base}/openapi/openapi.json", timeout=10).json()
    documented = {(m.upper(), p) for p, item in document["paths"].items() for m in item if m != "options"}
    assert documented
    assert documented == listed, documented ^ listed
    codes = {row.split("\t")[1] for row in page.locator("#error-codes tbody tr").all_inner_texts()}
    assert {"quota_exhausted", "invalid_api_key", "coordinator_unavailable", "invalid_demo_token"} <= codes
    assert codes == {c.code for c in _api_errors(ApiError)} | REQUEST_FAULTS
    row = page.locator("#routes tbody tr", has_text="/v1/usage").inner_text()
    assert "Bearer mp_" in row
    web.check(page, "docs")

    # Signed out, the account page says so and offers sign-in.
    page.goto(web.base + "/account")
    assert page.get_by_role("link", name="Sign in with GitHub").get_attribute("href") == "/auth/github/start"
    web.check(page)

    # /status on a phone's screen: nothing wider than the screen.
    phone = web.browser.new_page(viewport={"width": 375, "height": 740})
    phone.goto(web.base + "/status")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 375
    phone.close()
    page.goto(web.base + "/status")
    assert WEB_MODEL in page.inner_text("#pool-models")
    web.check(page, "status")


def _api_errors(cls: type[ApiError]) -> Iterator[type[ApiError]]:
    for sub in cls.__subclasses__():
        if sub.code is not None:
            yield sub
        yield from _api_errors(sub)


def test_sign_up_see_the_key_once_then_revoke_it(web: Web) -> None:
    page = web.page()
    web.auth.github.sign_in(User(id=915_001, login="web-octocat"))
    page.goto(web.base + "/auth/github/start")
    key = page.locator("#new-key").inner_text().strip()
    assert key.startswith("mp_")
    assert len(key) == 39
    web.auth.secrets_seen.append(key)
    assert "you will not see it again" in page.inner_text("main").lower()
    prefix = page.locator(".warn code").inner_text().removesuffix("…")
    assert key.startswith(prefix)
    assert len(prefix) < len(key) - 20
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=web.base)
    page.get_by_role("button", name="Copy").click()
    page.wait_for_function("() => document.getElementById('new-key-status').textContent === 'Copied.'")
    assert page.evaluate("navigator.clipboard.readText()") == key
    web.check(page)  # no screenshot: it shows a key

    # Reloading the one-shot page does not show the key again.
    page.reload()
    assert key not in page.content()
    assert page.url.endswith("/account")
    assert prefix in page.inner_text("main")
    web.check(page, "account")
    # The key works: a request, rated; /v1/usage and the account page both show it, with its rating.
    bearer = {"Authorization": f"Bearer {key}"}
    body = {"model": WEB_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    answer = httpx.post(f"{web.base}/v1/chat/completions", json=body, headers=bearer, timeout=30)
    assert answer.status_code == 200, answer.text
    rated = httpx.post(f"{web.base}/v1/feedback", json={"request_id": answer.json()["id"], "rating": 4}, headers=bearer)
    assert rated.status_code == 200, rated.text
    usage = httpx.get(f"{web.base}/v1/usage", headers=bearer, timeout=10).json()
    assert usage["ratings"]["distribution"]["4"] == 1
    page.reload()
    recent = page.locator("table", has_text="Your most recent requests").inner_text()
    assert WEB_MODEL in recent
    assert "4/5" in recent
    assert "1 in all" in page.locator("svg.chart title").first.text_content()
    web.check(page, "account")
    with page.expect_navigation() as revoked:
        page.get_by_role("button", name="Revoke").first.click()
    assert revoked.value.status == 200, page.content()
    assert page.url == web.base + "/account"
    assert "revoked" in page.inner_text("main")
    refused = httpx.get(f"{web.base}/v1/usage", headers=bearer, timeout=10)
    assert refused.status_code == 401, refused.text
    # The owner's other pages share the look and the rules.
    for path in ("/device", "/provider"):
        page.goto(web.base + path)
        assert "web-octocat" in page.inner_text("main") or "no Macs" in page.inner_text("main"), path
        web.check(page)


def _demo_ready(page: Any) -> None:
    page.wait_for_function(
        f"() => [...document.querySelectorAll('#demo-model option')].some(o => o.value === '{WEB_MODEL}')"
    )
    page.select_option("#demo-model", WEB_MODEL)


def test_demo_streams_stops_and_rates(web: Web) -> None:
    page = web.page()
    with page.expect_response(lambda r: r.url.endswith("/auth/demo")) as issued:
        page.goto(web.base + "/demo")
    token = issued.value.json()["token"]
    _demo_ready(page)
    # Every appended text node is timed, to see tokens arrive one by one rather than in one piece.
    page.evaluate(
        """() => { window.__arrivals = [];
        new MutationObserver(() => window.__arrivals.push(performance.now()))
          .observe(document.getElementById("demo-log"), {childList: true, subtree: true}); }"""
    )
    page.fill("#demo-prompt", "Tell me about foxes.")
    page.keyboard.press("Enter")  # Enter sends (the keyboard alone drives the demo)
    answer = page.locator("#demo-log li.assistant").last
    page.wait_for_function("() => Number(document.querySelector('#demo-log li.assistant')?.dataset.chunks || 0) >= 10")
    # The keyboard alone: from the message box, Tab reaches Stop (Send is disabled while answering).
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "demo-stop"
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#demo-log li.assistant').dataset.state === 'stopped'")
    request_id = answer.get_attribute("data-request-id").removeprefix("chatcmpl-")
    arrivals = page.evaluate("window.__arrivals")
    assert len(arrivals) >= 10, arrivals
    assert arrivals[-1] - arrivals[2] > 100, arrivals  # spread over time (ms), not one burst
    # The daemon stopped generating: its request ended cancelled, far short of the 512 tokens asked for.
    done = logs.wait_event(web.daemon.log_path, "request_done", request_id=request_id)
    assert done["finish"] == "cancelled", done
    assert int(done["completion_tokens"]) < 200, done
    # Thumbs up: the rating lands in feedback, on that request.
    page.get_by_role("button", name="Good answer").click()
    page.wait_for_function("() => document.querySelector('.rate-status').textContent.includes('recorded')")
    rows = _sql(web.auth.stack.database_url, "SELECT rating FROM feedback WHERE request_id = $1", request_id)
    assert [r["rating"] for r in rows] == [5]
    # And in the demo token's own /v1/usage: its requests and that rating, nobody else's.
    usage = httpx.get(f"{web.base}/v1/usage", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert usage.status_code == 200, usage.text
    report = usage.json()
    assert (report["account_id"], report["key"]) == (None, None)
    assert "d" + report["demo_token"]["id"] == _token_subject(token)
    assert report["ratings"]["count"] == 1
    assert report["ratings"]["distribution"]["5"] == 1
    assert sum(day["requests"] for day in report["by_model"]) >= 1
    web.check(page, "demo")


def _token_subject(token: str) -> str:
    payload = token.removeprefix("mpd_").split(".")[0]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"d{claims['jti']}"


def test_demo_says_when_the_quota_is_used_up(web: Web) -> None:
    page = web.page()
    with page.expect_response(lambda r: r.url.endswith("/auth/demo")) as issued:
        page.goto(web.base + "/demo")
    subject = _token_subject(issued.value.json()["token"])
    _demo_ready(page)
    # This demo token has spent its day's requests (as after 20 answers).
    _sql(
        web.auth.stack.database_url,
        """INSERT INTO quota_usage (subject, window_day, requests) VALUES ($1, (now() AT TIME ZONE 'UTC')::date, 1000)
           ON CONFLICT (subject) DO UPDATE SET requests = 1000 RETURNING subject""",
        subject,
    )
    page.fill("#demo-prompt", "One more?")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => document.querySelector('#demo-log li.assistant').dataset.state === 'failed'")
    assert "used up its quota" in page.inner_text("#demo-notice")


def test_demo_renews_an_expired_token_and_says_so(web: Web) -> None:
    # The `short` replica's demo tokens live 1 s. The page's clock is held, so its renewal timer never fires
    # (a laptop asleep): the token the page holds expires, the gateway refuses it, the page gets another.
    page = web.page()
    now = datetime.datetime.now()
    page.clock.install(time=now)
    page.clock.pause_at(now + datetime.timedelta(seconds=1))  # no timer fires from here on
    page.goto(web.auth.short + "/demo")
    _demo_ready(page)
    time.sleep(2.1)  # the token's expiry is whole seconds
    with page.expect_response(lambda r: r.url.endswith("/auth/demo")) as renewed:
        page.fill("#demo-prompt", "Still there?")
        page.get_by_role("button", name="Send").click()
    assert renewed.value.status == 201
    page.wait_for_function("() => Number(document.querySelector('#demo-log li.assistant')?.dataset.chunks || 0) >= 3")
    page.get_by_role("button", name="Stop").click()
    page.wait_for_function("() => document.querySelector('#demo-log li.assistant').dataset.state === 'stopped'")
    assert "demo token had expired" in page.inner_text("#demo-notice")
    page.clock.resume()  # axe waits on timers
    web.check(page, failed_on_purpose="/v1/chat/completions")


def test_status_follows_a_daemon_leaving_and_the_demo_says_no_provider(web: Web) -> None:
    status = web.page()
    status.goto(web.base + "/status")
    assert WEB_MODEL in status.inner_text("#pool-models")
    status.evaluate("window.__same_page = true")
    demo = web.page()
    demo.goto(web.base + "/demo")
    _demo_ready(demo)

    web.daemon.stop()
    started = time.monotonic()
    status.wait_for_function(
        f"() => !document.querySelector('#pool-models').innerText.includes('{WEB_MODEL}')", timeout=15_000
    )
    print(f"/status dropped the daemon {time.monotonic() - started:.1f} s after it stopped")
    assert status.evaluate("window.__same_page") is True  # updated in place, not reloaded

    # The picker still offers the model it last saw; asking for it now gets a plain explanation.
    demo.fill("#demo-prompt", "Anyone there?")
    demo.get_by_role("button", name="Send").click()
    demo.wait_for_function("() => document.querySelector('#demo-log li.assistant').dataset.state === 'failed'")
    assert "No provider is serving this model right now" in demo.inner_text("#demo-notice")
    web.check(demo, failed_on_purpose="/v1/chat/completions")
