"""POST /v1/chat/completions: chat requests -> engine requests; outputs -> a
``chat.completion`` or its ``chat.completion.chunk`` events; with ``rag``, grounded answers
with their sources and grounding report (:mod:`server.rag`)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine.client import ModelInfo
from engine.output import RequestOutput
from scheduler import TokenLogprobs
from server.admission import Admission
from server.errors import bad_request
from server.metrics import Metrics
from server.preprocess import chat_prompt_ids, check_unsupported, message_dicts, sampling_params
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    RAGChatCompletionChunk,
    RAGChatCompletionResponse,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from server.rag import CitationFilter, RAGContext, RAGService, SentenceStream
from server.serving import DeltaEvents, OpenAIServing, Submitted, cached_tokens, sse, usage
from server.serving_models import OpenAIServingModels
from server.structured import structured_from_request
from server.tool_parsers import StreamParser, call_id
from server.tools import ToolPlan, plan_tools

log = logging.getLogger("ragserve")


def answer(tools: ToolPlan | None, text: str, finish_reason: str) -> dict[str, Any]:
    """A choice's ``message`` and ``finish_reason``: with tools, the calls found in the text
    (``tool_calls`` unless max_tokens cut the answer: then ``length``, and the calls found
    whole are still calls) and the content beside them (null if none)."""
    if tools is None:
        return {"message": AssistantMessage(content=text), "finish_reason": finish_reason}
    content, calls = tools.parse(text)
    if calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    return {"message": AssistantMessage(
        content=content, tool_calls=[ToolCall(id=call_id(), function=FunctionCall(
            name=c.name, arguments=c.arguments)) for c in calls]),
        "finish_reason": finish_reason}


class OpenAIServingChat(OpenAIServing):
    def __init__(self, models: OpenAIServingModels, admission: Admission,
                 metrics: Metrics | None, rag: RAGService) -> None:
        super().__init__(models, admission, metrics)
        self.rag = rag
        self.tool_notes: set[str] = set()  # what was logged about tool templates, once each

    async def create_chat_completion(self, req: ChatCompletionRequest, raw: Request
                                     ) -> JSONResponse | StreamingResponse:
        arrival = time.monotonic()
        info = self.models.admit(req.model)
        check_unsupported(req)
        tools = self._tool_plan(req, info)
        self.precheck_queue(req.n)
        rag = await self._rag_prompt(req, info) if req.rag is not None else None
        ids = rag.prompt_ids if rag else chat_prompt_ids(
            info.tokenizer, req, (tools and tools.template) or self.models.chat_template,
            tools=tools.template_tools if tools else None)
        structured = await self.constraint(req, info)
        if tools is not None and tools.structured is not None:
            await tools.check(self.models.structured, info.tokenizer)
            structured = tools.structured
        params = [sampling_params(req, len(ids), info, i, structured) for i in range(req.n)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = self.submit(rid, [ids], [params], arrival)
        if req.stream:
            return StreamingResponse(self._stream(rid, req, len(ids), streams, rag, tools),
                                     media_type="text/event-stream")
        finals = await self.finals(streams, raw)
        texts = [o.text for o in finals]
        grounding = None
        if rag is not None:
            texts[0], grounding = await self.rag.check(rag, texts[0])
        choices = [
            ChatChoice(
                index=i,
                logprobs=self._logprobs(o.logprobs) if req.logprobs else None,
                stop_reason=o.stop_reason,
                **answer(tools, texts[i], o.finish_reason.value),
            )
            for i, o in enumerate(finals)
        ]
        fields = dict(id=rid, model=self.models.model_name, choices=choices,
                      usage=usage(len(ids), sum(len(o.token_ids) for o in finals),
                                  cached_tokens(finals)))
        if rag is None:
            return JSONResponse(ChatCompletionResponse(**fields).model_dump())
        return JSONResponse(RAGChatCompletionResponse(**fields, sources=rag.sources(),
                                                      grounding=grounding).model_dump())

    async def _rag_prompt(self, req: ChatCompletionRequest, info: ModelInfo) -> RAGContext:
        if req.n != 1:
            raise bad_request("rag requests support n=1 only (one grounded answer)", "n")
        max_tokens = req.max_completion_tokens or req.max_tokens
        return await self.rag.prepare(
            message_dicts(req.messages), req.rag, max_tokens,
            (info.max_prompt_len, info.max_model_len),
            lambda msgs: chat_prompt_ids(info.tokenizer, req, self.models.chat_template, msgs))

    def _tool_plan(self, req: ChatCompletionRequest, info: ModelInfo) -> ToolPlan | None:
        """The request's tools as :func:`server.tools.plan_tools` serves them; the first time
        a shipped template stands in for the served one, the log says so."""
        config = self.config
        plan = plan_tools(
            req.tools, req.tool_choice, req.parallel_tool_calls,
            parser=config.tool_call_parser, auto=config.enable_auto_tool_choice,
            engine=self.engine.name, tokenizer=info.tokenizer,
            served_template=(req.chat_template or self.models.chat_template
                             or info.tokenizer.chat_template),
            structured_in_request=structured_from_request(req) is not None)
        if plan is not None and plan.template_note and plan.template_note not in self.tool_notes:
            self.tool_notes.add(plan.template_note)
            log.info(plan.template_note)
        return plan

    def _stream(self, rid: str, req: ChatCompletionRequest, n_prompt: int,
                streams: Submitted, rag: RAGContext | None = None,
                tools: ToolPlan | None = None) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        created = int(time.time())
        name = self.models.model_name

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None,
                  **rag_fields: Any) -> str:
            """One event; ``usage`` only when asked for, a RAG field only in its own event."""
            unsent = set() if include_usage else {"usage"}
            if rag_fields:
                c = RAGChatCompletionChunk(id=rid, created=created, model=name,
                                           choices=choices, usage=usage, **rag_fields)
                unsent |= {"sources", "grounding"} - rag_fields.keys()
            else:
                c = ChatCompletionChunk(id=rid, created=created, model=name, choices=choices,
                                        usage=usage)
            return sse(c.model_dump(exclude=unsent))

        fast = DeltaEvents({"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": name}, "delta", include_usage)

        parsers: dict[int, StreamParser] = {}

        def event(i: int, o: RequestOutput) -> str:
            if tools is not None:
                return tool_event(i, o)
            if not o.finished and not req.logprobs:
                return fast(i, o.delta)
            return chunk([ChatChunkChoice(
                index=i, delta=DeltaMessage(content=o.delta),
                logprobs=self._logprobs(o.new_logprobs) if req.logprobs else None,
                finish_reason=o.finish_reason.value if o.finished else None,
                stop_reason=o.stop_reason if o.finished else None)])

        def tool_event(i: int, o: RequestOutput) -> str:
            """Content as soon as it cannot start a call, calls as ``delta.tool_calls``."""
            parser = parsers.get(i)
            if parser is None:  # one parser per choice, for the choice's whole stream
                parser = parsers[i] = tools.stream()
            d = parser.feed(o.delta)
            if o.finished:
                d.extend(parser.finish())
            reason = o.finish_reason.value if o.finished else None
            if reason == "stop" and parser.called:
                reason = "tool_calls"
            if not d and not o.finished and not req.logprobs:
                return ""
            calls = [DeltaToolCall(index=c.index, id=c.id, type="function" if c.id else None,
                                   function=DeltaFunctionCall(
                                       name=c.name, arguments=c.arguments if c.id is None
                                       else ""))
                     for c in d.calls]
            return chunk([ChatChunkChoice(
                index=i, delta=DeltaMessage(content=d.content or None, tool_calls=calls or None),
                logprobs=self._logprobs(o.new_logprobs) if req.logprobs else None,
                finish_reason=reason, stop_reason=o.stop_reason if o.finished else None)])

        extra = {"sources": rag.sources()} if rag is not None else {}
        prologue = [chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                       content=""))], **extra)
                    for i in range(len(streams))]
        usage_event = (lambda u: chunk([], u)) if include_usage else None
        if rag is None:
            return self.sse_stream(streams, n_prompt, prologue, event, usage_event)
        return self._rag_stream(streams, n_prompt, prologue, rag, chunk, fast, usage_event)

    async def _rag_stream(self, streams: Submitted, n_prompt: int, prologue: list[str],
                          rag: RAGContext, chunk: Callable[..., str], fast: DeltaEvents,
                          usage_event: Callable[[Usage], str] | None) -> AsyncIterator[str]:
        """A RAG answer's stream: ``sources`` in the first event; the grounding report in an
        event of its own after the finish. The text: with ``citations`` auto or attribute,
        sentence by sentence, each cited as it completes; with ``model``, token by token
        without invalid citations (held back only while a ``[`` may still become one). With
        --grounding strip the answer is sent once checked, since unsupported sentences go."""
        strip = rag.grounding == "strip"
        by_sentence = None if strip or rag.citations == "model" else SentenceStream(self.rag,
                                                                                     rag)
        cite = CitationFilter(len(rag.passages))

        async def event(i: int, o: RequestOutput) -> str:
            if o.finished:
                if by_sentence is not None:
                    delta = await by_sentence.feed(o.text, final=True)
                    report = by_sentence.report()
                else:
                    text, report = await self.rag.check(rag, o.text)
                    delta = text if strip else cite.feed(text, final=True)
                return (chunk([ChatChunkChoice(
                    index=0, delta=DeltaMessage(content=delta),
                    finish_reason=o.finish_reason.value, stop_reason=o.stop_reason)])
                    + chunk([], grounding=report))
            if by_sentence is not None:
                delta = await by_sentence.feed(o.text, final=False)
            else:
                delta = "" if strip else cite.feed(o.text, final=False)
            return fast(0, delta) if delta else ""

        async for e in self.sse_stream(streams, n_prompt, prologue, event, usage_event):
            yield e

    def _logprobs(self, logprobs: Sequence[TokenLogprobs]) -> ChatLogprobs:
        def top(tid: int, lp: float) -> TopLogprob:
            text = self.token_text(tid)
            return TopLogprob(token=text, logprob=lp, bytes=list(text.encode()))

        return ChatLogprobs(content=[
            TokenLogprob(**top(lp.token_id, lp.logprob).model_dump(),
                         top_logprobs=[top(t, v) for t, v in lp.top])
            for lp in logprobs
        ])
