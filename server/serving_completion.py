"""POST /v1/completions: prompts -> engine requests (one per prompt and choice); outputs -> a
``text_completion`` or its events."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine.output import RequestOutput
from scheduler import TokenLogprobs
from server.preprocess import (
    check_unsupported,
    completion_prompts,
    echo_texts,
    prompt_list,
    sampling_params,
)
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from server.serving import DeltaEvents, OpenAIServing, Submitted, cached_tokens, sse, usage


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, req: CompletionRequest, raw: Request
                                ) -> JSONResponse | StreamingResponse:
        arrival = time.monotonic()
        info = self.models.admit(req.model)
        check_unsupported(req)
        self.precheck_queue(req.n * len(prompt_list(req.prompt)))
        structured = await self.constraint(req, info)
        prompts = completion_prompts(info.tokenizer, req.prompt)
        params = [[sampling_params(req, len(ids), info, j, structured) for j in range(req.n)]
                  for ids in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = self.submit(rid, prompts, params, arrival)
        echoes = echo_texts(info.tokenizer, req.prompt) if req.echo else [""] * len(prompts)
        n_prompt = sum(len(ids) for ids in prompts)
        if req.stream:
            return StreamingResponse(self._stream(rid, req, n_prompt, echoes, streams),
                                     media_type="text/event-stream")
        finals = await self.finals(streams, raw)
        choices = [
            CompletionChoice(
                index=i,
                text=echoes[i // req.n] + o.text,
                logprobs=(self._logprobs(o.logprobs, len(echoes[i // req.n]))
                          if req.logprobs is not None else None),
                finish_reason=o.finish_reason.value,
                stop_reason=o.stop_reason,
            )
            for i, o in enumerate(finals)
        ]
        return JSONResponse(CompletionResponse(
            id=rid, model=self.models.model_name, choices=choices,
            usage=usage(n_prompt, sum(len(o.token_ids) for o in finals),
                        cached_tokens(finals))).model_dump())

    def _stream(self, rid: str, req: CompletionRequest, n_prompt: int, echoes: list[str],
                streams: Submitted) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        created = int(time.time())
        name = self.models.model_name
        sent = [0] * len(streams)  # characters sent per choice (for text_offset)

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            c = CompletionResponse(id=rid, created=created, model=name, choices=choices,
                                   usage=usage)
            return sse(c.model_dump(exclude=None if include_usage else {"usage"}))

        fast = DeltaEvents({"id": rid, "object": "text_completion", "created": created,
                            "model": name}, "text", include_usage)

        def event(i: int, o: RequestOutput) -> str:
            offset, sent[i] = sent[i], sent[i] + len(o.delta)
            if not o.finished and req.logprobs is None:
                return fast(i, o.delta)
            return chunk([CompletionChoice(
                index=i, text=o.delta,
                logprobs=(self._logprobs(o.new_logprobs, offset)
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
        return self.sse_stream(streams, n_prompt, prologue, event,
                               (lambda u: chunk([], u)) if include_usage else None)

    def _logprobs(self, logprobs: Sequence[TokenLogprobs], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in logprobs:
            text = self.token_text(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.token_text(t): v for t, v in lp.top} |
                                    {text: lp.logprob})
            out.text_offset.append(offset)
            offset += len(text)
        return out
