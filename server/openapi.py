"""The OpenAPI document as the server really behaves, for generated clients and fuzzers.

FastAPI's generated document is close; this fixes where it is not: ragserve answers validation
errors with 400 in OpenAI's shape (never FastAPI's 422 ``HTTPValidationError``), every route but
/health and /ping may answer 401, a streamed response is a sequence of server-sent events whose
``data`` is one chunk's JSON (or ``[DONE]``), and /invocations takes either a chat or a
completions body.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.protocol import (
    ChatCompletionChunk,
    CompletionResponse,
    ErrorResponse,
)
from server.protocol_responses import ResponseStreamEvent

REF = "#/components/schemas/{model}"

#: the routes that answer without the API key (server.app.APIKeyMiddleware)
OPEN_PATHS = frozenset({"/health", "/ping"})


def sse_events(*chunks: type[BaseModel]) -> dict[str, Any]:
    """The ``text/event-stream`` media type of a streamed response: each event (OpenAPI before
    3.2 has ``schema`` describe one event) carries ``data``, a chunk's JSON or ``[DONE]``."""
    names = " or ".join(c.__name__ for c in chunks)
    payload = [{"$ref": REF.format(model=c.__name__)} for c in chunks]
    return {"schema": {
        "type": "object",
        "description": f"with stream=true, one server-sent event: `data: <{names} JSON>` as "
                       "tokens are generated, then `data: [DONE]`; an error after the stream "
                       "started is one `data: {\"error\": ...}` event before `[DONE]`",
        "required": ["data"],
        "properties": {
            "data": {"anyOf": [
                {"const": "[DONE]"},
                {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [*payload,
                                             {"$ref": REF.format(model="ErrorResponse")}]}}]},
            "event": {"type": "string"}, "id": {"type": "string"},
            "retry": {"type": "integer"}}}}


def _add_models(schema: dict[str, Any], models: list[type[BaseModel]]) -> None:
    _, defs = models_json_schema([(m, "serialization") for m in models], ref_template=REF)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in defs.get("$defs", {}).items():
        components.setdefault(name, definition)


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document for ``app``, corrected (see the module docstring); cached on the app
    as FastAPI caches its own."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    _add_models(schema, [ChatCompletionChunk, CompletionResponse, ErrorResponse,
                         ResponseStreamEvent])
    components = schema["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    unauthorized = {"description": "Missing or wrong API key (with --api-key)",
                    "content": {"application/json": {"schema": {"$ref": REF.format(
                        model="ErrorResponse")}}}}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            responses.pop("422", None)
            if path not in OPEN_PATHS:
                responses.setdefault("401", unauthorized)
    streamed = {"/v1/chat/completions": (ChatCompletionChunk,),
                "/v1/completions": (CompletionResponse,),
                "/invocations": (ChatCompletionChunk, CompletionResponse),
                "/v1/responses": (ResponseStreamEvent,)}  # `event: <type>` on each
    for path, chunks in streamed.items():
        ok = schema["paths"][path]["post"]["responses"]["200"]
        ok["description"] = "The completion (JSON), or with stream=true its server-sent events"
        ok["content"]["text/event-stream"] = sse_events(*chunks)
    invocations = schema["paths"]["/invocations"]["post"]
    invocations["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
        "anyOf": [{"$ref": REF.format(model="ChatCompletionRequest")},
                  {"$ref": REF.format(model="CompletionRequest")}]}}}}
    app.openapi_schema = schema
    return schema
