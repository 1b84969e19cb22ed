"""OpenAI's Responses API (``POST /v1/responses``): request and response models, checked against
the openai SDK's types (``openai.types.responses``) so that ``client.responses.create``,
``.stream`` and ``.parse`` read what the server sends (the vector stores' models:
:mod:`server.protocol_vector_stores`).

Requests are strict as :mod:`server.protocol`'s: an unknown field is a 400 naming it. Fields
OpenAI defines that ragserve cannot honour are accepted by the schema and refused with a 400
that says so (:data:`UNSUPPORTED`), never silently ignored.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from server.protocol import Grounding, Strict

# -- request: input items --------------------------------------------------------------------


class InputText(Strict):
    type: Literal["input_text"]
    text: str


class OutputTextPart(Strict):
    """An assistant message's text sent back as input (what an earlier response returned)."""

    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None


class RefusalPart(Strict):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[InputText | OutputTextPart | RefusalPart, Field(discriminator="type")]


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str = Field(description="JSON text of the arguments object")
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[InputText]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FileSearchCallInput(Strict):
    """A ``file_search_call`` item a client sends back (``input += response.output``): kept
    out of the prompt, since the message after it already holds what the search found."""

    type: Literal["file_search_call"]
    id: str
    queries: list[str] = Field(default_factory=list)
    status: Literal["in_progress", "searching", "completed", "incomplete", "failed"]
    results: list[dict[str, Any]] | None = None


INPUT_TYPES = ("message", "function_call", "function_call_output", "file_search_call")


def _item_type(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[FileSearchCallInput, Tag("file_search_call")],
    Discriminator(_item_type),
]
_ITEMS = TypeAdapter(list[InputItem])


def _first_error(e: ValidationError, where: str) -> str:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    path = where + "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc
                           if x not in INPUT_TYPES and x not in TOOL_TYPES)
    if err.get("type") == "extra_forbidden":
        return f"{path}: unrecognized field"
    return f"{path}: {err.get('msg', 'invalid value')}"


# -- request: tools and text -----------------------------------------------------------------


class FunctionToolSpec(Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class RankingOptions(Strict):
    ranker: str | None = None
    score_threshold: float | None = Field(default=None, ge=0, le=1)
    hybrid_search: dict[str, Any] | None = None


class FileSearchToolSpec(Strict):
    type: Literal["file_search"]
    vector_store_ids: list[str] = Field(min_length=1)
    max_num_results: int | None = Field(default=None, ge=1, le=50)
    filters: dict[str, Any] | None = Field(
        default=None, description="a comparison or compound filter on the files' attributes")
    ranking_options: RankingOptions | None = Field(
        default=None, description="score_threshold only (ranker: 'auto' or 'none'; "
                                  "hybrid_search: a 400, the index's retrieval mode decides)")


TOOL_TYPES = ("function", "file_search")
ToolSpec = Annotated[FunctionToolSpec | FileSearchToolSpec, Field(discriminator="type")]
_TOOLS = TypeAdapter(list[ToolSpec])


class FormatText(Strict):
    type: Literal["text"]


class FormatJSONObject(Strict):
    type: Literal["json_object"]


class FormatJSONSchema(Strict):
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


TextFormat = Annotated[FormatText | FormatJSONObject | FormatJSONSchema,
                       Field(discriminator="type")]


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(
        default=None, description="not supported: a 400 when given")


class StreamOptions(Strict):
    include_obfuscation: bool = Field(
        default=False, description="accepted; ragserve never pads its events")


#: OpenAI's fields that ragserve refuses (a 400 naming the field) unless null
UNSUPPORTED = ("access_programs", "background_options", "context_management", "conversation",
               "image", "max_tool_calls", "moderation", "prompt", "prompt_cache_options",
               "prompt_cache_retention", "reasoning", "top_logprobs")
INCLUDABLE = ("file_search_call.results",)


class ResponsesRequest(Strict):
    model: str | None = None
    input: str | list[InputItem] = Field(
        description="a user message's text, or a list of items: messages (role user, system, "
                    "developer or assistant), function_call and function_call_output items")
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    text: TextConfig | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    previous_response_id: str | None = None
    include: list[str] | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    truncation: Literal["auto", "disabled"] | None = Field(
        default=None, description="disabled only: a prompt that does not fit is a 400")
    background: bool | None = Field(default=None, description="false only")
    service_tier: str | None = Field(default=None, description="auto or default only")
    # ragserve's extension (as on chat completions)
    seed: int | None = None
    # OpenAI's fields ragserve cannot honour (UNSUPPORTED): a 400 unless null
    access_programs: Any = None
    background_options: Any = None
    context_management: Any = None
    conversation: Any = None
    image: Any = None
    max_tool_calls: Any = None
    moderation: Any = None
    prompt: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning: Any = None
    top_logprobs: Any = None

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, value: Any) -> Any:
        """Items validated one by one, so that the message names the item and its field."""
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("input must be a string or a list of items")
        for i, item in enumerate(value):
            kind = _item_type(item)
            if kind not in INPUT_TYPES:
                raise ValueError(f"input[{i}]: item type {kind!r} is not supported "
                                 f"(supported: {', '.join(INPUT_TYPES)})")
        try:
            return _ITEMS.validate_python(value)
        except ValidationError as e:
            raise ValueError(_first_error(e, "input")) from None

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        for i, tool in enumerate(value):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind not in TOOL_TYPES:
                raise ValueError(f"tools[{i}]: tool type {kind!r} is not supported "
                                 f"(supported: {', '.join(TOOL_TYPES)})")
        try:
            return _TOOLS.validate_python(value)
        except ValidationError as e:
            raise ValueError(_first_error(e, "tools")) from None


# -- response --------------------------------------------------------------------------------


class FileCitation(BaseModel):
    type: Literal["file_citation"] = "file_citation"
    file_id: str
    filename: str
    index: int = Field(description="the character offset in `text` where the citation "
                                   "marker was (the end of the cited sentence's words)")


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[FileCitation] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallOutput(BaseModel):
    """A call the model made (an output item; a client answers it with a
    ``function_call_output`` input item)."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class FileSearchResult(BaseModel):
    file_id: str
    filename: str
    score: float
    text: str
    attributes: dict[str, str | float | bool] = Field(default_factory=dict)


class FileSearchCall(BaseModel):
    type: Literal["file_search_call"] = "file_search_call"
    id: str
    status: Literal["in_progress", "searching", "completed", "incomplete", "failed"]
    queries: list[str]
    results: list[FileSearchResult] | None = Field(
        default=None, description='with include=["file_search_call.results"]')


OutputItem = Annotated[OutputMessage | FunctionCallOutput | FileSearchCall,
                       Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseErrorInfo(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: float = Field(default_factory=time.time)
    completed_at: float | None = None
    status: Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]
    error: ResponseErrorInfo | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    background: bool = False
    service_tier: str = "default"
    grounding: Grounding | None = Field(
        default=None, description="ragserve extension, with a file_search tool: the grounding "
                                  "report of the answer (its sentences keep their [n] markers, "
                                  "n counting the file_search_call's results from 1)")


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class ResponseStreamEvent(BaseModel):
    """One server-sent event of a streamed response: ``event: <type>`` and this as ``data``
    (the fields besides ``type`` and ``sequence_number`` depend on the type, as OpenAI's)."""

    model_config = ConfigDict(extra="allow")

    type: str
    sequence_number: int
