"""The base of the serving modules that generate: admission, engine streams, results as JSON
or as SSE events, errors as :func:`server.errors.api_error` says.

One subclass per endpoint family (as vLLM's ``serving_engine.py``): ``serving_chat``,
``serving_completion``; a new family (``/v1/responses``) is a new ``serving_*`` module on
:class:`OpenAIServing`. The served model's name and state are :mod:`server.serving_models`'.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

from fastapi import Request

from engine.client import ModelInfo
from engine.output import RequestOutput
from scheduler import FinishReason, SamplingParams, StructuredOutput
from server.admission import (
    KEEPALIVE,
    KEEPALIVE_SECONDS,
    Admission,
    KeepAlive,
    Served,
    first_within,
)
from server.errors import (
    GENERATION_ERRORS,
    ClientDisconnected,
    api_error,
    engine_step_failed,
)
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest, PromptTokensDetails, Usage
from server.serving_models import OpenAIServingModels
from server.structured import structured_from_request

log = logging.getLogger(__name__)


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def usage(n_prompt: int, n_out: int, n_cached: int = 0) -> Usage:
    return Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=n_cached))


def cached_tokens(finals: Iterable[RequestOutput]) -> int:
    """Prompt tokens reused over ``finals``, each distinct prompt counted once (as usage counts
    its tokens once for ``n`` samples), by its least-cached sample."""
    per_prompt: dict[tuple[int, ...], int] = {}
    for o in finals:
        n = per_prompt.get(o.prompt_token_ids)
        per_prompt[o.prompt_token_ids] = o.num_cached_tokens if n is None else min(
            n, o.num_cached_tokens)
    return sum(per_prompt.values())


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


async def merged(streams: Sequence[AsyncIterator[RequestOutput]],
                 started: Callable[[], None] | None = None
                 ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they arrive, tagged with their index. ``started`` is
    called when the engine counts the requests: an engine's ``generate`` counts its request
    before its first ``await``, so ``started`` runs in the same event-loop step as the
    stream's first step (one stream: just before it, in this task; several: queued right
    after the pumps' first steps, which run back to back). Until then admission's
    reservation counts them: no other request's check sees them counted twice (refused at
    the queue's edge) or by neither (admitted past the bound)."""
    loop = asyncio.get_running_loop()
    if len(streams) == 1:  # the common case: no fan-in task or queue
        if started is not None:
            started()  # no await before the stream's first step, which counts it
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
    if started is not None:
        loop.call_soon(started)  # after the pumps' first steps, queued above
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
    """What every generating endpoint shares: the served model's checks, admission to the
    engine's queue, the engine streams, and the two shapes of a result (all final outputs, or
    an SSE body)."""

    def __init__(self, models: OpenAIServingModels, admission: Admission,
                 metrics: Metrics | None = None) -> None:
        self.models = models
        self.engine = models.engine
        self.config = models.config
        self.admission = admission
        self.metrics = metrics

    async def constraint(self, req: ChatCompletionRequest | CompletionRequest,
                         info: ModelInfo) -> StructuredOutput | None:
        """The request's structured-output constraint, compiled once off the event loop
        (:mod:`server.structured`); a 400 naming the field if it cannot be enforced."""
        found = structured_from_request(req)
        if found is None:
            return None
        so, param = found
        await self.models.structured.check(info.tokenizer, so, param)
        return so

    # -- admission -----------------------------------------------------------------------

    def precheck_queue(self, n_new: int) -> None:
        """The queue check before the request's costly part (templating, tokenizing,
        retrieval), so that a refusal under overload costs little; :meth:`check_queue`
        decides (and reserves) once the request is ready to go in."""
        self.admission.precheck(self.engine.projected_waiting, n_new)

    def check_queue(self, n_new: int, arrival: float) -> int:
        """429 if admitting ``n_new`` requests that arrived at ``arrival`` would leave more
        than --max-queue-len waiting for a KV slot, or one not expected to start well within
        --max-queue-wait of its arrival (requests that find a free slot at once do not
        queue): :class:`server.admission.Admission`. Returns the admission's reservation."""
        return self.admission.admit(self.engine.projected_waiting, n_new,
                                    time.monotonic() - arrival)

    def submit(self, prefix: str, prompts: Sequence[list[int]],
               params: Sequence[Sequence[SamplingParams]], arrival: float) -> Submitted:
        """One engine request per prompt and choice, ids ``{prefix}-{prompt}-{choice}``."""
        reservation = self.check_queue(sum(len(p) for p in params), arrival)
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
        release = None if reservation is None else lambda: self.admission.release(reservation)
        return first_within(merged(streams, release), streams.arrival, bound, keepalive,
                            release, drain=lambda: self.admission.drain_seconds(1),
                            starved=lambda: self.engine.projected_waiting(0) > 0)

    def _served(self, served: Served, i: int, o: RequestOutput) -> None:
        """For admission: the steps of a running request, and its end (:class:`Served`);
        for /v1/buckets and the length histograms: a finished request's lengths."""
        served.output(i, o.produced_at, len(o.token_ids), o.finished, time.monotonic())
        if o.finished and o.finish_reason != FinishReason.ERROR and o.prompt_token_ids:
            prompt, generated = len(o.prompt_token_ids), len(o.token_ids)
            self.models.lengths.observe(prompt, generated)
            if self.metrics is not None:
                self.metrics.observe_lengths(prompt, prompt + generated)

    # -- results -------------------------------------------------------------------------

    async def finals(self, streams: Submitted, raw: Request) -> list[RequestOutput]:
        """Each stream's final output, in order; cancelled (its requests aborted) if the
        client disconnects first. A failure raises: the app's handlers answer it."""
        return await until_disconnected(raw, self._finals(streams))

    async def _finals(self, streams: Submitted) -> list[RequestOutput]:
        last: dict[int, RequestOutput] = {}
        served = Served(self.admission, streams.reservation)
        try:
            async for item in self._outputs(streams, stream=False):
                i, o = item  # type: ignore[misc]  (no keepalives when not streaming)
                self._served(served, i, o)
                last[i] = o
        finally:
            served.close()
        if any(o.finish_reason == FinishReason.ERROR for o in last.values()):
            raise engine_step_failed()
        return [last[i] for i in range(len(streams))]

    async def sse_stream(self, streams: Submitted, n_prompt: int, prologue: list[str],
                         event: Callable[[int, RequestOutput], str | Awaitable[str]],
                         usage_event: Callable[[Usage], str] | None) -> AsyncIterator[str]:
        """The SSE body: ``prologue``, one ``event`` per output with new text (or a finish; an
        async ``event`` is awaited, an empty one skipped), an error event if the engine fails,
        the usage event when asked for, ``[DONE]``.

        The prologue (the chat ``role`` chunk, RAG ``sources``, the completions echo) goes out
        with the engine's first output, not before the prefill: as in vLLM, the first event a
        client sees marks the first token, which is what ``vllm bench serve``, genai-perf and
        llmperf time as TTFT."""
        n_out, done = 0, []
        served = Served(self.admission, streams.reservation)
        try:
            async for item in self._outputs(streams, stream=True):
                if item is KEEPALIVE:  # waiting for a slot: an SSE comment, not a chunk
                    yield ": waiting for a sequence slot\n\n"
                    continue
                i, o = item
                self._served(served, i, o)
                if prologue:
                    for e in prologue:
                        yield e
                    prologue = []
                if o.finish_reason == FinishReason.ERROR:
                    yield sse(engine_step_failed(streamed=True).body())
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
                    done.append(o)
                else:
                    self._delivered(o)
        except GENERATION_ERRORS as err:
            log.warning("a stream ended with an error event: %s", err)
            for e in prologue:  # no output came before the failure
                yield e
            yield sse(api_error(err).body())
        finally:  # also when the client went away: its streams left their slots
            served.close()
        if usage_event is not None:
            yield usage_event(usage(n_prompt, n_out, cached_tokens(done)))
        yield sse("[DONE]")

    def _delivered(self, o: RequestOutput) -> None:
        """Called when Starlette comes back for the next event, i.e. this one was written."""
        if self.metrics is not None and o.produced_at:
            self.metrics.observe_delivery(time.monotonic() - o.produced_at)

    def token_text(self, token_id: int) -> str:
        return self.models.info.tokenizer.decode([token_id])
