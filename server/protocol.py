"""OpenAI API request and response schemas (the subset ragserve serves, plus vLLM's extras).

Requests forbid unknown fields: a field ragserve does not understand is a 400 that names it,
never silently ignored. Their types are strict (JSON's: no coercion of `false` to 0 or of 0 to
`false`), as the OpenAPI document says. Fields OpenAI defines that ragserve cannot honour
(``suffix``, ``best_of``, ...) are accepted by the schema and rejected with a 400 by
:mod:`server.preprocess`, so the message says what is not supported rather than "unknown".
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    # strict types too: `false` is not the token id 0, `0` is not `false`, 1.5 is not "1.5"
    model_config = ConfigDict(extra="forbid", strict=True)


class Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


# -- errors ------------------------------------------------------------------------------

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- requests ----------------------------------------------------------------------------

class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class MessageFunctionCall(Open):
    name: str
    arguments: str = Field(description="JSON text of the arguments object")


class MessageToolCall(Open):
    """A call in an assistant message of the history (what the server sent back)."""

    id: str
    type: Literal["function"] = "function"
    function: MessageFunctionCall


class ChatMessage(Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this result answers


class JSONSchemaFormat(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ResponseFormat(Strict):
    """OpenAI's ``response_format``: text, any JSON object, or JSON that matches a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsOptions(Strict):
    """vLLM's ``structured_outputs``: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class SamplingFields(Strict):
    """Sampling fields shared by chat and completions (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured outputs: OpenAI's field, vLLM's, and vLLM's older aliases (server.structured)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsOptions | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


RetrievalMode = Literal["hybrid", "late_interaction", "lexical"]
RETRIEVAL_MODE_DOC = ("hybrid: late interaction and BM25 fused by reciprocal rank; "
                      "late_interaction: ColBERT MaxSim only; lexical: BM25 only "
                      "(default: the index's mode, see `ragserve index info`)")


class RAGOptions(Strict):
    """ragserve extension: answer from retrieved passages, with ``[n]`` citations."""

    top_k: int | None = Field(default=None, ge=1, le=50,
                              description="passages to retrieve (default: --rag-top-k)")
    grounding: Literal["report", "strip", "off"] | None = Field(
        default=None, description="report unsupported sentences, strip them, or skip the "
                                  "check (default: --grounding)")
    max_context_tokens: int | None = Field(default=None, ge=1,
                                           description="cap on prompt tokens spent on passages")
    retrieval: RetrievalMode | None = Field(default=None, description=RETRIEVAL_MODE_DOC)
    vector_store_id: str | None = Field(
        default=None, description="the vector store to search (default: the server's --index)")
    citations: Literal["auto", "model", "attribute"] | None = Field(
        default=None, description="auto: keep the model's citations and cite its uncited "
        "sentences by attribution; model: only what the model wrote; attribute: only "
        "attribution (default: --rag-citations)")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    rag: RAGOptions | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template: str | None = None
    add_generation_prompt: bool = True


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


# -- responses ---------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # OpenAI's shape (vLLM sends it with --enable-prompt-tokens-details): prompt tokens whose
    # KV was reused, not computed
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="JSON text of the arguments object")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A streamed piece of a call: the first has ``id``, ``type`` and the name, the rest
    fragments of ``arguments`` (concatenated by ``index``)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="null when the answer is only tool calls")
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class RetrieverInfo(BaseModel):
    status: str
    index: str
    encoder: str | None = None
    label: str | None = Field(default=None, description="e.g. 'not ColBERT-trained'")
    backend: str | None = None
    retrieval: str | None = Field(default=None, description="the index's default mode")
    passages: int | None = None
    documents: int | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "ragserve"
    root: str | None = None
    max_model_len: int | None = None
    engine: str | None = Field(default=None, description="ragserve or vllm")
    retriever: RetrieverInfo | None = None


class RetrieveRequest(Strict):
    model: str | None = None
    query: str = Field(min_length=1, max_length=8192)
    k: int = Field(default=5, ge=1, le=100)
    mode: RetrievalMode | None = Field(default=None, description=RETRIEVAL_MODE_DOC)


class RetrievedPassage(BaseModel):
    chunk_id: int
    doc_id: str
    text: str
    score: float = Field(description="the mode's score: fused reciprocal rank (hybrid), "
                                     "MaxSim (late_interaction) or BM25 (lexical)")
    scores: dict[str, float] | None = Field(
        default=None, description="hybrid: each retriever's own score, for those that found "
                                  "the passage among their candidates")
    source: str
    page: int | None
    start: int
    end: int


class RetrieveResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[RetrievedPassage]


class Source(BaseModel):
    number: int = Field(description="what `[n]` in the answer refers to")
    chunk_id: int
    doc_id: str
    source: str
    page: int | None
    score: float
    text: str


class SentenceGrounding(BaseModel):
    text: str
    citations: list[int] = Field(description="all of the sentence's citations")
    attributed: list[int] = Field(description="those ragserve added; the rest the model wrote")
    support: float | None
    supported: bool | None


class Grounding(BaseModel):
    mode: str
    citations: str = Field(description="the citation policy: auto, model or attribute")
    threshold: float
    attributed: int = Field(description="citations ragserve added to the answer")
    invalid_citations: list[int] = Field(description="removed: they point to no passage")
    unsupported: int = Field(description="cited sentences their passages do not support")
    removed_sentences: int
    sentences: list[SentenceGrounding]


class RAGChatCompletionResponse(ChatCompletionResponse):
    sources: list[Source]
    grounding: Grounding | None


class RAGChatCompletionChunk(ChatCompletionChunk):
    """A RAG answer's stream event: ``sources`` in the first, ``grounding`` in its own event
    after the finish (each sent only in its event)."""

    sources: list[Source] | None = None
    grounding: Grounding | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ReadyResponse(BaseModel):
    status: str
    engine: str | None = Field(default=None, description="ragserve or vllm")
    model: str | None = None
    load_seconds: float | None = None
    error: str | None = None
    context_encoding_buckets: list[int] | None = None
    token_generation_buckets: list[int] | None = None
    retriever: RetrieverInfo | None = None
    phase: str | None = Field(default=None, description="while loading: e.g. compiling")
    progress: float | None = Field(default=None, description="while loading: 0..1")


class LengthCounts(BaseModel):
    prompt: int = Field(description="prompt lengths (what a context-encoding bucket holds)")
    context: int = Field(description="decode context lengths: prompt + generated tokens at "
                                     "the request's end (what a token-generation bucket holds)")


class PaddingRatios(BaseModel):
    context_encoding: float | None = Field(
        description="padded / real prompt tokens with the current list on the sample; null "
                    "without buckets or without a sample")
    token_generation: float | None = Field(
        description="the same for decode context lengths and token_generation_buckets")


class PrefillTiming(BaseModel):
    count: int = Field(description="prefill steps of one prompt (no decode rows) in this bucket")
    mean_tokens: float = Field(description="tokens each computed, on average: the bucket length "
                                           "in a static graph, the prompt length where prefill "
                                           "runs exact shapes")
    mean_s: float = Field(description="their mean step time in seconds")


class BucketsResponse(BaseModel):
    """The current bucket lists, a uniform sample of the lengths this server has served and the
    time of its prefill steps per bucket (what `ragserve buckets plan --from URL` reads)."""

    context_encoding_buckets: list[int] | None = Field(
        description="null when the engine has no bucket graphs (vLLM's) or is loading")
    token_generation_buckets: list[int] | None
    max_model_len: int | None = None
    sample_size: LengthCounts = Field(description="lengths kept in the sample (at most "
                                                  "10,000 each)")
    seen: LengthCounts = Field(description="lengths observed since the server started")
    padding_ratio: PaddingRatios
    prompt_lengths: list[int]
    context_lengths: list[int]
    device: str | None = Field(default=None, description="cpu, cuda or neuron (--device)")
    prefill_seconds_by_bucket: dict[str, PrefillTiming] = Field(
        default_factory=dict,
        description="by prefill bucket length: steps that prefilled one prompt alone, with "
                    "their mean computed tokens and seconds (for the prefill cost model; empty "
                    "with vLLM's engine)")
