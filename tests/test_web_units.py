"""The website's pieces on their own: templates escape what providers choose, /docs' facts cover the whole API,
the quickstarts carry the deployment's URL, /static serves only its own files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from schemas.codes import REQUEST_FAULTS
from services.app import SERVICES
from services.auth.declared import Auth
from services.errors import exception_handler
from services.settings import Settings
from services.status.routes import DISCLOSURES, Capacity, ModelStatus, PoolStatus
from services.web import facts
from services.web.render import render
from services.web.routes import _PLAIN_MODEL
from services.web.static import static_file

# Pure: no server, no process, no network (`just test -m unit`).
pytestmark = pytest.mark.unit

HOSTILE = "<script>alert(1)</script>"


def _status(model: str) -> PoolStatus:
    return PoolStatus(
        status="available",
        models=[ModelStatus(id=model, providers=1, slots=4, slots_free=4, queue_depth=0)],
        capacity=Capacity(providers=1, slots=4, slots_free=4, queue_depth=0, decode_tokens_per_s=1.0),
        disclosures=DISCLOSURES,
    )


@pytest.mark.parametrize("template", ["home.html", "status.html"])
def test_a_provider_chosen_model_name_is_text_not_markup(template: str) -> None:
    page = render(template, title="t", status=_status(HOSTILE), disclosures=DISCLOSURES)
    assert HOSTILE not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert '<script src="/static/status.js" defer></script>' in page  # ours, from our origin only
    assert "<style" not in page
    assert "onclick=" not in page


def test_a_shell_hostile_model_name_never_reaches_a_quickstart() -> None:
    assert _PLAIN_MODEL.match("SmolLM2-135M-Instruct")
    assert _PLAIN_MODEL.match("mlx-community/Qwen2.5-0.5B-Instruct-4bit")
    for hostile in ("x'; rm -rf ~; '", "a$(id)", "a`id`", 'a"b', "a\\b", "a b"):
        assert not _PLAIN_MODEL.match(hostile), hostile


def test_every_quickstart_carries_the_base_url_and_the_model() -> None:
    quick = facts.quickstarts("https://api.example.com", "tiny-llama")
    assert set(quick) == {"curl", "Python", "Node", "Go"}
    for name, code in quick.items():
        assert "https://api.example.com/v1" in code, name
        assert "tiny-llama" in code, name
        assert "MP_API_KEY" in code, name  # the key comes from the environment, never pasted in


def test_docs_cover_every_route_of_every_service_with_its_auth(tmp_path: Path) -> None:
    settings = Settings.from_env({**os.environ, "MP_HOME": str(tmp_path), "MP_SECRET_KEY": "k" * 64})
    routes = facts.api_routes(settings)
    listed = {(r.method, r.path) for r in routes}
    for handlers in SERVICES.values():
        for handler in handlers:
            for path in handler.paths:  # type: ignore[union-attr]
                for method in handler.http_methods - {"OPTIONS", "HEAD"}:  # type: ignore[union-attr]
                    plain = path.replace(":int}", "}").replace(":str}", "}")
                    assert (method, plain) in listed, (method, plain)
    assert all(r.auth != "closed" for r in routes)
    assert {r.auth for r in routes if r.path == "/v1/usage"} == {facts.AUTH_LABELS[Auth.API_KEY_OR_DEMO]}
    assert {r.auth for r in routes if r.path == "/v1/completions"} == {facts.AUTH_LABELS[Auth.API_KEY]}
    codes = {e.code for e in facts.errors()}
    assert codes >= REQUEST_FAULTS
    assert all(e.meaning for e in facts.errors()), [e.code for e in facts.errors() if not e.meaning]


def test_static_serves_its_own_files_only() -> None:
    app = Litestar(route_handlers=[static_file], exception_handlers={Exception: exception_handler})
    with TestClient(app) as client:
        css = client.get("/static/site.css")
        assert css.status_code == 200
        assert css.headers["content-type"].startswith("text/css")
        assert css.headers["x-content-type-options"] == "nosniff"
        assert client.get("/static/demo.js").headers["content-type"].startswith("text/javascript")
        for name in ("nothing.js", "..%2Fapp.py", "%2E%2E", "routes.py", "__init__.py"):
            assert client.get(f"/static/{name}").status_code == 404, name
