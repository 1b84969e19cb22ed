"""The FastAPI app: long-lived objects on app.state, middlewares, the error handlers."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.client import EngineClient, FailureCallback
from engine.core import Engine
from server.admission import Admission
from server.config import ServerConfig
from server.engines import build_engine
from server.errors import HANDLED, APIError, api_error, error_response
from server.metrics import Metrics
from server.openapi import OPEN_PATHS, openapi_document
from server.rag import RAGService
from server.response_store import ResponseStore
from server.routes import router, upload_router
from server.serving_chat import OpenAIServingChat
from server.serving_completion import OpenAIServingCompletion
from server.serving_files import ServingFiles
from server.serving_models import OpenAIServingModels
from server.serving_pooling import ServingPooling
from server.serving_responses import OpenAIServingResponses
from server.serving_retrieval import ServingRetrieval
from server.serving_tokenization import OpenAIServingTokenization
from server.serving_vector_stores import ServingVectorStores
from server.stores import Stores

log = logging.getLogger(__name__)

#: how often the API process hands the heap memory it has freed back to the system
TRIM_SECONDS = 30.0


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None where the C library has none: musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


async def trim_memory(trim: Callable[[int], int], seconds: float = TRIM_SECONDS) -> None:
    """``trim(0)`` every ``seconds``, off the event loop, until cancelled. glibc keeps what a
    burst freed (hundreds of connections' buffers and bodies, 429s) in its heaps for reuse,
    so without it the process's RSS only ever grows to its peak and stays there."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(seconds)
        await loop.run_in_executor(None, trim, 0)


class APIKeyMiddleware:
    """``Authorization: Bearer KEY`` on every route but /health and /ping (constant time)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not secrets.compare_digest(given, self.expected):
            response = error_response(401, "invalid or missing API key (send "
                                           "`Authorization: Bearer <key>`)",
                                      headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for request bodies over ``limit`` bytes, declared or streamed (chunked); uploads
    (``POST /v1/files``) may be ``upload_limit`` bytes."""

    #: room for the multipart framing and the form's other fields around an upload's bytes
    MULTIPART_OVERHEAD = 64 * 1024

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = (upload_limit + self.MULTIPART_OVERHEAD if upload_limit is not None
                             else limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["path"] == "/v1/files" and scope["method"] == "POST"
        limit = self.upload_limit if upload else self.limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._reject(scope, receive, send, upload)
        if upload:  # streamed to disk by the multipart parser: counted, never buffered here
            seen = 0

            async def counted() -> Message:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise APIError(413, f"the upload exceeds --max-upload-bytes "
                                            f"({limit - self.MULTIPART_OVERHEAD} bytes)",
                                       param="file", code="file_too_large")
                return message

            return await self.app(scope, counted, send)
        if declared is not None:  # a declared length within the limit: the server enforces it
            return await self.app(scope, receive, send)
        # no Content-Length (chunked): read up to the limit first, then replay it
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._reject(scope, receive, send)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send,
                      upload: bool = False) -> None:
        response = error_response(413, f"the upload exceeds --max-upload-bytes "
                                       f"({self.upload_limit - self.MULTIPART_OVERHEAD} bytes)"
                                  if upload else f"request body exceeds --max-request-bytes "
                                                 f"({self.limit} bytes)")
        await response(scope, receive, send)


class ResponseCountMiddleware:
    """Counts every HTTP response by route and status code (``ragserve_http_requests_total``);
    paths that are not routes of the app count as ``other``."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.observe_response(route, message["status"])
            await send(message)

        return await self.app(scope, receive, counted)


def responses_store(config: ServerConfig) -> ResponseStore:
    """Stored responses: on disk under the cache dir unless --responses-store-persist false."""
    from runtime.loader import default_cache_dir

    path = None
    if config.responses_store_persist:
        path = config.responses_store_path or (
            (config.cache_dir or default_cache_dir()) / "responses.sqlite3")
    return ResponseStore(path, config.responses_store_max_count,
                         config.responses_store_max_bytes)


def build_app(config: ServerConfig, factory: Callable[[], Engine] | None = None,
              on_engine_failure: FailureCallback | None = None,
              engine: EngineClient | None = None) -> FastAPI:
    """The app for ``config``, on the engine ``config.engine`` names (or ``engine``, already
    built); ``factory`` builds ragserve's Engine (default: from the config)."""

    def served_name() -> str:
        return models.model_name

    def max_model_len() -> int | None:
        info = models.engine.info
        return info.max_model_len if info is not None else None

    metrics = Metrics(served_name, max_model_len)
    if engine is None:
        engine = build_engine(config, served_name, on_failure=on_engine_failure,
                              factory=factory)
    rag = RAGService(config, metrics, on_failure=on_engine_failure)
    stores = Stores(config, rag, metrics)
    metrics.watch_stores(stores)
    models = OpenAIServingModels(engine, config, rag)
    # one queue for every endpoint that generates
    admission = Admission(config.max_num_seqs, config.max_queue_len, config.max_queue_wait)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        rag.start()
        stores.start()
        trim = malloc_trim()
        trimmer = asyncio.ensure_future(trim_memory(trim)) if trim is not None else None
        yield
        if trimmer is not None:
            trimmer.cancel()
        engine.stop()
        stores.stop()
        rag.stop()

    app = FastAPI(title="ragserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible LLM server (multi-bucket static graphs, "
                              "continuous batching).")
    app.state.config = config
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.rag = rag
    app.state.serving_models = models
    app.state.serving_chat = OpenAIServingChat(models, admission, metrics, rag)
    app.state.serving_completion = OpenAIServingCompletion(models, admission, metrics)
    app.state.serving_tokenization = OpenAIServingTokenization(models)
    app.state.serving_retrieval = ServingRetrieval(models, rag)
    app.state.serving_pooling = ServingPooling(models, rag, config.max_embedding_batch)
    app.state.stores = stores
    app.state.serving_files = ServingFiles(config, stores)
    app.state.serving_vector_stores = ServingVectorStores(config, rag, stores)
    rag.vector_stores = app.state.serving_vector_stores
    app.state.serving_responses = OpenAIServingResponses(
        models, admission, metrics, rag, responses_store(config),
        app.state.serving_vector_stores)
    app.include_router(router)
    app.include_router(upload_router)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]

    async def error(request: Request, exc: Exception) -> JSONResponse:
        return api_error(exc, request).response()

    for kind in HANDLED:
        app.add_exception_handler(kind, error)
    app.add_middleware(BodyLimitMiddleware, limit=config.max_request_bytes,
                       upload_limit=config.max_upload_bytes)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    routes = frozenset(r.path for r in [*router.routes, *upload_router.routes])
    app.add_middleware(ResponseCountMiddleware, metrics=metrics, routes=routes)  # outermost
    return app
