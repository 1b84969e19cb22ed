"""HTTP routes: thin handlers over the serving objects on app.state (server.app builds them);
the OpenAPI document's corrections are server.openapi's."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from server.body import JSONRoute
from server.errors import api_error, bad_request
from server.protocol import (
    BucketsResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelList,
    ReadyResponse,
    RetrieveRequest,
    RetrieveResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from server.protocol_responses import (
    ResponseDeleted,
    ResponseObject,
    ResponsesRequest,
    VectorStore,
    VectorStoreList,
    VectorStoreSearchPage,
    VectorStoreSearchRequest,
)

router = APIRouter(route_class=JSONRoute)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Invalid request (the message names the parameter or the limit)",
        401: "Missing or wrong API key",
        404: "Unknown model, response or vector store",
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
    return await request.app.state.serving_chat.create_chat_completion(body, request)


@router.post("/v1/completions", response_model=CompletionResponse,
             responses=ERRORS, tags=["openai"])
async def completions(body: CompletionRequest, request: Request) -> Any:
    return await request.app.state.serving_completion.create_completion(body, request)


@router.post("/v1/responses", response_model=ResponseObject, responses=ERRORS,
             tags=["openai"])  # the SSE form: server.openapi
async def create_response(body: ResponsesRequest, request: Request) -> Any:
    """OpenAI's Responses API: text, function tools, text.format, file_search over --index,
    previous_response_id over stored responses."""
    return await request.app.state.serving_responses.create_response(body, request)


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=ERRORS,
            tags=["openai"])
async def get_response(response_id: str, request: Request) -> Any:
    return request.app.state.serving_responses.retrieve(response_id)


@router.delete("/v1/responses/{response_id}", response_model=ResponseDeleted, responses=ERRORS,
               tags=["openai"])
async def delete_response(response_id: str, request: Request) -> ResponseDeleted:
    return request.app.state.serving_responses.delete(response_id)


@router.get("/v1/vector_stores", response_model=VectorStoreList, responses=ERRORS,
            tags=["openai"])
async def list_vector_stores(request: Request) -> VectorStoreList:
    """The server's one vector store (its --index), or none."""
    return request.app.state.serving_vector_stores.list()


@router.get("/v1/vector_stores/{vector_store_id}", response_model=VectorStore,
            responses=ERRORS, tags=["openai"])
async def get_vector_store(vector_store_id: str, request: Request) -> VectorStore:
    return request.app.state.serving_vector_stores.retrieve(vector_store_id)


@router.post("/v1/vector_stores/{vector_store_id}/search", response_model=VectorStoreSearchPage,
             responses=ERRORS, tags=["openai"])
async def search_vector_store(vector_store_id: str, body: VectorStoreSearchRequest,
                              request: Request) -> VectorStoreSearchPage:
    return await request.app.state.serving_vector_stores.search(vector_store_id, body)


@router.get("/v1/models", response_model=ModelList, tags=["openai"])
async def models(request: Request) -> ModelList:
    return request.app.state.serving_models.show_available_models()


@router.post("/v1/retrieve", response_model=RetrieveResponse, responses=ERRORS, tags=["ragserve"])
async def retrieve(body: RetrieveRequest, request: Request) -> RetrieveResponse:
    """The passages the retriever finds for `query`, best first (`mode`: hybrid, late
    interaction or lexical; default the index's)."""
    return await request.app.state.serving_retrieval.retrieve(body)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS, tags=["vllm"])
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return request.app.state.serving_tokenization.create_tokenize(body)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS, tags=["vllm"])
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return request.app.state.serving_tokenization.create_detokenize(body)


@router.get("/health", tags=["ops"], response_class=Response,
            responses={200: {"description": "Alive (an empty body, as vLLM's)", "content": {}}})
async def health() -> Response:
    """Alive (the process answers); says nothing about the model: see /ready."""
    return Response(status_code=200)


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            tags=["ops"])
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and every bucket graph is warmed; 503 before."""
    return request.app.state.serving_models.readiness()


@router.get("/ping", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            tags=["sagemaker"])
async def ping(request: Request) -> JSONResponse:
    """SageMaker's health check: the same as /ready."""
    return request.app.state.serving_models.readiness()


@router.post("/invocations", response_model=ChatCompletionResponse | CompletionResponse,
             responses=ERRORS, tags=["sagemaker"])  # its request body: server.openapi
async def invocations(request: Request) -> Any:
    """SageMaker's inference route: a chat body (with `messages`) or a completions body."""
    payload = await request.json()  # server.body.BodyError (a 400) if it is not JSON
    if not isinstance(payload, dict) or not ({"messages", "prompt"} & payload.keys()):
        raise bad_request("expected a chat completions body (with `messages`) or a "
                          "completions body (with `prompt`)")
    kind = ChatCompletionRequest if "messages" in payload else CompletionRequest
    try:
        body = kind.model_validate(payload)
    except ValidationError as e:  # validated here, not by FastAPI: the same 400
        raise api_error(e) from None
    if isinstance(body, ChatCompletionRequest):
        return await request.app.state.serving_chat.create_chat_completion(body, request)
    return await request.app.state.serving_completion.create_completion(body, request)


@router.get("/v1/buckets", response_model=BucketsResponse, tags=["ragserve"])
async def buckets(request: Request) -> BucketsResponse:
    """The current bucket lists, their padding on the lengths served so far, a uniform sample
    of those lengths and the mean time of one-prompt prefills per bucket (for `ragserve buckets
    plan --from URL`)."""
    return request.app.state.serving_models.buckets()


@router.get("/metrics", response_class=PlainTextResponse, tags=["ops"])
async def metrics(request: Request) -> Response:
    """The server's series and the engine's (each name registered once: see server.metrics)."""
    text = request.app.state.metrics.render() + request.app.state.engine.metrics_text()
    return Response(text, media_type=CONTENT_TYPE_LATEST)
