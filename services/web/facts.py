"""What /docs says, taken from the running app: its routes (as the OpenAPI document has them, with
each route's declared authentication) and its error codes (from the one error map, services/errors.py).

Nothing here is a second list to keep in step: a route or an error added to the app shows up here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from litestar import Litestar
from litestar.enums import HttpMethod
from litestar.routes import HTTPRoute

from schemas import codes
from services.auth.declared import Auth, declared
from services.errors import ApiError
from services.settings import Settings

AUTH_LABELS = {
    Auth.PUBLIC: "none (public)",
    Auth.API_KEY: "API key: Authorization: Bearer mp_…",
    Auth.API_KEY_OR_DEMO: "API key or demo token (Bearer mp_… or mpd_…)",
    Auth.ANTHROPIC_KEY: "API key: x-api-key or Authorization: Bearer",
    Auth.SESSION: "browser session (after GitHub sign-in)",
    Auth.SESSION_PAGE: "browser session (page; signed out it says so)",
    Auth.PROVIDER_OWNER: "the Mac's owner (session or API key) or the Mac's own mpp_ token",
    Auth.GITHUB_STATE: "the sign-in's state cookie",
    Auth.METRICS: "the scraper's metrics token",
}
_METHODS = ("GET", "POST", "DELETE", "PUT", "PATCH")


@dataclass(frozen=True)
class RouteFact:
    method: str
    path: str
    auth: str
    summary: str
    statuses: list[str]


@dataclass(frozen=True)
class ErrorFact:
    code: str
    status: int
    type: str
    meaning: str


@functools.lru_cache(maxsize=1)
def api_routes(settings: Settings) -> tuple[RouteFact, ...]:
    """`routes` of the app with every service mounted (built, never started), once per process.

    What the API is, whichever services this replica runs: in a split deployment the replica
    serving /docs runs the status service alone, and the buyer reads about all of them.
    """
    from services.app import create_app  # services.app mounts this module's pages

    return tuple(routes(create_app(settings)))


def routes(app: Litestar) -> list[RouteFact]:
    """Every route the OpenAPI document lists, in its order, with the authentication the guard enforces."""
    doc: dict[str, Any] = app.openapi_schema.to_schema()
    kinds: dict[tuple[str, str], Auth | None] = {}
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            for handler in route.route_handlers:
                for verb in handler.http_methods:
                    kinds[(verb.value if isinstance(verb, HttpMethod) else verb, route.path_format)] = declared(handler)
    facts = []
    for path, item in doc.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method.lower())
            if operation is None:
                continue
            kind = kinds.get((method, path))
            summary = (operation.get("description") or operation.get("summary") or "").strip().split("\n")[0]
            facts.append(
                RouteFact(
                    method=method,
                    path=path,
                    auth=AUTH_LABELS.get(kind, "closed") if kind else "closed",
                    summary=summary,
                    statuses=sorted(operation.get("responses", {})),
                )
            )
    return facts


def _subclasses(cls: type[ApiError]) -> Iterator[type[ApiError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def errors() -> list[ErrorFact]:
    """One row per error code the control plane answers, from the exception classes that raise it."""
    seen: dict[str, ErrorFact] = {}
    for cls in _subclasses(ApiError):
        if cls.code is None or cls.code in seen:
            continue
        doc = cls.__doc__ if "__doc__" in vars(cls) else None
        meaning = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ") if doc else ""
        seen[cls.code] = ErrorFact(code=cls.code, status=cls.status, type=cls.type, meaning=meaning)
    # Refusals a provider reports about the request itself reach the buyer as 400s with the provider's code.
    for code in sorted(codes.REQUEST_FAULTS - set(seen)):
        seen[code] = ErrorFact(
            code=code, status=400, type="invalid_request_error", meaning="The provider cannot run this request as sent."
        )
    return sorted(seen.values(), key=lambda e: (e.status, e.code))


def quickstarts(base_url: str, model: str) -> dict[str, str]:
    """The four quickstarts with this deployment's base URL and a model the pool serves now."""
    v1 = f"{base_url}/v1"
    return {
        "curl": (
            f"curl {v1}/chat/completions \\\n"
            '  -H "Authorization: Bearer $MP_API_KEY" \\\n'
            '  -H "Content-Type: application/json" \\\n'
            f'  -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\''
        ),
        "Python": (
            "# pip install openai\n"
            "import os\n"
            "from openai import OpenAI\n\n"
            f'client = OpenAI(base_url="{v1}", api_key=os.environ["MP_API_KEY"])\n'
            "stream = client.chat.completions.create(\n"
            f'    model="{model}",\n'
            '    messages=[{"role": "user", "content": "Hello!"}],\n'
            "    stream=True,\n"
            ")\n"
            "for chunk in stream:\n"
            '    print(chunk.choices[0].delta.content or "", end="", flush=True)'
        ),
        "Node": (
            "// npm install openai\n"
            'import OpenAI from "openai";\n\n'
            f'const client = new OpenAI({{ baseURL: "{v1}", apiKey: process.env.MP_API_KEY }});\n'
            "const answer = await client.chat.completions.create({\n"
            f'  model: "{model}",\n'
            '  messages: [{ role: "user", content: "Hello!" }],\n'
            "});\n"
            "console.log(answer.choices[0].message.content);"
        ),
        "Go": (
            "// go get github.com/openai/openai-go\n"
            "package main\n\n"
            "import (\n"
            '\t"context"\n\t"fmt"\n\t"os"\n\n'
            '\t"github.com/openai/openai-go"\n\t"github.com/openai/openai-go/option"\n)\n\n'
            "func main() {\n"
            "\tclient := openai.NewClient(\n"
            f'\t\toption.WithBaseURL("{v1}/"),\n'
            '\t\toption.WithAPIKey(os.Getenv("MP_API_KEY")),\n'
            "\t)\n"
            "\tanswer, err := client.Chat.Completions.New(context.TODO(), openai.ChatCompletionNewParams{\n"
            f'\t\tModel:    "{model}",\n'
            '\t\tMessages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Hello!")},\n'
            "\t})\n"
            "\tif err != nil {\n\t\tpanic(err)\n\t}\n"
            "\tfmt.Println(answer.Choices[0].Message.Content)\n"
            "}"
        ),
    }
