"""HTTP routes: thin handlers; the work is in server.serving and the objects on app.state."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.body import JSONRoute
from server.errors import APIError, bad_request
from server.preprocess import chat_prompt_ids
from server.protocol import (
    BucketsResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    LengthCounts,
    ModelCard,
    ModelList,
    PaddingRatios,
    PrefillTiming,
    ReadyResponse,
    RetrievedPassage,
    RetrieveRequest,
    RetrieveResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(route_class=JSONRoute)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Invalid request (the message names the parameter or the limit)",
        401: "Missing or wrong API key",
        404: "Unknown model (or, on /v1/retrieve, no index loaded)",
        413: "Request body too large",
        415: "The body was not sent as application/json",
        429: "Queue full (see Retry-After)",
        500: "The engine failed while generating this response",
        503: "Model loading or engine unavailable (see Retry-After)",
    }.items()
}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=ERRORS, tags=["openai"])  # the SSE form: server.openapi
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    return await request.app.state.serving.chat(body, request)


@router.post("/v1/completions", response_model=CompletionResponse,
             responses=ERRORS, tags=["openai"])
async def completions(body: CompletionRequest, request: Request) -> Any:
    return await request.app.state.serving.completions(body, request)


@router.get("/v1/models", response_model=ModelList, tags=["openai"])
async def models(request: Request) -> ModelList:
    serving = request.app.state.serving
    info = serving.engine.info
    retriever = request.app.state.rag.info()
    return ModelList(data=[ModelCard(
        id=serving.model_name, root=info.name if info else None,
        max_model_len=info.max_model_len if info else None, engine=serving.engine.name,
        retriever=retriever)])


@router.post("/v1/retrieve", response_model=RetrieveResponse, responses=ERRORS, tags=["ragserve"])
async def retrieve(body: RetrieveRequest, request: Request) -> RetrieveResponse:
    """The passages the retriever finds for `query`, best first (`mode`: hybrid, late
    interaction or lexical; default the index's)."""
    rag = request.app.state.rag
    if body.model is not None:
        request.app.state.serving.check_model(body.model)
    hits = await rag.search(body.query, body.k, body.mode)
    return RetrieveResponse(model=rag.index.encoder.name, data=[
        RetrievedPassage(chunk_id=p.chunk_id, doc_id=p.doc_id, text=p.text, score=p.score,
                         scores=p.scores,
                         source=p.source, page=p.page, start=p.start, end=p.end) for p in hits])


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS, tags=["vllm"])
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    serving = request.app.state.serving
    info = serving.admit(body.model)
    if body.messages is not None:
        chat = ChatCompletionRequest.model_construct(  # messages are validated already
            messages=body.messages, add_generation_prompt=body.add_generation_prompt,
            chat_template=None)
        ids = chat_prompt_ids(info.tokenizer, chat, serving.chat_template)
    else:
        ids = info.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=info.max_model_len, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS, tags=["vllm"])
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    info = request.app.state.serving.admit(body.model)
    bad = [t for t in body.tokens if not 0 <= t < info.vocab_size]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary "
                          f"(0..{info.vocab_size - 1})", "tokens")
    return DetokenizeResponse(prompt=info.tokenizer.decode(body.tokens))


@router.get("/health", tags=["ops"], response_class=Response,
            responses={200: {"description": "Alive (an empty body, as vLLM's)", "content": {}}})
async def health() -> Response:
    """Alive (the process answers); says nothing about the model: see /ready."""
    return Response(status_code=200)


def _ready(request: Request) -> JSONResponse:
    engine = request.app.state.serving.engine
    rag = request.app.state.rag
    body = ReadyResponse(status=engine.state.value, engine=engine.name,
                         load_seconds=engine.load_seconds, error=engine.error,
                         retriever=rag.info())
    if engine.ready and rag.enabled and rag.state != "ready":
        body.status = "loading" if rag.state == "loading" else "failed"
        body.error = rag.error
    elif engine.ready and engine.info is not None:
        info = engine.info
        body.model = request.app.state.serving.model_name
        body.context_encoding_buckets = list(info.context_encoding_buckets) or None
        body.token_generation_buckets = list(info.token_generation_buckets) or None
        return JSONResponse(body.model_dump(exclude_none=True))
    loading = body.status == "loading"
    if engine.state.value == "loading" and engine.load_status is not None:  # Neuron graphs
        body.status = "compiling" if engine.load_status == "compiling" else "loading"
        body.phase = engine.load_status
        body.progress = round(engine.load_progress or 0.0, 3)
    headers = {"Retry-After": "5"} if loading else {}
    return JSONResponse(body.model_dump(exclude_none=True), status_code=503, headers=headers)


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            tags=["ops"])
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and every bucket graph is warmed; 503 before."""
    return _ready(request)


@router.get("/ping", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            tags=["sagemaker"])
async def ping(request: Request) -> JSONResponse:
    """SageMaker's health check: the same as /ready."""
    return _ready(request)


@router.post("/invocations", response_model=ChatCompletionResponse | CompletionResponse,
             responses=ERRORS, tags=["sagemaker"])  # its request body: server.openapi
async def invocations(request: Request) -> Any:
    """SageMaker's inference route: a chat body (with `messages`) or a completions body."""
    from pydantic import ValidationError

    try:
        payload = await request.json()
    except ValueError as e:  # server.body.BodyError: says why
        raise bad_request(f"the body is not valid JSON: {getattr(e, 'msg', e)}") from None
    if not isinstance(payload, dict) or not ({"messages", "prompt"} & payload.keys()):
        raise bad_request("expected a chat completions body (with `messages`) or a "
                          "completions body (with `prompt`)")
    serving = request.app.state.serving
    try:
        if "messages" in payload:
            return await serving.chat(ChatCompletionRequest.model_validate(payload), request)
        return await serving.completions(CompletionRequest.model_validate(payload), request)
    except ValidationError as e:
        raise APIError(400, *validation_message(e.errors())) from None


@router.get("/v1/buckets", response_model=BucketsResponse, tags=["ragserve"])
async def buckets(request: Request) -> BucketsResponse:
    """The current bucket lists, their padding on the lengths served so far, a uniform sample
    of those lengths and the mean time of one-prompt prefills per bucket (for `ragserve buckets
    plan --from URL`)."""
    from bucketing.planner import padding_ratio

    serving = request.app.state.serving
    info = serving.engine.info
    ce = list(info.context_encoding_buckets) if info is not None else []
    tg = list(info.token_generation_buckets) if info is not None else []
    sample = serving.lengths.to_json()
    prompts, contexts = sample["prompt_lengths"], sample["context_lengths"]

    def ratio(lengths: list[int], lists: list[int]) -> float | None:
        fit = [n for n in lengths if lists and n <= lists[-1]]
        return round(padding_ratio(fit, lists), 4) if fit else None

    return BucketsResponse(
        context_encoding_buckets=ce or None, token_generation_buckets=tg or None,
        max_model_len=info.max_model_len if info is not None else None,
        sample_size=LengthCounts(prompt=len(prompts), context=len(contexts)),
        seen=LengthCounts(**sample["seen"]),
        padding_ratio=PaddingRatios(context_encoding=ratio(prompts, ce),
                                    token_generation=ratio(contexts, tg)),
        prompt_lengths=prompts, context_lengths=contexts, device=request.app.state.config.device,
        prefill_seconds_by_bucket={b: PrefillTiming(**t) for b, t in
                                   serving.engine.prefill_times.to_json().items()})


@router.get("/metrics", response_class=PlainTextResponse, tags=["ops"])
async def metrics(request: Request) -> Response:
    """The server's series and the engine's (each name registered once: see server.metrics)."""
    text = request.app.state.metrics.render() + request.app.state.engine.metrics_text()
    return Response(text, media_type=CONTENT_TYPE_LATEST)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The first pydantic error as an OpenAI-style message and its parameter name."""
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = loc[-1] if loc else None
    if e.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {'.'.join(loc)}", param
    where = ".".join(loc) or "body"
    return f"{where}: {e.get('msg', 'invalid value')}", param
