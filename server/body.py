"""Request bodies: strict JSON for every route that takes one, so that hostile bodies (invalid
UTF-8, NaN, deep nesting, the wrong content type) get a 4xx naming the problem, never a 500 or
FastAPI's ``{"detail": ...}``.

The routes use :class:`JSONRoute`: FastAPI's route, with its request's ``json()`` replaced by
:func:`parse_json` and a content-type check in front. A body that fails parsing raises
:class:`BodyError`, a :class:`json.JSONDecodeError`, which FastAPI turns into a
``RequestValidationError`` of type ``json_invalid`` (a 400: :func:`server.errors.api_error`).
"""

from __future__ import annotations

import email.message
import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from server.errors import APIError

#: Deeper than any request ragserve understands (a chat message's content part is 4 levels).
MAX_JSON_DEPTH = 32


class BodyError(json.JSONDecodeError):
    """The body is not JSON ragserve accepts; ``msg`` says why (shown to the client)."""

    def __init__(self, msg: str, doc: str = "", pos: int = 0) -> None:
        super().__init__(msg, doc, pos)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def parse_json(body: bytes) -> Any:
    """``body`` as JSON: UTF-8 only, no ``NaN``/``Infinity``, at most :data:`MAX_JSON_DEPTH`
    levels of nesting. Raises :class:`BodyError` with a message for the client.

    >>> parse_json(b'{"a": [1, 2.5, "x"]}')
    {'a': [1, 2.5, 'x']}
    >>> parse_json(b'{"t": NaN}')
    Traceback (most recent call last):
    server.body.BodyError: NaN is not valid JSON (numbers must be finite): line 1 column 1 (char 0)
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(f"the body is not valid UTF-8 (byte {e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte-order mark, as json.loads(bytes) allows
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise BodyError(e.msg, e.doc, e.pos) from None
    except ValueError as e:  # NaN / Infinity
        raise BodyError(str(e)) from None
    except RecursionError:
        raise BodyError(f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    # cheap in C: only a body with that many brackets can be that deep
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and \
            json_depth(value) > MAX_JSON_DEPTH:
        raise BodyError(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    # "\ud800" is valid JSON but no Unicode text (a surrogate without its pair): only a body
    # with such an escape can hold one, and only then are its strings walked
    if _SURROGATE_ESCAPE.search(body) and not _valid_unicode(value):
        raise BodyError("a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff "
                        "without its pair): not valid Unicode text")
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _valid_unicode(value: Any) -> bool:
    """Whether every string (keys included) in parsed JSON encodes as UTF-8, without recursion.

    >>> _valid_unicode({"a": ["text", 1]}), _valid_unicode([chr(0xD800)])
    (True, False)
    """
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return False
    return True


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion.

    >>> json_depth([1, {"a": [2]}]), json_depth("x")
    (3, 0)
    """
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in node if isinstance(child, (dict, list)))
    return deepest


def is_json_content_type(value: str | None) -> bool:
    """``application/json`` or ``application/*+json`` (parameters such as charset allowed); a
    missing Content-Type counts as JSON (``curl --data-binary`` without ``-H``)."""
    if not value:
        return True
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


class JSONRequest(Request):
    """A request whose ``json()`` is :func:`parse_json` (cached, as Starlette's)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """FastAPI's route with :class:`JSONRequest` and a 415 for a body that is not sent as JSON
    (FastAPI would hand the raw bytes to validation: "Input should be a valid dictionary")."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None or "POST" in self.methods

        async def strict(request: Request) -> Response:
            if takes_body:
                given = request.headers.get("content-type")
                if not is_json_content_type(given):
                    raise APIError(415, f"Content-Type {given!r} is not supported: send the "
                                        "body as application/json")
                if not given:  # parsed as JSON by every FastAPI version, strict or not
                    request.scope["headers"] = [*request.scope["headers"],
                                                (b"content-type", b"application/json")]
            strict_request = JSONRequest(request.scope, request.receive)
            if takes_body and not await strict_request.body():  # read once, kept for FastAPI
                raise APIError(400, "the body is empty: expected a JSON object")
            return await handler(strict_request)

        return strict
