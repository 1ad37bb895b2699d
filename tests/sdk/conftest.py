"""Conformance with the official SDKs: fixtures shared by the OpenAI (Python, Node) and Anthropic modules.

Plain text comes from the tiny random model; tool calls from the scripted
model (tests/support/script_model.py), served by a daemon of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest

from infra.components import Child
from tests.support.daemons import daemon_in_pool
from tests.support.script_model import SCRIPT_MODEL, write_script_model
from tests.support.stack import Stack


@pytest.fixture(scope="session")
def script_daemon(stack: Stack) -> Iterator[Child]:
    folder = write_script_model(stack.model_path, stack.home / "models" / SCRIPT_MODEL)
    with daemon_in_pool(stack, provider_id="script-mac", model_id=SCRIPT_MODEL, model_path=folder) as daemon:
        yield daemon


@pytest.fixture(scope="session")
def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.v1, api_key=stack.api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def async_oai(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.v1, api_key=stack.api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def claude(stack: Stack) -> anthropic.Anthropic:
    # The SDK appends /v1/messages to the base URL itself.
    return anthropic.Anthropic(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=60)
