"""POST /v1/chat/completions: chat requests -> engine requests; outputs -> a
``chat.completion`` or its ``chat.completion.chunk`` events; with ``rag``, grounded answers
with their sources and grounding report (:mod:`server.rag`)."""

from __future__ import annotations

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
    DeltaMessage,
    RAGChatCompletionChunk,
    RAGChatCompletionResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from server.rag import CitationFilter, RAGContext, RAGService, SentenceStream
from server.serving import DeltaEvents, OpenAIServing, Submitted, sse, usage
from server.serving_models import OpenAIServingModels


class OpenAIServingChat(OpenAIServing):
    def __init__(self, models: OpenAIServingModels, admission: Admission,
                 metrics: Metrics | None, rag: RAGService) -> None:
        super().__init__(models, admission, metrics)
        self.rag = rag

    async def create_chat_completion(self, req: ChatCompletionRequest, raw: Request
                                     ) -> JSONResponse | StreamingResponse:
        arrival = time.monotonic()
        info = self.models.admit(req.model)
        check_unsupported(req)
        self.precheck_queue(req.n)
        rag = await self._rag_prompt(req, info) if req.rag is not None else None
        ids = rag.prompt_ids if rag else chat_prompt_ids(info.tokenizer, req,
                                                         self.models.chat_template)
        structured = await self.constraint(req, info)
        params = [sampling_params(req, len(ids), info, i, structured) for i in range(req.n)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = self.submit(rid, [ids], [params], arrival)
        if req.stream:
            return StreamingResponse(self._stream(rid, req, len(ids), streams, rag),
                                     media_type="text/event-stream")
        finals = await self.finals(streams, raw)
        texts = [o.text for o in finals]
        grounding = None
        if rag is not None:
            texts[0], grounding = await self.rag.check(rag, texts[0])
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=texts[i]),
                logprobs=self._logprobs(o.logprobs) if req.logprobs else None,
                finish_reason=o.finish_reason.value,
                stop_reason=o.stop_reason,
            )
            for i, o in enumerate(finals)
        ]
        fields = dict(id=rid, model=self.models.model_name, choices=choices,
                      usage=usage(len(ids), sum(len(o.token_ids) for o in finals)))
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

    def _stream(self, rid: str, req: ChatCompletionRequest, n_prompt: int,
                streams: Submitted, rag: RAGContext | None = None) -> AsyncIterator[str]:
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

        def event(i: int, o: RequestOutput) -> str:
            if not o.finished and not req.logprobs:
                return fast(i, o.delta)
            return chunk([ChatChunkChoice(
                index=i, delta=DeltaMessage(content=o.delta),
                logprobs=self._logprobs(o.new_logprobs) if req.logprobs else None,
                finish_reason=o.finish_reason.value if o.finished else None,
                stop_reason=o.stop_reason if o.finished else None)])

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
