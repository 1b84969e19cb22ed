"""Structured outputs at the edge: the request's constraint (OpenAI's ``response_format``, vLLM's
``structured_outputs`` and its older ``guided_*`` aliases) -> a ``scheduler.StructuredOutput``,
compiled once here, off the event loop, so what cannot be enforced is a 400 before the queue.

Both engines take the same ``StructuredOutput``: ragserve's compiles it again in its own process
(``runtime/structured.py``, cached per spec), vLLM's maps it to its own parameters
(``server/vllm_engine.py``). Both use xgrammar, so what this check accepts both enforce.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from runtime.structured import GrammarCompiler, StructuredOutputError
from scheduler import StructuredKind, StructuredOutput
from server.errors import bad_request
from server.protocol import ChatCompletionRequest, CompletionRequest

#: seconds a compile may take before the request is refused (a regex can explode; the compile
#: thread cannot be stopped, but the client gets its answer and the queue is not held)
COMPILE_TIMEOUT_S = 10.0
#: compiles that run at once; more wait their turn (each is one CPU core busy)
COMPILE_THREADS = 2

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def _schema_text(value: Any, param: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise bad_request(f"{param} is not valid JSON: {e}", param) from None
    if not isinstance(value, (dict, bool)):
        raise bad_request(f"{param} must be a JSON schema (an object)", param)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _from_response_format(fmt: Any) -> StructuredOutput | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput(StructuredKind.JSON_OBJECT)
    if fmt.json_schema is None:
        raise bad_request("response_format of type json_schema needs a json_schema object "
                          "with a schema", "response_format")
    if fmt.json_schema.schema_ is None:
        raise bad_request(f"response_format.json_schema {fmt.json_schema.name!r} has no "
                          "schema", "response_format")
    return StructuredOutput(StructuredKind.JSON,
                            _schema_text(fmt.json_schema.schema_, "response_format"))


def _from_options(opts: Any, param: str) -> StructuredOutput:
    given = {k: v for k, v in opts.model_dump(exclude_none=True).items() if v is not False}
    if len(given) != 1:
        raise bad_request(f"{param} takes exactly one of json, regex, choice, grammar, "
                          f"json_object (got {sorted(given) or 'none'})", param)
    (kind, value), = given.items()
    if kind == "json":
        return StructuredOutput(StructuredKind.JSON, _schema_text(value, f"{param}.json"))
    if kind == "json_object":
        return StructuredOutput(StructuredKind.JSON_OBJECT)
    if kind == "choice":
        if not value or not all(c for c in value):
            raise bad_request(f"{param}.choice must be a non-empty list of non-empty strings",
                              param)
        return StructuredOutput(StructuredKind.CHOICE, json.dumps(value, ensure_ascii=False))
    if not value:
        raise bad_request(f"{param}.{kind} must not be empty", param)
    return StructuredOutput(StructuredKind(kind), value)


def structured_from_request(req: ChatCompletionRequest | CompletionRequest
                            ) -> tuple[StructuredOutput, str] | None:
    """The request's constraint and the field it came from, or None; a 400 when more than one
    field asks for one or a field is malformed."""
    sources = [name for name in ("response_format", "structured_outputs", *GUIDED)
               if getattr(req, name, None) is not None]
    if req.response_format is not None and req.response_format.type == "text":
        sources.remove("response_format")
    if not sources:
        return None
    if len(sources) > 1:
        raise bad_request(f"give one structured-output field, not {', '.join(sources)}",
                          sources[1])
    name = sources[0]
    if name == "response_format":
        so = _from_response_format(req.response_format)
        return (so, name) if so is not None else None
    if name == "structured_outputs":
        return _from_options(req.structured_outputs, name), name
    value = getattr(req, name)
    kind = name.removeprefix("guided_")
    if kind == "json":
        return StructuredOutput(StructuredKind.JSON, _schema_text(value, name)), name
    if kind == "choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise bad_request(f"{name} must be a non-empty list of non-empty strings", name)
        return StructuredOutput(StructuredKind.CHOICE, json.dumps(value, ensure_ascii=False)), name
    if not value:
        raise bad_request(f"{name} must not be empty", name)
    return StructuredOutput(StructuredKind(kind), value), name


class StructuredChecker:
    """Compiles each new constraint once (LRU-cached by spec) on its own threads, so a slow
    compile never stalls the event loop, and turns a failure into a 400 naming the field."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar")
        self._compilers: dict[int, GrammarCompiler] = {}
        self._lock = threading.Lock()

    def compiler(self, tokenizer: Any) -> GrammarCompiler:
        with self._lock:
            c = self._compilers.get(id(tokenizer))
            if c is None:
                eos = tokenizer.eos_token_id
                c = GrammarCompiler(tokenizer, len(tokenizer), [] if eos is None else [eos])
                self._compilers = {id(tokenizer): c}  # one served model: keep its tokenizer's
            return c

    async def check(self, tokenizer: Any, so: StructuredOutput, param: str) -> None:
        compiler = self.compiler(tokenizer)
        if compiler.cached(so):
            return
        fut = asyncio.get_running_loop().run_in_executor(self._pool, compiler.compile, so)
        try:
            await asyncio.wait_for(fut, COMPILE_TIMEOUT_S)
        except StructuredOutputError as e:
            raise bad_request(str(e), param) from None
        except TimeoutError:
            raise bad_request(f"the {so.kind.value} constraint did not compile within "
                              f"{COMPILE_TIMEOUT_S:g} s; simplify it", param) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
