"""Wire types of the OpenAI chat surface, as buyers' SDKs send and expect them.

Request structs ignore unknown fields (SDKs add new ones all the time) but
validate the ones we act on, so a bad value is refused with the field named.
Sizes are bounded by schemas/limits.py (per field here, the rest in `__post_init__`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from schemas import limits
from schemas.limits import Int64, ModelId, Name, StopText, Text

Role = Literal["system", "developer", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "error", "tool_calls", "content_filter"]

MAX_STOP_SEQUENCES = limits.MAX_STOP_SEQUENCES
MAX_TOKENS_CEILING = 32_768


class TextPart(msgspec.Struct, frozen=True):
    type: Literal["text"]
    text: Text


class FunctionCall(msgspec.Struct, frozen=True):
    name: Name
    # JSON text of the arguments (OpenAI sends a string).
    arguments: Text = "{}"


class ToolCall(msgspec.Struct, frozen=True):
    id: Name
    function: FunctionCall
    type: Literal["function"] = "function"


class FunctionTool(msgspec.Struct, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, frozen=True):
    type: Literal["function"]
    function: FunctionTool


class NamedFunction(msgspec.Struct, frozen=True):
    name: Name


class NamedToolChoice(msgspec.Struct, frozen=True):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatMessage(msgspec.Struct, frozen=True):
    role: Role
    content: Text | Annotated[list[TextPart], Meta(max_length=limits.MAX_CONTENT_PARTS)] | None = None
    name: Name | None = None
    tool_call_id: Name | None = None
    # An assistant turn that called tools (the tool round trip sends it back).
    tool_calls: Annotated[list[ToolCall], Meta(max_length=limits.MAX_TOOL_CALLS)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class TextFormat(msgspec.Struct, frozen=True, tag_field="type", tag="text"):
    pass


class JsonObjectFormat(msgspec.Struct, frozen=True, tag_field="type", tag="json_object"):
    pass


class JsonSchemaSpec(msgspec.Struct, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    description: Text | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class JsonSchemaFormat(msgspec.Struct, frozen=True, tag_field="type", tag="json_schema"):
    json_schema: JsonSchemaSpec


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat

# OpenAI's bounds: up to 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[
    dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]], Meta(max_length=16)
]


Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
MaxTokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS_CEILING)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
TopK = limits.Count
MinP = Annotated[float, Meta(ge=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=10.0)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
LogitBias = Annotated[dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]], Meta(max_length=limits.MAX_LOGIT_BIAS)]
Stop = StopText | Annotated[list[StopText], Meta(max_length=MAX_STOP_SEQUENCES)]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]


class ChatCompletionRequest(msgspec.Struct, frozen=True):
    model: ModelId
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=limits.MAX_MESSAGES)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=1)] | None = None
    seed: Int64 | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    # Beyond OpenAI's set, as mlx-lm servers accept them (0 / None: off).
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    logit_bias: LogitBias | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: Annotated[list[Tool], Meta(max_length=limits.MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    # Only the variables chat templates read to select their behaviour (schemas/limits.py).
    chat_template_kwargs: limits.ChatTemplateKwargs | None = None  # type: ignore[valid-type]
    reasoning_effort: ReasoningEffort | None = None
    response_format: ResponseFormat | None = None
    metadata: Metadata | None = None
    parallel_tool_calls: bool | None = None

    def __post_init__(self) -> None:
        texts: list[str | None] = []
        for m in self.messages:
            texts.append(m.text())
            texts.extend((m.name, m.tool_call_id))
            for call in m.tool_calls or ():
                texts.extend((call.id, call.function.name, call.function.arguments))
        limits.check_conversation(texts, param="messages")
        limits.check_tools(
            (f"tools[{i}]", t, f"tools[{i}].function.parameters", t.function.parameters)
            for i, t in enumerate(self.tools or ())
        )
        fmt = self.response_format
        if isinstance(fmt, JsonSchemaFormat) and fmt.json_schema.schema is not None:
            limits.check_schema(fmt.json_schema.schema, param="response_format.json_schema.schema")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_limit(self) -> int | None:
        # `max_completion_tokens` is the newer name and wins when both are sent.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class PromptTokensDetails(msgspec.Struct, frozen=True):
    cached_tokens: int = 0


class CompletionTokensDetails(msgspec.Struct, frozen=True):
    # Tokens the model spent thinking (counted in completion_tokens too).
    reasoning_tokens: int = 0


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = msgspec.field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = msgspec.field(default_factory=CompletionTokensDetails)


class TopLogprob(msgspec.Struct, frozen=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(msgspec.Struct, frozen=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class ChoiceLogprobs(msgspec.Struct, frozen=True):
    content: list[TokenLogprob] | None = None


class AssistantMessage(msgspec.Struct, frozen=True):
    content: str | None
    role: Literal["assistant"] = "assistant"
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    # A thinking model's reasoning, apart from `content` (DeepSeek's field); absent otherwise.
    reasoning_content: str | msgspec.UnsetType = msgspec.UNSET


class Choice(msgspec.Struct, frozen=True):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(msgspec.Struct, frozen=True):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None


class ToolCallDelta(msgspec.Struct, frozen=True):
    index: int
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class Delta(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    reasoning_content: str | None = None


class ChunkChoice(msgspec.Struct, frozen=True):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChunkError(msgspec.Struct, frozen=True):
    """An in-band error on a stream that had already started (HTTP 200 sent)."""

    message: str
    type: str
    code: str | None = None


class ChatCompletionChunk(msgspec.Struct, frozen=True, omit_defaults=True):
    # No default for `object`: omit_defaults would drop it, and SDKs read it.
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    error: ChunkError | None = None


class Model(msgspec.Struct, frozen=True):
    id: str
    created: int
    owned_by: str
    object: Literal["model"] = "model"


class ModelList(msgspec.Struct, frozen=True):
    data: list[Model]
    object: Literal["list"] = "list"


# ---- legacy text completions (POST /v1/completions) -------------------------------------


class CompletionRequest(msgspec.Struct, frozen=True):
    model: ModelId
    prompt: Text
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=1)] | None = None
    seed: Int64 | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    logit_bias: LogitBias | None = None
    # Legacy completions take a count of alternatives here, not a boolean.
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    # The prompt repeated before the completion.
    echo: bool = False
    # Fill-in-the-middle text after the completion; not offered (refused unless empty).
    suffix: Text | None = None
    best_of: Annotated[int, Meta(ge=1, le=1)] | None = None

    def __post_init__(self) -> None:
        limits.check_conversation([self.prompt, self.suffix], param="prompt")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionLogprobs(msgspec.Struct, frozen=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, frozen=True):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(msgspec.Struct, frozen=True, omit_defaults=True):
    # No default for `object`: omit_defaults would drop it, and SDKs read it.
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    # Only on a stream's last chunk when generation failed after it began.
    error: ChunkError | None = None
