"""Wire types of Anthropic's Messages API (`POST /v1/messages`), as its SDKs send and expect them.

Requests ignore unknown fields (`cache_control`, `metadata`, betas) but
validate the ones we act on. Content blocks are tagged by `type`; kinds the
pool cannot serve (images, documents) are refused with the field named.
Sizes are bounded by schemas/limits.py (per field here, the rest in `__post_init__`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from schemas import limits
from schemas.limits import Count, ModelId, StopText, Text
from schemas.openai import MAX_TOKENS_CEILING

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "timeout_error",
    "overloaded_error",
]

MAX_STOP_SEQUENCES = limits.MAX_STOP_SEQUENCES_ANTHROPIC


# ---- request -----------------------------------------------------------------------


class TextBlock(msgspec.Struct, frozen=True, tag_field="type", tag="text"):
    text: Text


class ToolUseBlock(msgspec.Struct, frozen=True, tag_field="type", tag="tool_use"):
    id: Annotated[str, Meta(min_length=1, max_length=256)]
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    input: dict[str, Any]


class ToolResultBlock(msgspec.Struct, frozen=True, tag_field="type", tag="tool_result"):
    tool_use_id: Annotated[str, Meta(min_length=1, max_length=256)]
    content: Text | Annotated[list[TextBlock], Meta(max_length=limits.MAX_CONTENT_PARTS)] = ""
    is_error: bool = False

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class ThinkingBlock(msgspec.Struct, frozen=True, tag_field="type", tag="thinking"):
    """Earlier reasoning a client sends back; the models here do not take it as input (dropped)."""

    thinking: Text = ""
    signature: Text = ""


class RedactedThinkingBlock(msgspec.Struct, frozen=True, tag_field="type", tag="redacted_thinking"):
    data: Text = ""


InputBlock = TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock


class MessageParam(msgspec.Struct, frozen=True):
    role: Literal["user", "assistant"]
    content: Text | Annotated[list[InputBlock], Meta(max_length=limits.MAX_CONTENT_PARTS)]


class Tool(msgspec.Struct, frozen=True):
    """A client tool (`input_schema`), or a server tool (`type` such as web_search_20250305), which is dropped."""

    name: Annotated[str, Meta(min_length=1, max_length=128)]
    description: Text | None = None
    input_schema: dict[str, Any] | None = None
    type: Annotated[str, Meta(max_length=128)] | None = None


class ToolChoiceAuto(msgspec.Struct, frozen=True, tag_field="type", tag="auto"):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(msgspec.Struct, frozen=True, tag_field="type", tag="any"):
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(msgspec.Struct, frozen=True, tag_field="type", tag="tool"):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(msgspec.Struct, frozen=True, tag_field="type", tag="none"):
    pass


ToolChoice = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class Metadata(msgspec.Struct, frozen=True):
    user_id: Annotated[str, Meta(max_length=256)] | None = None


class ThinkingConfig(msgspec.Struct, frozen=True):
    """`{"type": "enabled", "budget_tokens": N}`, `{"type": "disabled"}` (or newer kinds, taken as enabled)."""

    type: Annotated[str, Meta(min_length=1, max_length=64)]
    budget_tokens: Count | None = None


class MessagesRequest(msgspec.Struct, frozen=True):
    model: ModelId
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_CEILING)]
    messages: Annotated[list[MessageParam], Meta(min_length=1, max_length=limits.MAX_MESSAGES)]
    system: Text | Annotated[list[TextBlock], Meta(max_length=limits.MAX_CONTENT_PARTS)] | None = None
    stop_sequences: Annotated[list[StopText], Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Count | None = None
    tools: Annotated[list[Tool], Meta(max_length=limits.MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    thinking: ThinkingConfig | None = None

    def __post_init__(self) -> None:
        texts: list[str | None] = [self.system_text()]
        for i, m in enumerate(self.messages):
            if isinstance(m.content, str):
                texts.append(m.content)
                continue
            for j, block in enumerate(m.content):
                if isinstance(block, TextBlock):
                    texts.append(block.text)
                elif isinstance(block, ToolResultBlock):
                    texts.extend((block.tool_use_id, block.text()))
                elif isinstance(block, ToolUseBlock):
                    # The input becomes JSON text in the prompt: bounded like a tool's schema.
                    param = f"messages[{i}].content[{j}].input"
                    limits.check_depth(block.input, param=param)
                    texts.extend((block.id, block.name, msgspec.json.encode(block.input).decode()))
        limits.check_conversation(texts, param="messages")
        limits.check_tools(
            (f"tools[{i}]", t, f"tools[{i}].input_schema", t.input_schema) for i, t in enumerate(self.tools or ())
        )

    def system_text(self) -> str:
        if self.system is None:
            return ""
        return self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)


# ---- response ----------------------------------------------------------------------


class Usage(msgspec.Struct, frozen=True):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class TextContent(msgspec.Struct, frozen=True, tag_field="type", tag="text"):
    text: str


class ToolUseContent(msgspec.Struct, frozen=True, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


class ThinkingContent(msgspec.Struct, frozen=True, tag_field="type", tag="thinking"):
    """A thinking model's reasoning. There is no signature to give (no one could verify one): empty."""

    thinking: str
    signature: str = ""


ContentBlock = TextContent | ToolUseContent | ThinkingContent


class Message(msgspec.Struct, frozen=True):
    id: str
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None
    usage: Usage
    stop_sequence: str | None = None
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"


# ---- stream events (`event: <type>` + `data: <this>`) ------------------------------


class MessageStart(msgspec.Struct, frozen=True, tag_field="type", tag="message_start"):
    message: Message


class ContentBlockStart(msgspec.Struct, frozen=True, tag_field="type", tag="content_block_start"):
    index: int
    content_block: ContentBlock


class TextDelta(msgspec.Struct, frozen=True, tag_field="type", tag="text_delta"):
    text: str


class InputJsonDelta(msgspec.Struct, frozen=True, tag_field="type", tag="input_json_delta"):
    partial_json: str


class ThinkingDelta(msgspec.Struct, frozen=True, tag_field="type", tag="thinking_delta"):
    thinking: str


class SignatureDelta(msgspec.Struct, frozen=True, tag_field="type", tag="signature_delta"):
    signature: str = ""


class ContentBlockDelta(msgspec.Struct, frozen=True, tag_field="type", tag="content_block_delta"):
    index: int
    delta: TextDelta | InputJsonDelta | ThinkingDelta | SignatureDelta


class ContentBlockStop(msgspec.Struct, frozen=True, tag_field="type", tag="content_block_stop"):
    index: int


class MessageDeltaBody(msgspec.Struct, frozen=True):
    stop_reason: StopReason | None
    stop_sequence: str | None = None


class DeltaUsage(msgspec.Struct, frozen=True):
    output_tokens: int
    input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class MessageDelta(msgspec.Struct, frozen=True, tag_field="type", tag="message_delta"):
    delta: MessageDeltaBody
    usage: DeltaUsage


class MessageStop(msgspec.Struct, frozen=True, tag_field="type", tag="message_stop"):
    pass


class Ping(msgspec.Struct, frozen=True, tag_field="type", tag="ping"):
    pass


# ---- errors ------------------------------------------------------------------------


class ErrorBody(msgspec.Struct, frozen=True):
    type: ErrorType
    message: str


class ErrorResponse(msgspec.Struct, frozen=True, tag_field="type", tag="error"):
    """`{"type": "error", "error": {"type", "message"}}`: the body of an error, and a stream's error event."""

    error: ErrorBody
