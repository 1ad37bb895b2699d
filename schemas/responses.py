"""Wire types of OpenAI's Responses API (`/v1/responses`), as its SDKs send and expect them.

Input items are one flat struct (a message may come without `type`, as the
SDKs' "easy" messages do); which fields an item needs is checked by the
gateway per type, naming the field. Built-in tools (web search, file search,
...) are not served and are dropped, so `tools` is decoded loosely and each
function tool is checked on its own. Sizes are bounded by schemas/limits.py
(per field here, the rest in `__post_init__`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from schemas import limits
from schemas.limits import Count, Int64, ModelId, Name, Text
from schemas.openai import MAX_TOKENS_CEILING, Metadata, ReasoningEffort

Status = Literal["completed", "incomplete", "in_progress", "failed"]
MAX_ID_LENGTH = 128

# ---- request -----------------------------------------------------------------------


class InputText(msgspec.Struct, frozen=True, tag_field="type", tag="input_text"):
    text: Text


class OutputTextPart(msgspec.Struct, frozen=True, tag_field="type", tag="output_text"):
    """Assistant text sent back as input (earlier output items)."""

    text: Text


class ReasoningText(msgspec.Struct, frozen=True, tag_field="type", tag="reasoning_text"):
    """A reasoning item's text: in output, and sent back in input (dropped: these models do not read it)."""

    text: Text


ContentPart = InputText | OutputTextPart | ReasoningText


def part_text(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content if not isinstance(p, ReasoningText))


class InputItem(msgspec.Struct, frozen=True):
    """A message, a function call the model made, a tool's output, or (dropped) reasoning."""

    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: Text | Annotated[list[ContentPart], Meta(max_length=limits.MAX_CONTENT_PARTS)] | None = None
    call_id: Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)] | None = None
    name: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    arguments: Text | None = None
    output: Text | Annotated[list[ContentPart], Meta(max_length=limits.MAX_CONTENT_PARTS)] | None = None
    id: Name | None = None

    def texts(self) -> list[str | None]:
        return [part_text(self.content), self.call_id, self.name, self.arguments, part_text(self.output)]


class FunctionTool(msgspec.Struct, frozen=True):
    type: Literal["function"]
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolChoice(msgspec.Struct, frozen=True):
    type: Literal["function"]
    name: Annotated[str, Meta(min_length=1, max_length=64)]


ToolChoice = Literal["none", "auto", "required"] | FunctionToolChoice


class TextFormat(msgspec.Struct, frozen=True, tag_field="type", tag="text"):
    pass


class JsonObjectFormat(msgspec.Struct, frozen=True, tag_field="type", tag="json_object"):
    pass


class JsonSchemaFormat(msgspec.Struct, frozen=True, tag_field="type", tag="json_schema"):
    name: Annotated[str, Meta(max_length=64)] = ""
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, frozen=True):
    format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None = None


class Reasoning(msgspec.Struct, frozen=True):
    effort: ReasoningEffort | None = None


class CreateResponse(msgspec.Struct, frozen=True):
    model: ModelId
    input: Text | Annotated[list[InputItem], Meta(max_length=limits.MAX_MESSAGES)] | None = None
    instructions: Text | None = None
    previous_response_id: Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)] | None = None
    max_output_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_CEILING)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Count | None = None
    seed: Int64 | None = None
    tools: Annotated[list[dict[str, Any]], Meta(max_length=limits.MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool = True
    metadata: Metadata | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    truncation: Literal["auto", "disabled"] | None = None

    def __post_init__(self) -> None:
        texts: list[str | None] = [self.instructions]
        if isinstance(self.input, str):
            texts.append(self.input)
        else:
            for item in self.input or ():
                texts.extend(item.texts())
        limits.check_conversation(texts, param="input")
        # Built-in tools are dropped later, but they were sent: every entry is bounded.
        limits.check_tools((f"tools[{i}]", t, f"tools[{i}]", t) for i, t in enumerate(self.tools or ()))
        fmt = self.text.format if self.text is not None else None
        if isinstance(fmt, JsonSchemaFormat) and fmt.schema is not None:
            limits.check_schema(fmt.schema, param="text.format.schema")


# ---- response ----------------------------------------------------------------------


class OutputText(msgspec.Struct, frozen=True, tag_field="type", tag="output_text"):
    text: str
    annotations: list[dict[str, Any]] = msgspec.field(default_factory=list)
    logprobs: list[dict[str, Any]] = msgspec.field(default_factory=list)


class OutputMessage(msgspec.Struct, frozen=True, tag_field="type", tag="message"):
    id: str
    content: list[OutputText]
    status: Status = "completed"
    role: Literal["assistant"] = "assistant"


class FunctionCall(msgspec.Struct, frozen=True, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: Status = "completed"


class SummaryText(msgspec.Struct, frozen=True, tag_field="type", tag="summary_text"):
    text: str


class ReasoningItem(msgspec.Struct, frozen=True, tag_field="type", tag="reasoning"):
    """A thinking model's reasoning, as written (`content`); there is no summary of it (`summary` is empty)."""

    id: str
    summary: list[SummaryText]
    content: list[ReasoningText]
    status: Status = "completed"


OutputItem = OutputMessage | FunctionCall | ReasoningItem


class InputTokensDetails(msgspec.Struct, frozen=True):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct, frozen=True):
    reasoning_tokens: int = 0


class Usage(msgspec.Struct, frozen=True):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


class IncompleteDetails(msgspec.Struct, frozen=True):
    reason: Literal["max_output_tokens"]


class ResponseError(msgspec.Struct, frozen=True):
    code: str
    message: str


class TextFormatOut(msgspec.Struct, frozen=True):
    # The request's text.format, repeated (JSON formats constrain the output text).
    format: TextFormat | JsonObjectFormat | JsonSchemaFormat = msgspec.field(default_factory=TextFormat)


class Response(msgspec.Struct, frozen=True):
    id: str
    created_at: int
    model: str
    status: Status
    output: list[OutputItem]
    tools: list[FunctionTool]
    tool_choice: ToolChoice
    object: Literal["response"] = "response"
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = True
    store: bool = True
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    text: TextFormatOut = msgspec.field(default_factory=TextFormatOut)
    truncation: Literal["auto", "disabled"] = "disabled"
    user: str | None = None
    usage: Usage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: ResponseError | None = None


class Deleted(msgspec.Struct, frozen=True):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


# ---- stream events (`event: <type>` + `data: <this>`), numbered by sequence_number -------


class ResponseEvent(msgspec.Struct, frozen=True, tag_field="type"):
    """An event carrying the whole response: created, in_progress, completed, incomplete, failed."""

    sequence_number: int
    response: Response


class Created(ResponseEvent, frozen=True, tag="response.created"):
    pass


class InProgress(ResponseEvent, frozen=True, tag="response.in_progress"):
    pass


class Completed(ResponseEvent, frozen=True, tag="response.completed"):
    pass


class Incomplete(ResponseEvent, frozen=True, tag="response.incomplete"):
    pass


class Failed(ResponseEvent, frozen=True, tag="response.failed"):
    pass


class ItemAdded(msgspec.Struct, frozen=True, tag_field="type", tag="response.output_item.added"):
    sequence_number: int
    output_index: int
    item: OutputItem


class ItemDone(msgspec.Struct, frozen=True, tag_field="type", tag="response.output_item.done"):
    sequence_number: int
    output_index: int
    item: OutputItem


class PartAdded(msgspec.Struct, frozen=True, tag_field="type", tag="response.content_part.added"):
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText


class PartDone(msgspec.Struct, frozen=True, tag_field="type", tag="response.content_part.done"):
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText


class TextDelta(msgspec.Struct, frozen=True, tag_field="type", tag="response.output_text.delta"):
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[dict[str, Any]] = msgspec.field(default_factory=list)


class TextDone(msgspec.Struct, frozen=True, tag_field="type", tag="response.output_text.done"):
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[dict[str, Any]] = msgspec.field(default_factory=list)


class ReasoningTextDelta(msgspec.Struct, frozen=True, tag_field="type", tag="response.reasoning_text.delta"):
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningTextDone(msgspec.Struct, frozen=True, tag_field="type", tag="response.reasoning_text.done"):
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str


class ArgumentsDelta(msgspec.Struct, frozen=True, tag_field="type", tag="response.function_call_arguments.delta"):
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDone(msgspec.Struct, frozen=True, tag_field="type", tag="response.function_call_arguments.done"):
    sequence_number: int
    item_id: str
    output_index: int
    arguments: str
    name: str


class Error(msgspec.Struct, frozen=True, tag_field="type", tag="error"):
    sequence_number: int
    message: str
    code: str | None = None
    param: str | None = None
