"""OpenAI requests -> engine requests; engine outputs -> JSON or SSE chunks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from bucketing.sample import LengthSample
from scheduler import FinishReason, SamplingParams, TokenLogprobs
from server.admission import (
    KEEPALIVE,
    KEEPALIVE_SECONDS,
    Admission,
    KeepAlive,
    QueueTimeout,
    first_within,
)
from server.config import ServerConfig
from server.engine_client import (
    EngineClient,
    EngineDead,
    EngineRequestError,
    EngineState,
    ModelInfo,
)
from server.errors import APIError, bad_request
from server.metrics import Metrics
from server.output import RequestOutput
from server.preprocess import (
    chat_prompt_ids,
    check_unsupported,
    completion_prompts,
    echo_texts,
    message_dicts,
    prompt_list,
    sampling_params,
)
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from server.rag import CitationFilter, RAGContext, RAGService, SentenceStream

ENGINE_FAILED = "the engine failed while generating this response"
RETRY_AFTER_LOADING = "5"


def queue_timeout_error(e: QueueTimeout, admission: Admission) -> APIError:
    """503 for a request that waited past --max-queue-wait (the server's capacity, not the
    request, is the problem), with the expected time for the queue to drain a slot."""
    return APIError(503, str(e), code="queue_timeout",
                    headers={"Retry-After": admission.retry_after(1)})


class ClientDisconnected(Exception):
    pass


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class DeltaEvents:
    """The common stream event (one choice, new text, not finished), written from a
    precomputed prefix: a json.dumps of the text instead of building a pydantic model per
    token, which matters with hundreds of concurrent streams."""

    def __init__(self, head: dict[str, Any], key: str, include_usage: bool) -> None:
        self.head = "data: " + json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": [{'
        self.key = key  # "delta" (chat) or "text" (completions)
        self.tail = "]" + (', "usage": null' if include_usage else "") + "}\n\n"

    def __call__(self, index: int, text: str) -> str:
        body = json.dumps(text, ensure_ascii=False)
        value = f'{{"content": {body}}}' if self.key == "delta" else body
        return (f'{self.head}"index": {index}, "{self.key}": {value}, "logprobs": null, '
                f'"finish_reason": null, "stop_reason": null}}{self.tail}')


async def until_disconnected(request: Request, coro: Any) -> Any:
    """Run ``coro``; if the client disconnects first, cancel it (its requests abort)."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(coro), asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected


async def merged(streams: Sequence[AsyncIterator[RequestOutput]]
                 ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they arrive, tagged with their index."""
    if len(streams) == 1:  # the common case: no fan-in task or queue
        try:
            async for o in streams[0]:
                yield 0, o
        finally:
            await streams[0].aclose()
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async for o in s:
                await q.put((i, o))
            await q.put((i, done))
        except Exception as e:  # handed to the consumer (cancellation propagates)
            await q.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await q.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        # a cancelled pump closes its stream, whose ``finally`` aborts the unfinished request
        await asyncio.gather(*tasks, return_exceptions=True)


class Submitted(list):
    """The engine streams of one HTTP request (one per prompt and choice), and its arrival
    time (``time.monotonic()``), from which its queue wait is bounded."""

    def __init__(self, streams: Sequence[AsyncIterator[RequestOutput]], arrival: float,
                 reservation: int | None = None) -> None:
        super().__init__(streams)
        self.arrival = arrival
        self.reservation = reservation  # released once the engine has the requests


class OpenAIServing:
    """Chat and completions over an engine (either: see :mod:`server.engine_client`)."""

    def __init__(self, engine: EngineClient, config: ServerConfig,
                 metrics: Metrics | None = None, rag: RAGService | None = None) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.rag = rag or RAGService(config, metrics)
        self.chat_template = config.chat_template_text()
        self.admission = Admission(config.max_num_seqs, config.max_queue_len,
                                   config.max_queue_wait)
        #: finished requests' lengths, for GET /v1/buckets (bucket planning)
        self.lengths = LengthSample()

    # -- checks --------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        info = self.engine.info
        return info.name if info is not None else "loading"

    @property
    def info(self) -> ModelInfo:
        """The loaded model (call after :meth:`check_ready`)."""
        info = self.engine.info
        if info is None:  # ready implies loaded; a race with a failing engine lands here
            raise APIError(503, "the engine is not available", code="engine_unavailable")
        return info

    def check_ready(self) -> None:
        if self.engine.state == EngineState.READY:
            return
        if self.engine.state == EngineState.LOADING:
            raise APIError(503, "the model is still loading", code="model_loading",
                           headers={"Retry-After": RETRY_AFTER_LOADING})
        raise APIError(503, f"the engine is not available: {self.engine.error or 'stopped'}",
                       code="engine_unavailable")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves "
                                f"`{self.model_name}`).", param="model", code="model_not_found")

    def check_queue(self, n_new: int) -> int:
        """429 if admitting ``n_new`` requests would leave more than --max-queue-len waiting
        for a KV slot, or one expected to wait longer than --max-queue-wait (requests that
        find a free slot at once do not queue): :class:`server.admission.Admission`. Returns
        the admission's reservation."""
        return self.admission.admit(self.engine.projected_waiting, n_new)

    def precheck_queue(self, n_new: int) -> None:
        """The queue check before the request's costly part (templating, tokenizing,
        retrieval), so that a refusal under overload costs little; :meth:`check_queue`
        decides (and reserves) once the request is ready to go in."""
        self.admission.precheck(self.engine.projected_waiting, n_new)

    def admit(self, model: str | None) -> ModelInfo:
        """Ready and the right model name, or the error that says which is not."""
        self.check_ready()
        self.check_model(model)
        return self.info

    def _submit(self, prefix: str, prompts: Sequence[list[int]],
                params: Sequence[Sequence[SamplingParams]], arrival: float
                ) -> Submitted:
        reservation = self.check_queue(sum(len(p) for p in params))
        return Submitted([self.engine.generate(f"{prefix}-{i}-{j}", ids, sp, arrival)
                          for i, (ids, sps) in enumerate(zip(prompts, params))
                          for j, sp in enumerate(sps)], arrival, reservation)

    def _outputs(self, streams: Submitted, stream: bool
                 ) -> AsyncIterator[tuple[int, RequestOutput] | KeepAlive]:
        """The streams' outputs, merged; :class:`QueueTimeout` if none comes within
        --max-queue-wait of arrival; while waiting, a stream gets :data:`KEEPALIVE` items."""
        bound = self.config.max_queue_wait
        keepalive = min(KEEPALIVE_SECONDS, bound / 3) if stream else None
        reservation = streams.reservation
        return first_within(merged(streams), streams.arrival, bound, keepalive,
                            None if reservation is None else
                            lambda: self.admission.release(reservation))

    def _served(self, first_at: dict[int, float], i: int, o: RequestOutput) -> None:
        """For admission: the service time runs from a request's first output to its end."""
        now = time.monotonic()
        start = first_at.setdefault(i, now)
        if o.finished:
            self.admission.observe_service(now - start, now)
            if o.finish_reason != FinishReason.ERROR and o.prompt_token_ids:
                prompt, generated = len(o.prompt_token_ids), len(o.token_ids)
                self.lengths.observe(prompt, generated)
                if self.metrics is not None:
                    self.metrics.observe_lengths(prompt, prompt + generated)

    # -- chat ----------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Any:
        arrival = time.monotonic()
        info = self.admit(req.model)
        check_unsupported(req)
        self.precheck_queue(req.n)
        rag = await self._rag_prompt(req, info) if req.rag is not None else None
        ids = rag.prompt_ids if rag else chat_prompt_ids(info.tokenizer, req, self.chat_template)
        params = [sampling_params(req, len(ids), info, i) for i in range(req.n)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = self._submit(rid, [ids], [params], arrival)
        if req.stream:
            return StreamingResponse(self._chat_stream(rid, req, len(ids), streams, rag),
                                     media_type="text/event-stream")
        finals = await until_disconnected(raw, self._finals(streams))
        texts = [o.text for o in finals]
        if rag is not None:
            texts[0], grounding = await self.rag.check(rag, texts[0])
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=texts[i]),
                logprobs=self._chat_logprobs(o.logprobs) if req.logprobs else None,
                finish_reason=o.finish_reason.value,
                stop_reason=o.stop_reason,
            )
            for i, o in enumerate(finals)
        ]
        n_out = sum(len(o.token_ids) for o in finals)
        usage = Usage(prompt_tokens=len(ids), completion_tokens=n_out,
                      total_tokens=len(ids) + n_out)
        body = ChatCompletionResponse(id=rid, model=self.model_name, choices=choices,
                                      usage=usage).model_dump()
        if rag is not None:
            body.update(sources=rag.sources(), grounding=grounding)
        return JSONResponse(body)

    async def _rag_prompt(self, req: ChatCompletionRequest, info: ModelInfo) -> RAGContext:
        if req.n != 1:
            raise bad_request("rag requests support n=1 only (one grounded answer)", "n")
        max_tokens = req.max_completion_tokens or req.max_tokens
        return await self.rag.prepare(
            message_dicts(req.messages), req.rag, max_tokens,
            (info.max_prompt_len, info.max_model_len),
            lambda msgs: chat_prompt_ids(info.tokenizer, req, self.chat_template, msgs))

    def _chat_stream(self, rid: str, req: ChatCompletionRequest, n_prompt: int,
                     streams: Submitted,
                     rag: RAGContext | None = None) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        created = int(time.time())

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None,
                  **extra: Any) -> str:
            c = ChatCompletionChunk(id=rid, created=created, model=self.model_name,
                                    choices=choices, usage=usage).model_dump()
            if not include_usage:
                c.pop("usage")
            return sse({**c, **extra})

        fast = DeltaEvents({"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": self.model_name}, "delta", include_usage)

        def event(i: int, o: RequestOutput) -> str:
            if not o.finished and not req.logprobs:
                return fast(i, o.delta)
            return chunk([ChatChunkChoice(
                index=i, delta=DeltaMessage(content=o.delta),
                logprobs=self._chat_logprobs(o.new_logprobs) if req.logprobs else None,
                finish_reason=o.finish_reason.value if o.finished else None,
                stop_reason=o.stop_reason if o.finished else None)])

        extra = {"sources": rag.sources()} if rag is not None else {}
        prologue = [chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                       content=""))], **extra)
                    for i in range(len(streams))]
        usage_event = (lambda u: chunk([], u)) if include_usage else None
        if rag is None:
            return self._sse_stream(streams, n_prompt, prologue, event, usage_event)
        return self._rag_sse_stream(streams, n_prompt, prologue, rag, chunk, fast, usage_event)

    async def _rag_sse_stream(self, streams: Submitted, n_prompt: int,
                              prologue: list[str], rag: RAGContext,
                              chunk: Callable[..., str], fast: DeltaEvents,
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

        async for e in self._sse_stream(streams, n_prompt, prologue, event, usage_event):
            yield e

    # -- completions ---------------------------------------------------------------------

    async def completions(self, req: CompletionRequest, raw: Request) -> Any:
        arrival = time.monotonic()
        info = self.admit(req.model)
        check_unsupported(req)
        self.precheck_queue(req.n * len(prompt_list(req.prompt)))
        prompts = completion_prompts(info.tokenizer, req.prompt)
        params = [[sampling_params(req, len(ids), info, j) for j in range(req.n)]
                  for ids in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = self._submit(rid, prompts, params, arrival)
        echoes = echo_texts(info.tokenizer, req.prompt) if req.echo else [""] * len(prompts)
        n_prompt = sum(len(ids) for ids in prompts)
        if req.stream:
            return StreamingResponse(self._completion_stream(rid, req, n_prompt, echoes,
                                                             streams),
                                     media_type="text/event-stream")
        finals = await until_disconnected(raw, self._finals(streams))
        choices = [
            CompletionChoice(
                index=i,
                text=echoes[i // req.n] + o.text,
                logprobs=(self._completion_logprobs(o.logprobs, len(echoes[i // req.n]))
                          if req.logprobs is not None else None),
                finish_reason=o.finish_reason.value,
                stop_reason=o.stop_reason,
            )
            for i, o in enumerate(finals)
        ]
        n_out = sum(len(o.token_ids) for o in finals)
        usage = Usage(prompt_tokens=n_prompt, completion_tokens=n_out,
                      total_tokens=n_prompt + n_out)
        return JSONResponse(CompletionResponse(id=rid, model=self.model_name, choices=choices,
                                               usage=usage).model_dump())

    def _completion_stream(self, rid: str, req: CompletionRequest, n_prompt: int,
                           echoes: list[str], streams: Submitted
                           ) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        created = int(time.time())
        sent = [0] * len(streams)  # characters sent per choice (for text_offset)

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            c = CompletionResponse(id=rid, created=created, model=self.model_name,
                                   choices=choices, usage=usage).model_dump()
            if not include_usage:
                c.pop("usage")
            return sse(c)

        fast = DeltaEvents({"id": rid, "object": "text_completion", "created": created,
                            "model": self.model_name}, "text", include_usage)

        def event(i: int, o: RequestOutput) -> str:
            offset, sent[i] = sent[i], sent[i] + len(o.delta)
            if not o.finished and req.logprobs is None:
                return fast(i, o.delta)
            return chunk([CompletionChoice(
                index=i, text=o.delta,
                logprobs=(self._completion_logprobs(o.new_logprobs, offset)
                          if req.logprobs is not None else None),
                finish_reason=o.finish_reason.value if o.finished else None,
                stop_reason=o.stop_reason if o.finished else None)])

        prologue = []
        if req.echo:
            for i in range(len(streams)):
                text = echoes[i // req.n]
                sent[i] = len(text)
                prologue.append(chunk([CompletionChoice(index=i, text=text,
                                                        finish_reason=None)]))
        return self._sse_stream(streams, n_prompt, prologue, event,
                                (lambda u: chunk([], u)) if include_usage else None)

    async def _sse_stream(self, streams: Submitted, n_prompt: int,
                          prologue: list[str],
                          event: Callable[[int, RequestOutput], str | Awaitable[str]],
                          usage_event: Callable[[Usage], str] | None) -> AsyncIterator[str]:
        """The SSE body shared by chat and completions: ``prologue``, one ``event`` per output
        with new text (or a finish; an async ``event`` is awaited, an empty one skipped), an
        error event if the engine fails, the usage event when asked for, ``[DONE]``.

        The prologue (the chat ``role`` chunk, RAG ``sources``, the completions echo) goes out
        with the engine's first output, not before the prefill: as in vLLM, the first event a
        client sees marks the first token, which is what ``vllm bench serve``, genai-perf and
        llmperf time as TTFT."""
        n_out = 0
        first_at: dict[int, float] = {}
        try:
            async for item in self._outputs(streams, stream=True):
                if item is KEEPALIVE:  # waiting for a slot: an SSE comment, not a chunk
                    yield ": waiting for a sequence slot\n\n"
                    continue
                i, o = item
                self._served(first_at, i, o)
                if prologue:
                    for e in prologue:
                        yield e
                    prologue = []
                if o.finish_reason == FinishReason.ERROR:
                    yield sse(APIError(500, ENGINE_FAILED).body())
                    continue
                if not o.delta and not o.finished:
                    continue
                e = event(i, o)
                if not isinstance(e, str):
                    e = await e
                if e:
                    yield e
                if o.finished:
                    n_out += len(o.token_ids)
                else:
                    self._delivered(o)
        except (EngineDead, EngineRequestError, QueueTimeout) as err:
            for e in prologue:  # no output came before the failure
                yield e
            if isinstance(err, QueueTimeout):
                yield sse(queue_timeout_error(err, self.admission).body())
            elif isinstance(err, EngineDead):  # the engine stopped under us
                yield sse(APIError(503, f"the engine is not available: {err}",
                                   code="engine_unavailable").body())
            else:
                yield sse(APIError(err.status, str(err)).body())
        if usage_event is not None:
            yield usage_event(Usage(prompt_tokens=n_prompt, completion_tokens=n_out,
                                    total_tokens=n_prompt + n_out))
        yield sse("[DONE]")

    # -- shared --------------------------------------------------------------------------

    def _delivered(self, o: RequestOutput) -> None:
        """Called when Starlette comes back for the next event, i.e. this one was written."""
        if self.metrics is not None and o.produced_at:
            self.metrics.observe_delivery(time.monotonic() - o.produced_at)

    async def _finals(self, streams: Submitted) -> list[RequestOutput]:
        last: dict[int, RequestOutput] = {}
        first_at: dict[int, float] = {}
        try:
            async for item in self._outputs(streams, stream=False):
                i, o = item  # type: ignore[misc]  (no keepalives when not streaming)
                self._served(first_at, i, o)
                last[i] = o
        except QueueTimeout as e:
            raise queue_timeout_error(e, self.admission) from None
        except EngineDead as e:
            raise APIError(503, f"the engine is not available: {e}",
                           code="engine_unavailable") from None
        except EngineRequestError as e:
            raise APIError(e.status, str(e)) from None
        if any(o.finish_reason == FinishReason.ERROR for o in last.values()):
            raise APIError(500, f"{ENGINE_FAILED}; the server keeps serving other requests",
                           code="engine_step_failed")
        return [last[i] for i in range(len(streams))]

    def _token_text(self, token_id: int) -> str:
        return self.info.tokenizer.decode([token_id])

    def _chat_logprobs(self, logprobs: Sequence[TokenLogprobs]) -> ChatLogprobs:
        def top(tid: int, lp: float) -> TopLogprob:
            text = self._token_text(tid)
            return TopLogprob(token=text, logprob=lp, bytes=list(text.encode()))

        return ChatLogprobs(content=[
            TokenLogprob(**top(lp.token_id, lp.logprob).model_dump(),
                         top_logprobs=[top(t, v) for t, v in lp.top])
            for lp in logprobs
        ])

    def _completion_logprobs(self, logprobs: Sequence[TokenLogprobs],
                             offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in logprobs:
            text = self._token_text(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self._token_text(t): v for t, v in lp.top} |
                                    {text: lp.logprob})
            out.text_offset.append(offset)
            offset += len(text)
        return out
