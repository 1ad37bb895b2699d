"""Wire types of Anthropic's Messages API (`POST /v1/messages`), as its SDKs send and expect them.

Requests ignore unknown fields (`cache_control`, `metadata`, betas) but
validate the ones we act on. Content blocks are tagged by `type`; kinds the
pool cannot serve (images, documents) are refused with the field named.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

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

MAX_STOP_SEQUENCES = 16


# ---- request -----------------------------------------------------------------------


class TextBlock(msgspec.Struct, frozen=True, tag_field="type", tag="text"):
    text: str


class ToolUseBlock(msgspec.Struct, frozen=True, tag_field="type", tag="tool_use"):
    id: Annotated[str, Meta(min_length=1, max_length=256)]
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    input: dict[str, Any]


class ToolResultBlock(msgspec.Struct, frozen=True, tag_field="type", tag="tool_result"):
    tool_use_id: Annotated[str, Meta(min_length=1, max_length=256)]
    content: str | list[TextBlock] = ""
    is_error: bool = False

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class ThinkingBlock(msgspec.Struct, frozen=True, tag_field="type", tag="thinking"):
    """Earlier reasoning a client sends back; the models here do not take it as input (dropped)."""

    thinking: str = ""
    signature: str = ""


class RedactedThinkingBlock(msgspec.Struct, frozen=True, tag_field="type", tag="redacted_thinking"):
    data: str = ""


InputBlock = TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock


class MessageParam(msgspec.Struct, frozen=True):
    role: Literal["user", "assistant"]
    content: str | list[InputBlock]


class Tool(msgspec.Struct, frozen=True):
    """A client tool (`input_schema`), or a server tool (`type` such as web_search_20250305), which is dropped."""

    name: Annotated[str, Meta(min_length=1, max_length=128)]
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


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
    budget_tokens: int | None = None


class MessagesRequest(msgspec.Struct, frozen=True):
    model: Annotated[str, Meta(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_CEILING)]
    messages: Annotated[list[MessageParam], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    stop_sequences: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=MAX_STOP_SEQUENCES)] | None = (
        None
    )
    stream: bool = False
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    thinking: ThinkingConfig | None = None

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
