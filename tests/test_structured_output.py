"""response_format json_object / json_schema: decoding constrained by llguidance in the worker.

The tiny model has random weights and otherwise writes garbage, so valid JSON
from it shows the constraint at work, not the model's manners.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.conftest import TINY_MODEL, Stack
from tests.support.daemons import sse_payloads, stream_text
from tests.support.schema_check import errors

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "admin": {"type": "boolean"},
        "pets": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "kind": {"enum": ["cat", "dog"]},
                    "legs": {"type": "integer", "minimum": 0, "maximum": 8},
                },
                "required": ["kind", "legs"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "age", "mood", "admin", "pets"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def _schema_format(schema: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, **extra}}


async def _chat(client: httpx.AsyncClient, stack: Stack, **body: Any) -> dict[str, Any]:
    payload = {"model": TINY_MODEL, "messages": ASK, "max_tokens": 300, **body}
    r = await client.post(f"{stack.v1}/chat/completions", json=payload, headers=stack.auth())
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _content(answer: dict[str, Any]) -> tuple[str, str]:
    choice = answer["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


async def test_json_object_is_always_a_json_object(stack: Stack) -> None:
    # Free strings from random weights can run long: these seeds close theirs within a few hundred tokens.
    async with httpx.AsyncClient(timeout=120) as client:
        answers = await asyncio.gather(
            _chat(client, stack, response_format={"type": "json_object"}, temperature=0, max_tokens=1500),
            *(
                _chat(client, stack, response_format={"type": "json_object"}, temperature=1.0, seed=s, max_tokens=1500)
                for s in (0, 2, 4, 5)
            ),
        )
    for answer in answers:
        text, finish = _content(answer)
        assert finish == "stop", text
        assert isinstance(json.loads(text), dict), text


async def test_json_schema_output_validates_against_the_schema(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        answers = await asyncio.gather(
            *(
                _chat(client, stack, response_format=_schema_format(PERSON, strict=True), temperature=1.0, seed=s)
                for s in range(4)
            )
        )
    for answer in answers:
        text, finish = _content(answer)
        assert finish == "stop", text
        value = json.loads(text)
        assert errors(value, PERSON) == [], text
