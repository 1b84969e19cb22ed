"""HTTP routes: thin handlers over the serving objects on app.state (server.app builds them);
the OpenAPI document's corrections are server.openapi's."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
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
from server.protocol_pooling import (
    EmbeddingRequest,
    EmbeddingResponse,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
)
from server.protocol_responses import ResponseDeleted, ResponseObject, ResponsesRequest
from server.protocol_vector_stores import (
    FileBatchCreateRequest,
    FileDeleted,
    FileList,
    FileObject,
    VectorStore,
    VectorStoreCreateRequest,
    VectorStoreDeleted,
    VectorStoreFile,
    VectorStoreFileBatch,
    VectorStoreFileCreateRequest,
    VectorStoreFileDeleted,
    VectorStoreFileList,
    VectorStoreFileUpdateRequest,
    VectorStoreList,
    VectorStoreModifyRequest,
    VectorStoreSearchPage,
    VectorStoreSearchRequest,
)

router = APIRouter(route_class=JSONRoute)
#: routes whose body is not JSON (a multipart upload): parsed by their serving module
upload_router = APIRouter()

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Invalid request (the message names the parameter or the limit)",
        401: "Missing or wrong API key",
        404: "Unknown model, response, file or vector store",
        413: "Request body or upload too large, or the store's quota",
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
    """OpenAI's Responses API: text, function tools, text.format, file_search over the stores,
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


# -- files and vector stores -------------------------------------------------------------------

Limit = Annotated[int, Query(ge=1, le=10_000)]
Order = Annotated[Literal["asc", "desc"], Query()]
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary"},
        "purpose": {"type": "string", "enum": ["assistants", "user_data"]},
        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
        "expires_after[seconds]": {"type": "integer", "minimum": 3600,
                                   "maximum": 2592000}}}}}}}


@upload_router.post("/v1/files", response_model=FileObject, responses=ERRORS, tags=["openai"],
                    openapi_extra=UPLOAD_BODY)
async def upload_file(request: Request) -> FileObject:
    """Upload a document (PDF, HTML, Markdown or text, told by its content) for vector
    stores."""
    return await request.app.state.serving_files.upload(request)


@router.get("/v1/files", response_model=FileList, responses=ERRORS, tags=["openai"])
async def list_files(request: Request, purpose: str | None = None, limit: Limit = 10_000,
                     order: Order = "desc", after: str | None = None) -> FileList:
    return request.app.state.serving_files.list(purpose, limit, order, after)


@router.get("/v1/files/{file_id}", response_model=FileObject, responses=ERRORS,
            tags=["openai"])
async def get_file(file_id: str, request: Request) -> FileObject:
    return request.app.state.serving_files.retrieve(file_id)


@router.get("/v1/files/{file_id}/content", response_class=Response, responses={
    **ERRORS, 200: {"description": "The file's bytes", "content": {
        "application/octet-stream": {}, "application/pdf": {}, "text/html": {},
        "text/markdown": {}, "text/plain": {}}}}, tags=["openai"])
async def get_file_content(file_id: str, request: Request) -> Response:
    return request.app.state.serving_files.content(file_id)


@router.delete("/v1/files/{file_id}", response_model=FileDeleted, responses=ERRORS,
               tags=["openai"])
async def delete_file(file_id: str, request: Request) -> FileDeleted:
    """Delete a file: out of every vector store it is in, its bytes gone."""
    return request.app.state.serving_files.delete(file_id)


@router.post("/v1/vector_stores", response_model=VectorStore, responses=ERRORS,
             tags=["openai"])
async def create_vector_store(body: VectorStoreCreateRequest, request: Request) -> VectorStore:
    return request.app.state.serving_vector_stores.create(body)


@router.get("/v1/vector_stores", response_model=VectorStoreList, responses=ERRORS,
            tags=["openai"])
async def list_vector_stores(request: Request, limit: Limit = 10_000, order: Order = "asc",
                             after: str | None = None) -> VectorStoreList:
    """The stores created through the API, and the server's --index (read-only)."""
    return request.app.state.serving_vector_stores.list(limit, order, after)


@router.get("/v1/vector_stores/{vector_store_id}", response_model=VectorStore,
            responses=ERRORS, tags=["openai"])
async def get_vector_store(vector_store_id: str, request: Request) -> VectorStore:
    return request.app.state.serving_vector_stores.retrieve(vector_store_id)


@router.post("/v1/vector_stores/{vector_store_id}", response_model=VectorStore,
             responses=ERRORS, tags=["openai"])
async def modify_vector_store(vector_store_id: str, body: VectorStoreModifyRequest,
                              request: Request) -> VectorStore:
    return request.app.state.serving_vector_stores.modify(vector_store_id, body)


@router.delete("/v1/vector_stores/{vector_store_id}", response_model=VectorStoreDeleted,
               responses=ERRORS, tags=["openai"])
async def delete_vector_store(vector_store_id: str, request: Request) -> VectorStoreDeleted:
    return request.app.state.serving_vector_stores.delete(vector_store_id)


@router.post("/v1/vector_stores/{vector_store_id}/search", response_model=VectorStoreSearchPage,
             responses=ERRORS, tags=["openai"])
async def search_vector_store(vector_store_id: str, body: VectorStoreSearchRequest,
                              request: Request) -> VectorStoreSearchPage:
    return await request.app.state.serving_vector_stores.search(vector_store_id, body)


@router.post("/v1/vector_stores/{vector_store_id}/files", response_model=VectorStoreFile,
             responses=ERRORS, tags=["openai"])
async def add_vector_store_file(vector_store_id: str, body: VectorStoreFileCreateRequest,
                                request: Request) -> VectorStoreFile:
    """Add an uploaded file; it is ingested in the background (poll its status)."""
    return request.app.state.serving_vector_stores.add_file(vector_store_id, body)


@router.get("/v1/vector_stores/{vector_store_id}/files", response_model=VectorStoreFileList,
            responses=ERRORS, tags=["openai"])
async def list_vector_store_files(
        vector_store_id: str, request: Request, limit: Limit = 10_000, order: Order = "desc",
        after: str | None = None,
        filter: Literal["in_progress", "completed", "failed", "cancelled"] | None = None,
) -> VectorStoreFileList:
    return request.app.state.serving_vector_stores.list_files(vector_store_id, limit, order,
                                                              after, filter)


@router.get("/v1/vector_stores/{vector_store_id}/files/{file_id}",
            response_model=VectorStoreFile, responses=ERRORS, tags=["openai"])
async def get_vector_store_file(vector_store_id: str, file_id: str,
                                request: Request) -> VectorStoreFile:
    return request.app.state.serving_vector_stores.get_file(vector_store_id, file_id)


@router.post("/v1/vector_stores/{vector_store_id}/files/{file_id}",
             response_model=VectorStoreFile, responses=ERRORS, tags=["openai"])
async def update_vector_store_file(vector_store_id: str, file_id: str,
                                   body: VectorStoreFileUpdateRequest,
                                   request: Request) -> VectorStoreFile:
    return request.app.state.serving_vector_stores.update_file(vector_store_id, file_id,
                                                               body.attributes)


@router.delete("/v1/vector_stores/{vector_store_id}/files/{file_id}",
               response_model=VectorStoreFileDeleted, responses=ERRORS, tags=["openai"])
async def remove_vector_store_file(vector_store_id: str, file_id: str,
                                   request: Request) -> VectorStoreFileDeleted:
    """Take a file out of the store (the file itself stays in /v1/files)."""
    return request.app.state.serving_vector_stores.remove_file(vector_store_id, file_id)


@router.post("/v1/vector_stores/{vector_store_id}/file_batches",
             response_model=VectorStoreFileBatch, responses=ERRORS, tags=["openai"])
async def create_file_batch(vector_store_id: str, body: FileBatchCreateRequest,
                            request: Request) -> VectorStoreFileBatch:
    return request.app.state.serving_vector_stores.create_batch(vector_store_id, body)


@router.get("/v1/vector_stores/{vector_store_id}/file_batches/{batch_id}",
            response_model=VectorStoreFileBatch, responses=ERRORS, tags=["openai"])
async def get_file_batch(vector_store_id: str, batch_id: str,
                         request: Request) -> VectorStoreFileBatch:
    return request.app.state.serving_vector_stores.get_batch(vector_store_id, batch_id)


@router.post("/v1/vector_stores/{vector_store_id}/file_batches/{batch_id}/cancel",
             response_model=VectorStoreFileBatch, responses=ERRORS, tags=["openai"])
async def cancel_file_batch(vector_store_id: str, batch_id: str,
                            request: Request) -> VectorStoreFileBatch:
    return request.app.state.serving_vector_stores.cancel_batch(vector_store_id, batch_id)


@router.get("/v1/vector_stores/{vector_store_id}/file_batches/{batch_id}/files",
            response_model=VectorStoreFileList, responses=ERRORS, tags=["openai"])
async def list_file_batch_files(
        vector_store_id: str, batch_id: str, request: Request, limit: Limit = 10_000,
        order: Order = "desc", after: str | None = None,
        filter: Literal["in_progress", "completed", "failed", "cancelled"] | None = None,
) -> VectorStoreFileList:
    serving = request.app.state.serving_vector_stores
    serving.get_batch(vector_store_id, batch_id)  # a 404 for an unknown batch
    return serving.list_files(vector_store_id, limit, order, after, filter, batch_id)


@router.get("/v1/models", response_model=ModelList, tags=["openai"])
async def models(request: Request) -> ModelList:
    return request.app.state.serving_models.show_available_models()


@router.post("/v1/retrieve", response_model=RetrieveResponse, responses=ERRORS, tags=["ragserve"])
async def retrieve(body: RetrieveRequest, request: Request) -> RetrieveResponse:
    """The passages the retriever finds for `query`, best first (`mode`: hybrid, late
    interaction or lexical; default the index's)."""
    return await request.app.state.serving_retrieval.retrieve(body)


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS,
             tags=["openai"])
async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingResponse:
    """Sentence embeddings from the retriever encoder by mean pooling: BERT's last hidden
    state averaged over the attention mask, through the encoder's projection, L2-normalized
    (for the default encoder, all-MiniLM-L6-v2's own embedding). No truncation unless
    `truncate_prompt_tokens` asks."""
    return await request.app.state.serving_pooling.create_embedding(body)


@router.post("/v1/rerank", response_model=RerankResponse, responses=ERRORS, tags=["vllm"])
async def rerank(body: RerankRequest, request: Request) -> RerankResponse:
    """The documents best first by ColBERT late interaction with the query: MaxSim divided by
    the number of query vectors (in -1..1). Jina's and Cohere's shape, as vLLM serves it."""
    return await request.app.state.serving_pooling.rerank(body)


@router.post("/v2/rerank", response_model=RerankResponse, responses=ERRORS, tags=["vllm"])
async def rerank_v2(body: RerankRequest, request: Request) -> RerankResponse:
    """The same as /v1/rerank (vLLM serves both)."""
    return await request.app.state.serving_pooling.rerank(body)


@router.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, tags=["vllm"])
async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
    """text_1 against text_2 (1:1, 1:N or N:N) by ColBERT late interaction: MaxSim divided by
    the number of query vectors (in -1..1), as /v1/rerank scores."""
    return await request.app.state.serving_pooling.score(body)


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
