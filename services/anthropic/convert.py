"""An Anthropic Messages request as the bus request.

`tool_use` / `tool_result` blocks become the chat template's tool calls and tool
turns; a field with no bus meaning is a 400 naming it.
"""

from __future__ import annotations

import json
from typing import Any

from schemas import anthropic, bus
from schemas.openai_bus import function_tool, named_tool_choice
from services.errors import InvalidRequest

# Anthropic's client tools have no type (or "custom"); typed ones are server tools we do not run.
_CLIENT_TOOL_TYPES = (None, "custom")


def _user_turn(blocks: list[anthropic.InputBlock], at: str) -> list[bus.BusMessage]:
    out: list[bus.BusMessage] = []
    text: list[str] = []
    for i, block in enumerate(blocks):
        if isinstance(block, anthropic.ToolResultBlock):
            content = block.text()
            out.append(
                bus.BusMessage(
                    role="tool",
                    content=f"Error: {content}" if block.is_error else content,
                    tool_call_id=block.tool_use_id,
                )
            )
        elif isinstance(block, anthropic.TextBlock):
            text.append(block.text)
        elif isinstance(block, anthropic.ToolUseBlock):
            raise InvalidRequest(
                f"Invalid value for '{at}[{i}].type': tool_use blocks belong in assistant turns.",
                param=f"{at}[{i}].type",
            )
    if text:
        out.append(bus.BusMessage(role="user", content="".join(text)))
    return out


def _assistant_turn(blocks: list[anthropic.InputBlock], at: str) -> bus.BusMessage:
    text: list[str] = []
    calls: list[bus.ToolCall] = []
    for i, block in enumerate(blocks):
        if isinstance(block, anthropic.TextBlock):
            text.append(block.text)
        elif isinstance(block, anthropic.ToolUseBlock):
            calls.append(
                bus.ToolCall(id=block.id, name=block.name, arguments=json.dumps(block.input, ensure_ascii=False))
            )
        elif isinstance(block, anthropic.ToolResultBlock):
            raise InvalidRequest(
                f"Invalid value for '{at}[{i}].type': tool_result blocks belong in user turns.", param=f"{at}[{i}].type"
            )
        # Thinking blocks are dropped: these models do not read earlier reasoning.
    return bus.BusMessage(role="assistant", content="".join(text), tool_calls=calls or None)


def bus_messages(req: anthropic.MessagesRequest) -> list[bus.BusMessage]:
    out: list[bus.BusMessage] = []
    system = req.system_text()
    if system:
        out.append(bus.BusMessage(role="system", content=system))
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append(bus.BusMessage(role=m.role, content=m.content))
        elif m.role == "assistant":
            out.append(_assistant_turn(m.content, f"messages[{i}].content"))
        else:
            out.extend(_user_turn(m.content, f"messages[{i}].content"))
    return out


def _tools(req: anthropic.MessagesRequest) -> list[dict[str, Any]]:
    tools = []
    for i, tool in enumerate(req.tools or []):
        if tool.type not in _CLIENT_TOOL_TYPES:
            continue  # a server tool (web search, code execution...): not offered here, dropped as seed 002 says
        if tool.input_schema is None:
            raise InvalidRequest(
                f"Invalid value for 'tools[{i}].input_schema': a client tool needs an input_schema.",
                param=f"tools[{i}].input_schema",
            )
        tools.append(function_tool(tool.name, tool.description, tool.input_schema))
    return tools


def _tool_choice(choice: anthropic.ToolChoice | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, anthropic.ToolChoiceAuto):
        return "auto"
    if isinstance(choice, anthropic.ToolChoiceAny):
        return "required"
    if isinstance(choice, anthropic.ToolChoiceNone):
        return "none"
    return named_tool_choice(choice.name)


def bus_request(req: anthropic.MessagesRequest) -> bus.InferenceRequest:
    tools = _tools(req)
    return bus.InferenceRequest(
        request_id="",
        model=req.model,
        messages=bus_messages(req),
        params=bus.SamplingParams(
            max_tokens=req.max_tokens,
            max_tokens_explicit=True,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            stop=list(req.stop_sequences or []),
        ),
        tools=tools or None,
        tool_choice=_tool_choice(req.tool_choice) if tools else None,
        # Thinking turned off turns the model's thinking channel off; a budget cannot be held to.
        reasoning_effort="none" if req.thinking is not None and req.thinking.type == "disabled" else None,
    )
