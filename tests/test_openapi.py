"""The OpenAPI document covers every route with real schemas, and the API keeps to it under
schemathesis (every check): small here, bigger with `just fuzz` (MP_FUZZ_EXAMPLES, MP_FUZZ_PHASES)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infra.components import wait_model
from services.app import SERVICES
from tests.support.accounts import make_account
from tests.support.stack import TINY_MODEL, Stack, replica_of

CONFIG = Path(__file__).parent / "openapi" / "schemathesis.toml"
EXAMPLES = os.environ.get("MP_FUZZ_EXAMPLES", "15")
PHASES = os.environ.get("MP_FUZZ_PHASES", "examples,fuzzing")


def _document(base: str) -> dict:
    r = httpx.get(f"{base}/openapi/openapi.json")
    assert r.status_code == 200
    return r.json()


def test_every_route_is_documented_with_real_schemas(stack: Stack) -> None:
    doc = _document(stack.base_url)
    assert doc["openapi"].startswith("3.")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    for handlers in SERVICES.values():
        for handler in handlers:
            for path in handler.paths:  # type: ignore[union-attr]
                plain = re.sub(r"\{(\w+):\w+\}", r"{\1}", path)
                for method in handler.http_methods:  # type: ignore[union-attr]
                    assert (plain, method.lower()) in documented, (plain, method)
    schemas = doc["components"]["schemas"]
    for (path, method), op in ((k, doc["paths"][k[0]][k[1]]) for k in documented):
        answers = op["responses"]
        assert any(code.startswith(("2", "3")) for code in answers), (path, method)
        for code, answer in answers.items():
            for media, content in (answer.get("content") or {}).items():
                assert content["schema"], (path, method, code, media)
        if "requestBody" in op:
            assert "$ref" in op["requestBody"]["content"]["application/json"]["schema"]
    # No dangling references, and the constraints the decoders enforce are stated.
    for ref in set(
        re.findall(r'"#/components/schemas/([^"]+)"', httpx.get(f"{stack.base_url}/openapi/openapi.json").text)
    ):
        assert ref in schemas, ref
    temperature = schemas["ChatCompletionRequest"]["properties"]["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0.0, 2.0)
    assert schemas["TextBlock"]["properties"]["type"] == {"enum": ["text"]}
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["responses"]["429"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorEnvelope"
    }
    messages = doc["paths"]["/v1/messages"]["post"]
    assert messages["responses"]["529"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }
    assert {"AnthropicApiKey": []} in messages["security"]
    # The browsable page points at /docs and the document, and loads nothing from elsewhere (offline deployments).
    page = httpx.get(f"{stack.base_url}/openapi")
    assert page.status_code == 200
    assert 'href="/docs"' in page.text
    assert 'href="/openapi/openapi.json"' in page.text
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', page.text), "nothing from another host"


@pytest.fixture(scope="module")
def fuzz_gateway(stack: Stack) -> Iterator[str]:
    """A replica of its own: it trusts one proxy hop, so the fuzzer's demo tokens count against a
    documentation address (not 127.0.0.1, which other tests use), and has GitHub sign-in configured."""
    env = {"MP_TRUSTED_PROXY_HOPS": "1", "MP_GITHUB_CLIENT_ID": "fuzz-client", "MP_GITHUB_CLIENT_SECRET": "fuzz-secret"}
    with replica_of(stack, "gateway-fuzz", env) as (_, base):
        wait_model(base, TINY_MODEL, timeout=30)
        yield base


@pytest.mark.timeout(3600)  # `just fuzz` runs far longer than the suite's per-test limit
def test_schemathesis_finds_nothing(stack: Stack, fuzz_gateway: str, tmp_path: Path) -> None:
    account = make_account(stack.database_url, requests_per_day=10**9, tokens_per_day=10**12, concurrent=64)
    report = tmp_path / "report"
    command = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(CONFIG),
        "run",
        f"{fuzz_gateway}/openapi/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        EXAMPLES,
        "--phases",
        PHASES,
        "--seed",
        os.environ.get("MP_FUZZ_SEED", "7"),
        "--request-timeout",
        "30",
        "--header",
        f"Authorization: Bearer {account.key}",
        "--header",
        "X-Forwarded-For: 198.51.100.7",
        "--report",
        "junit",
        "--report-dir",
        str(report),
    ]
    # Run where it may leave its own state (.schemathesis/), not in the repository.
    run = subprocess.run(command, capture_output=True, text=True, timeout=3000, check=False, cwd=tmp_path)
    summary = re.search(r"(\d+) generated, (.*)", run.stdout)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert summary is not None, run.stdout[-5000:]
    print(f"schemathesis ({PHASES}, max {EXAMPLES} examples): {summary.group(0)}")
    assert int(summary.group(1)) >= 100
