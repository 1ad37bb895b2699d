"""A Responses request (plus any stored conversation it continues) to the bus request."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas import bus, responses
from schemas.openai_bus import function_tool, named_tool_choice
from services.errors import InvalidRequest
from services.responses.store import Stored

_SYSTEM_ROLES = ("system", "developer")


def _invalid(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid value for '{param}': {message}", param=param)


def new_items(req: responses.CreateResponse) -> list[responses.InputItem]:
    if req.input is None:
        if req.previous_response_id is None:
            raise _invalid("input", "send input (a string or a list of items), or a previous_response_id.")
        return []
    if isinstance(req.input, str):
        return [responses.InputItem(role="user", content=req.input)]
    return list(req.input)


def conversation(
    req: responses.CreateResponse, previous: Stored | None
) -> tuple[str | None, list[responses.InputItem]]:
    """Instructions and the whole input: a stored response's input and output come first.

    Instructions carry forward from the stored response when this request has none (seed 002).
    """
    items = new_items(req)
    if previous is None:
        return req.instructions, items
    # Earlier reasoning is left out, as the chat templates leave it out of earlier turns.
    earlier = [_as_input(item) for item in previous.response.output if not isinstance(item, responses.ReasoningItem)]
    instructions = req.instructions if req.instructions is not None else previous.response.instructions
    return instructions, [*previous.input, *earlier, *items]


def _as_input(item: responses.OutputMessage | responses.FunctionCall) -> responses.InputItem:
    if isinstance(item, responses.FunctionCall):
        return responses.InputItem(
            type="function_call", call_id=item.call_id, name=item.name, arguments=item.arguments, id=item.id
        )
    parts: list[responses.ContentPart] = [responses.OutputTextPart(text=p.text) for p in item.content]
    return responses.InputItem(role="assistant", content=parts, id=item.id)


def bus_messages(instructions: str | None, items: list[responses.InputItem]) -> list[bus.BusMessage]:
    """Instructions and system/developer items merge into one leading system message (templates want one)."""
    system = [instructions] if instructions else []
    turns: list[bus.BusMessage] = []
    for i, item in enumerate(items):
        at = f"input[{i}]"
        if item.type == "reasoning":
            continue  # these models do not read earlier reasoning
        if item.type == "message":
            if item.role is None:
                raise _invalid(f"{at}.role", "a message needs a role (user, assistant, system or developer).")
            text = responses.part_text(item.content)
            if item.role in _SYSTEM_ROLES:
                system.append(text)
            else:
                turns.append(bus.BusMessage(role=item.role, content=text))
        elif item.type == "function_call":
            if item.call_id is None or item.name is None:
                raise _invalid(f"{at}.call_id", "a function_call item needs call_id and name.")
            call = bus.ToolCall(id=item.call_id, name=item.name, arguments=item.arguments or "{}")
            last = turns[-1] if turns else None
            if last is not None and last.role == "assistant":
                # Calls right after an assistant turn (or after each other) belong to that turn.
                turns[-1] = msgspec.structs.replace(last, tool_calls=[*(last.tool_calls or []), call])
            else:
                turns.append(bus.BusMessage(role="assistant", content="", tool_calls=[call]))
        else:
            if item.call_id is None:
                raise _invalid(f"{at}.call_id", "a function_call_output item needs the call_id it answers.")
            turns.append(
                bus.BusMessage(role="tool", content=responses.part_text(item.output), tool_call_id=item.call_id)
            )
    if not turns:
        raise _invalid("input", "the conversation has no user, assistant or tool turn to answer.")
    head = [bus.BusMessage(role="system", content="\n\n".join(system))] if system else []
    return [*head, *turns]


def function_tools(raw: list[dict[str, Any]] | None) -> list[responses.FunctionTool]:
    """Function tools, each checked; built-in tools (web search, ...) are not served here and are dropped."""
    tools = []
    for i, tool in enumerate(raw or []):
        if tool.get("type") != "function":
            continue
        try:
            tools.append(msgspec.convert(tool, responses.FunctionTool))
        except msgspec.ValidationError as exc:
            raise _invalid(f"tools[{i}]", f"{exc}.") from None
    return tools


def _tool_choice(choice: responses.ToolChoice | None) -> str | dict[str, Any] | None:
    if isinstance(choice, responses.FunctionToolChoice):
        return named_tool_choice(choice.name)
    return choice


def text_format(req: responses.CreateResponse) -> bus.ResponseFormat | None:
    """`text.format` JSON formats, constrained by the daemon as chat's response_format is."""
    fmt = req.text.format if req.text is not None else None
    if isinstance(fmt, responses.JsonObjectFormat):
        return bus.ResponseFormat(type="json_object")
    if isinstance(fmt, responses.JsonSchemaFormat):
        return bus.ResponseFormat(type="json_schema", schema=fmt.schema)
    return None


def surface_param(param: str | None) -> str | None:
    """Daemons name chat's `response_format...` in their refusals; here the buyer wrote `text.format...`."""
    if param is None or not param.startswith("response_format"):
        return param
    return "text.format" + param.removeprefix("response_format").removeprefix(".json_schema")


def bus_request(
    req: responses.CreateResponse,
    messages: list[bus.BusMessage],
    tools: list[responses.FunctionTool],
    default_max_tokens: int,
) -> bus.InferenceRequest:
    limit = req.max_output_tokens
    offered = [function_tool(t.name, t.description, t.parameters) for t in tools]
    return bus.InferenceRequest(
        request_id="",
        model=req.model,
        messages=messages,
        params=bus.SamplingParams(
            max_tokens=limit or default_max_tokens,
            max_tokens_explicit=limit is not None,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            response_format=text_format(req),
        ),
        tools=offered or None,
        tool_choice=_tool_choice(req.tool_choice) if offered else None,
        reasoning_effort=req.reasoning.effort if req.reasoning is not None else None,
    )
