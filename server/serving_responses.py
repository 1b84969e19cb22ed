"""POST /v1/responses (OpenAI's Responses API), GET and DELETE /v1/responses/{id}.

A request becomes a chat request: ``instructions`` (a system message), the stored conversation
of ``previous_response_id``, then ``input``'s items as chat messages (``function_call`` items as
an assistant message's ``tool_calls``, ``function_call_output`` items as ``tool`` messages). From
there it is chat's path: the chat template, tools (:mod:`server.tools`), ``text.format`` as a
structured output (:mod:`server.structured`), the engine through :class:`OpenAIServing`. With a
``file_search`` tool it is chat's ``rag`` path (:mod:`server.rag`): the search becomes a
``file_search_call`` item and the answer's ``[n]`` citations become ``file_citation``
annotations (see :class:`Citations`).

A streamed response is OpenAI's typed events (``event: <type>`` + ``data`` with a
``sequence_number``), written by :class:`Events`.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from engine.client import ModelInfo
from engine.output import RequestOutput
from server.admission import Admission
from server.errors import APIError, api_error, bad_request
from server.metrics import Metrics
from server.preprocess import chat_prompt_ids, message_dicts, sampling_params
from server.protocol import ChatCompletionRequest, Grounding
from server.protocol_responses import (
    INCLUDABLE,
    UNSUPPORTED,
    FileSearchCallInput,
    FileSearchToolSpec,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolSpec,
    MessageItem,
    ResponseDeleted,
    ResponseObject,
    ResponsesRequest,
)
from server.rag import (
    CitationFilter,
    RAGContext,
    RAGService,
    SentenceStream,
    StoreSearch,
    last_user_text,
)
from server.response_store import ResponseStore
from server.serving import OpenAIServing, Submitted
from server.serving_models import OpenAIServingModels
from server.serving_vector_stores import ServingVectorStores, attributes, passage_file
from server.structured import structured_from_request
from server.tool_parsers import call_id
from server.tools import ToolPlan, plan_tools

log = logging.getLogger("ragserve")

#: chat's parameter names as a Responses request calls them (errors name the client's field)
RENAMED = {"messages": "input", "response_format": "text", "max_tokens": "max_output_tokens",
           "max_completion_tokens": "max_output_tokens", "rag": "tools"}


@contextmanager
def responses_params() -> Iterator[None]:
    """Errors from chat's code name the Responses request's fields."""
    try:
        yield
    except APIError as e:
        e.param = RENAMED.get(e.param or "", e.param)
        raise
    except ValidationError as e:  # a chat request built from a valid one: the input's fault
        err = api_error(e)
        err.param = RENAMED.get(err.param or "", "input")
        raise err from None


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- input items -> chat messages ------------------------------------------------------------

def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.text if p.type != "refusal" else p.refusal for p in content)


def input_messages(items: str | list[Any]) -> list[dict[str, Any]]:
    """``input`` as chat messages (ChatMessage's shape, kept in the store as they are)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role  # templates know system
            out.append({"role": role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            elif last is not None and last["role"] == "assistant" and not last.get("tool_calls"):
                last["tool_calls"] = [call]  # the text the model wrote before its calls
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id,
                        "content": _text(item.output)})
        elif isinstance(item, FileSearchCallInput):
            continue  # what it found is in the answer that follows it
    return out


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the assistant turn of the stored conversation."""
    text = "".join(c["text"] for item in output if item["type"] == "message"
                   for c in item["content"])
    calls = [{"id": i["call_id"], "type": "function",
              "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in output if i["type"] == "function_call"]
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        msg["tool_calls"] = calls
    return [msg]


# -- citations -> annotations ----------------------------------------------------------------

_MARKER = re.compile(r"\s*\[(\d+)\]")


class Citations:
    """Turns the ``[n]`` markers of a RAG answer (checked by :mod:`server.rag`) into OpenAI's
    ``file_citation`` annotations: each marker (with the space before it) leaves the text, and
    its annotation's ``index`` is where it was in the text without markers, i.e. right after
    the cited words (before the sentence's full stop). Streamed text goes through ``feed``
    piece by piece (trailing space held back until it is known not to precede a marker), so
    the streamed deltas join to the final text."""

    def __init__(self, ctx: RAGContext) -> None:
        self.passages = ctx.passages
        self.held = ""
        self.length = 0  # characters of marker-free text sent
        self.annotations: list[dict[str, Any]] = []

    def feed(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """The marker-free delta and the new annotations."""
        text = self.held + text
        self.held = ""
        if not final:
            cut = len(text.rstrip())
            text, self.held = text[:cut], text[cut:]
        pieces, new, last = [], [], 0
        for m in _MARKER.finditer(text):
            pieces.append(text[last:m.start()])
            last = m.end()
            n = int(m.group(1))
            at = self.length + sum(len(p) for p in pieces)
            if 1 <= n <= len(self.passages):
                fid, name = passage_file(self.passages[n - 1])
                new.append({"type": "file_citation", "file_id": fid, "filename": name,
                            "index": at})
        pieces.append(text[last:])
        out = "".join(pieces)
        self.length += len(out)
        self.annotations += new
        return out, new


# -- streamed events -------------------------------------------------------------------------

class Events:
    """OpenAI's stream events for one response, numbered; the output items as they grow."""

    def __init__(self, skeleton: dict[str, Any]) -> None:
        self.skeleton = skeleton  # the response's fields besides output, status and usage
        self.seq = 0
        self.items: list[dict[str, Any]] = []
        self.message: dict[str, Any] | None = None  # the open message item
        self.call: dict[str, Any] | None = None  # the open function_call item

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def snapshot(self, status: str, **extra: Any) -> dict[str, Any]:
        return {**self.skeleton, "status": status, "output": self.items, **extra}

    def start(self) -> str:
        return (self.event("response.created", response=self.snapshot("in_progress"))
                + self.event("response.in_progress", response=self.snapshot("in_progress")))

    def whole_item(self, item: dict[str, Any], progress: list[str]) -> str:
        """An item that is complete at once (a file search already run): added, its progress
        events, done."""
        index = len(self.items)
        self.items.append(item)
        added = {**item, "status": "in_progress"}
        added.pop("results", None)
        out = self.event("response.output_item.added", output_index=index, item=added)
        for kind in progress:
            out += self.event(kind, output_index=index, item_id=item["id"])
        return out + self.event("response.output_item.done", output_index=index, item=item)

    def text(self, delta: str) -> str:
        out = ""
        if self.message is None:
            out += self.end_call()
            self.message = {"type": "message", "id": new_id("msg"), "status": "in_progress",
                            "role": "assistant", "content": []}
            index = len(self.items)
            self.items.append(self.message)
            out += self.event("response.output_item.added", output_index=index,
                              item=self.message)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out += self.event("response.content_part.added", output_index=index,
                              item_id=self.message["id"], content_index=0, part=part)
            self.message["content"] = [dict(part)]
        if not delta:
            return out
        self.message["content"][0]["text"] += delta
        return out + self.event("response.output_text.delta", output_index=self._index(
            self.message), item_id=self.message["id"], content_index=0, delta=delta,
            logprobs=[])

    def end_message(self, status: str = "completed",
                    annotations: list[dict[str, Any]] = ()) -> str:  # type: ignore[assignment]
        msg, self.message = self.message, None
        if msg is None:
            return ""
        index, part = self._index(msg), msg["content"][0]
        out = ""
        for a in annotations:
            out += self.event("response.output_text.annotation.added", output_index=index,
                              item_id=msg["id"], content_index=0,
                              annotation_index=len(part["annotations"]), annotation=a)
            part["annotations"].append(a)
        out += self.event("response.output_text.done", output_index=index, item_id=msg["id"],
                          content_index=0, text=part["text"], logprobs=[])
        out += self.event("response.content_part.done", output_index=index, item_id=msg["id"],
                          content_index=0, part=part)
        msg["status"] = status
        return out + self.event("response.output_item.done", output_index=index, item=msg)

    def start_call(self, call_id: str, name: str) -> str:
        out = self.end_message() + self.end_call()
        self.call = {"type": "function_call", "id": new_id("fc"), "call_id": call_id,
                     "name": name, "arguments": "", "status": "in_progress"}
        self.items.append(self.call)
        return out + self.event("response.output_item.added",
                                output_index=self._index(self.call), item=self.call)

    def call_arguments(self, delta: str) -> str:
        if self.call is None or not delta:
            return ""
        self.call["arguments"] += delta
        return self.event("response.function_call_arguments.delta",
                          output_index=self._index(self.call), item_id=self.call["id"],
                          delta=delta)

    def end_call(self, status: str = "completed") -> str:
        call, self.call = self.call, None
        if call is None:
            return ""
        index = self._index(call)
        call["status"] = status
        return (self.event("response.function_call_arguments.done", output_index=index,
                           item_id=call["id"], arguments=call["arguments"])
                + self.event("response.output_item.done", output_index=index, item=call))

    def _index(self, item: dict[str, Any]) -> int:
        return next(i for i, x in enumerate(self.items) if x is item)


# -- the serving class -----------------------------------------------------------------------

class OpenAIServingResponses(OpenAIServing):
    def __init__(self, models: OpenAIServingModels, admission: Admission,
                 metrics: Metrics | None, rag: RAGService, store: ResponseStore,
                 vector_stores: ServingVectorStores) -> None:
        super().__init__(models, admission, metrics)
        self.rag = rag
        self.store = store
        self.vector_stores = vector_stores
        self.tool_notes: set[str] = set()

    # -- GET / DELETE ----------------------------------------------------------------------

    def _not_found(self, rid: str, param: str | None, status: int) -> APIError:
        how = (" (it was evicted: the store keeps --responses-store-max-count responses and "
               "--responses-store-max-bytes bytes, least recently used first)"
               if self.store.evicted(rid) else "")
        if status == 400:
            return bad_request(f"Previous response with id '{rid}' not found{how}.", param)
        return APIError(404, f"No response found with id '{rid}'{how}.", param=param,
                        code="not_found")

    def retrieve(self, rid: str) -> JSONResponse:
        stored = self.store.get(rid)
        if stored is None:
            raise self._not_found(rid, "response_id", 404)
        return JSONResponse(stored.body)

    def delete(self, rid: str) -> ResponseDeleted:
        if not self.store.delete(rid):
            raise self._not_found(rid, "response_id", 404)
        return ResponseDeleted(id=rid)

    # -- POST ------------------------------------------------------------------------------

    async def create_response(self, req: ResponsesRequest, raw: Request
                              ) -> JSONResponse | StreamingResponse:
        arrival = time.monotonic()
        info = self.models.admit(req.model)
        check_unsupported(req)
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            stored = self.store.get(req.previous_response_id)
            if stored is None:
                raise self._not_found(req.previous_response_id, "previous_response_id", 400)
            history = stored.conversation
        conversation = history + input_messages(req.input)
        if not conversation:
            raise bad_request("input must not be empty", "input")
        system = [{"role": "system", "content": req.instructions}] if req.instructions else []
        search, functions = self._tools(req)
        with responses_params():
            chat = chat_request(req, system + conversation, functions, search is not None)
            tools = self._tool_plan(chat, info)
            self.precheck_queue(1)
            rag = await self._rag_prompt(chat, info, search) if search else None
            ids = rag.prompt_ids if rag else chat_prompt_ids(
                info.tokenizer, chat, (tools and tools.template) or self.models.chat_template,
                tools=tools.template_tools if tools else None)
            structured = await self.constraint(chat, info)
            if tools is not None and tools.structured is not None:
                await tools.check(self.models.structured, info.tokenizer)
                structured = tools.structured
            params = sampling_params(chat, len(ids), info, 0, structured)
        rid = new_id("resp")
        streams = self.submit(rid, [ids], [[params]], arrival)
        skeleton = self._skeleton(rid, req)
        searched = self._search_item(req, chat, rag) if rag else None
        if req.stream:
            return StreamingResponse(
                self._stream(streams, len(ids), skeleton, conversation, req, rag, tools,
                             searched), media_type="text/event-stream")
        o = (await self.finals(streams, raw))[0]
        text, grounding = o.text, None
        if rag is not None:
            text, grounding = await self.rag.check(rag, text)
        incomplete = o.finish_reason.value == "length"
        status = "incomplete" if incomplete else "completed"
        output: list[dict[str, Any]] = [searched] if searched else []
        content, calls = tools.parse(text) if tools is not None else (text, [])
        if content or not calls:
            annotations: list[dict[str, Any]] = []
            if rag is not None:
                content, annotations = Citations(rag).feed(content or "", final=True)
            output.append({"type": "message", "id": new_id("msg"), "status": status,
                           "role": "assistant", "content": [{
                               "type": "output_text", "text": content or "",
                               "annotations": annotations, "logprobs": []}]})
        output += [{"type": "function_call", "id": new_id("fc"), "call_id": call_id(),
                    "name": c.name, "arguments": c.arguments, "status": "completed"}
                   for c in calls]
        body = self._finish(skeleton, output, status, (len(ids), len(o.token_ids),
                            o.num_cached_tokens), grounding, req, conversation)
        return JSONResponse(body)

    def _skeleton(self, rid: str, req: ResponsesRequest) -> dict[str, Any]:
        text = {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)
                if req.text is not None and req.text.format is not None else {"type": "text"}}
        return ResponseObject(
            id=rid, status="in_progress", model=self.models.model_name,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens,
            parallel_tool_calls=req.parallel_tool_calls is not False,
            previous_response_id=req.previous_response_id, store=req.store,
            temperature=req.temperature, top_p=req.top_p, text=text,
            tool_choice=req.tool_choice if req.tool_choice is not None else "auto",
            tools=[t.model_dump(by_alias=True, exclude_none=True) for t in req.tools or ()],
            user=req.user, metadata=req.metadata or {},
        ).model_dump(exclude={"output", "status", "usage"})

    def _finish(self, skeleton: dict[str, Any], output: list[dict[str, Any]], status: str,
                tokens: tuple[int, int, int], grounding: Grounding | None,
                req: ResponsesRequest, conversation: list[dict[str, Any]]) -> dict[str, Any]:
        """The final response (validated by its model), stored when asked. ``tokens``: input,
        output, and cached input tokens."""
        n_in, n_out, n_cached = tokens
        body = ResponseObject.model_validate({
            **skeleton, "status": status, "output": output, "completed_at": time.time(),
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete" else None,
            "usage": {"input_tokens": n_in, "output_tokens": n_out,
                      "input_tokens_details": {"cached_tokens": n_cached},
                      "total_tokens": n_in + n_out},
            "grounding": grounding}).model_dump()
        if req.store:
            self.store.put(body["id"], body, conversation + output_messages(output))
        return body

    # -- tools and file search -------------------------------------------------------------

    def _tools(self, req: ResponsesRequest
               ) -> tuple[FileSearchToolSpec | None, list[FunctionToolSpec]]:
        search = [t for t in req.tools or () if isinstance(t, FileSearchToolSpec)]
        functions = [t for t in req.tools or () if isinstance(t, FunctionToolSpec)]
        choice = req.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "file_search":
            if not search:
                raise bad_request("tool_choice names file_search, which is not in tools",
                                  "tool_choice")
            choice = "required"
        if len(search) > 1:
            raise bad_request("give one file_search tool (it takes several vector_store_ids)",
                              "tools")
        if search and functions:
            raise bad_request("a file_search tool cannot be combined with function tools",
                              "tools")
        if not search:
            return None, functions
        tool = search[0]
        self.vector_stores.check_ids(tool.vector_store_ids, "vector_store_ids")
        if tool.filters is not None:
            from retrieval.filters import FilterError, check

            try:
                check(tool.filters)
            except FilterError as e:
                raise bad_request(f"filters: {e}", "filters") from None
        if tool.ranking_options is not None and tool.ranking_options.hybrid_search is not None:
            raise bad_request("ranking_options.hybrid_search is not supported: the store's "
                              "retrieval mode (hybrid by default) decides", "ranking_options")
        if choice == "none":
            return None, []
        if choice not in (None, "auto", "required"):
            raise bad_request("with a file_search tool, tool_choice must be 'auto', "
                              "'required', 'none' or {'type': 'file_search'}", "tool_choice")
        return tool, []

    def _tool_plan(self, chat: ChatCompletionRequest, info: ModelInfo) -> ToolPlan | None:
        config = self.config
        plan = plan_tools(
            chat.tools, chat.tool_choice, chat.parallel_tool_calls,
            parser=config.tool_call_parser, auto=config.enable_auto_tool_choice,
            engine=self.engine.name, tokenizer=info.tokenizer,
            served_template=self.models.chat_template or info.tokenizer.chat_template,
            structured_in_request=structured_from_request(chat) is not None)
        if plan is not None and plan.template_note and plan.template_note not in self.tool_notes:
            self.tool_notes.add(plan.template_note)
            log.info(plan.template_note)
        return plan

    async def _rag_prompt(self, chat: ChatCompletionRequest, info: ModelInfo,
                          tool: FileSearchToolSpec) -> RAGContext:
        return await self.rag.prepare(
            message_dicts(chat.messages), StoreSearch(
                tool.vector_store_ids, top_k=tool.max_num_results, filters=tool.filters,
                score_threshold=(tool.ranking_options.score_threshold
                                 if tool.ranking_options else None)),
            chat.max_completion_tokens, (info.max_prompt_len, info.max_model_len),
            lambda msgs: chat_prompt_ids(info.tokenizer, chat, self.models.chat_template, msgs))

    def _search_item(self, req: ResponsesRequest, chat: ChatCompletionRequest,
                     rag: RAGContext) -> dict[str, Any]:
        results = None
        if "file_search_call.results" in (req.include or ()):
            results = [{"file_id": passage_file(p)[0], "filename": passage_file(p)[1],
                        "score": round(p.score, 6), "text": p.text,
                        "attributes": attributes(p, n)}
                       for n, p in enumerate(rag.passages, 1)]
        return {"type": "file_search_call", "id": new_id("fs"), "status": "completed",
                "queries": [last_user_text(message_dicts(chat.messages))], "results": results}

    # -- streaming -------------------------------------------------------------------------

    async def _stream(self, streams: Submitted, n_prompt: int, skeleton: dict[str, Any],
                      conversation: list[dict[str, Any]], req: ResponsesRequest,
                      rag: RAGContext | None, tools: ToolPlan | None,
                      searched: dict[str, Any] | None) -> AsyncIterator[str]:
        events = Events(skeleton)
        prologue = events.start()
        if searched is not None:
            prologue += events.whole_item(searched, [
                "response.file_search_call.in_progress", "response.file_search_call.searching",
                "response.file_search_call.completed"])
        parser = tools.stream() if tools is not None else None
        by_sentence = cite = citations = None
        strip = False
        if rag is not None:
            strip = rag.grounding == "strip"
            if not strip and rag.citations != "model":
                by_sentence = SentenceStream(self.rag, rag)
            cite, citations = CitationFilter(len(rag.passages)), Citations(rag)
        failed = False

        async def rag_delta(o: RequestOutput) -> tuple[str, Grounding | None]:
            """The cited, marker-free text to send now (and the report at the end)."""
            report = None
            if o.finished:
                if by_sentence is not None:
                    delta = await by_sentence.feed(o.text, final=True)
                    report = by_sentence.report()
                else:
                    text, report = await self.rag.check(rag, o.text)
                    delta = text if strip else cite.feed(text, final=True)
            elif by_sentence is not None:
                delta = await by_sentence.feed(o.text, final=False)
            else:
                delta = "" if strip else cite.feed(o.text, final=False)
            return delta, report

        async def event(i: int, o: RequestOutput) -> str:
            out, report = "", None
            if parser is not None:
                d = parser.feed(o.delta)
                if o.finished:
                    d.extend(parser.finish())
                if d.content:
                    out += events.text(d.content)
                for c in d.calls:
                    if c.id is not None:
                        out += events.start_call(c.id, c.name or "")
                    out += events.call_arguments(c.arguments)
            elif rag is not None:
                delta, report = await rag_delta(o)
                delta, _ = citations.feed(delta, final=o.finished)
                if delta or o.finished:
                    out += events.text(delta)
            elif o.delta or o.finished:
                out += events.text(o.delta)
            if not o.finished:
                return out
            status = "incomplete" if o.finish_reason.value == "length" else "completed"
            out += events.end_message(status, citations.annotations if citations else [])
            out += events.end_call(status)
            body = self._finish(skeleton, events.items, status,
                                (n_prompt, len(o.token_ids), o.num_cached_tokens), report, req,
                                conversation)
            return out + events.event(f"response.{status}", response=body)

        async for e in self.sse_stream(streams, n_prompt, [prologue], event, None):
            if e.startswith("data: [DONE]"):
                continue  # OpenAI's Responses streams end with their last typed event
            if e.startswith("data: {\"error\""):
                if failed:
                    continue
                failed = True
                err = json.loads(e[6:])["error"]
                yield events.event("error", code=str(err.get("code")), message=err["message"],
                                   param=err.get("param"))
                yield events.event("response.failed", response=events.snapshot(
                    "failed", error={"code": "server_error", "message": err["message"]}))
                continue
            yield e


def check_unsupported(req: ResponsesRequest) -> None:
    """OpenAI's fields ragserve cannot honour: a 400 naming each, never silently ignored."""
    for name in UNSUPPORTED:
        if getattr(req, name) is not None:
            raise bad_request(f"{name} is not supported by this server", name)
    if req.background:
        raise bad_request("background responses are not supported (send background false)",
                          "background")
    if req.truncation == "auto":
        raise bad_request("truncation 'auto' is not supported: a prompt that does not fit is "
                          "a 400 (truncation 'disabled')", "truncation")
    if req.service_tier not in (None, "auto", "default"):
        raise bad_request(f"service_tier {req.service_tier!r} is not supported (auto or "
                          "default)", "service_tier")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true",
                          "stream_options")
    if req.text is not None and req.text.verbosity is not None:
        raise bad_request("text.verbosity is not supported", "text")
    for value in req.include or ():
        if value not in INCLUDABLE:
            raise bad_request(f"include {value!r} is not supported (supported: "
                              f"{', '.join(INCLUDABLE)})", "include")
    for key in req.metadata or {}:
        if len(key) > 64:
            raise bad_request("metadata keys must be at most 64 characters", "metadata")


def chat_request(req: ResponsesRequest, messages: list[dict[str, Any]],
                 functions: list[FunctionToolSpec], searching: bool) -> ChatCompletionRequest:
    """The chat request that serves ``req`` (``messages``: instructions, history and input;
    ``searching``: its file_search tool, which took its ``tool_choice``, is used)."""
    tool_choice = None if searching else req.tool_choice
    if not functions and tool_choice in ("none", "auto"):
        tool_choice = None  # no tools: nothing to choose from (OpenAI accepts these)
    fields: dict[str, Any] = {
        "messages": messages, "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
        "tools": [t.model_dump(exclude_none=True) for t in functions] or None,
        "tool_choice": tool_choice,
        "parallel_tool_calls": req.parallel_tool_calls,
    }
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict,
                  "description": fmt.description}
        fields["response_format"] = {"type": "json_schema", "json_schema": {
            k: v for k, v in schema.items() if v is not None}}
    return ChatCompletionRequest.model_validate(fields)
