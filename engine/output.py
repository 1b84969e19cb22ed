"""The one loop over step outputs: incremental detokenization, stop strings, finish reasons.

Detokenization uses ``tokenizers``' ``DecodeStream`` (primed with the end of the prompt), which
holds back a token until its bytes form complete UTF-8, so no text ever carries half a
character. With stop strings, the last ``len(longest stop) - 1`` characters are held back from
streamed deltas until they can no longer start a stop string.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers.decoders import DecodeStream

from scheduler import FinishReason, SamplingParams, StepOutput, TokenLogprobs

PROMPT_PRIME_TOKENS = 6


@dataclass(frozen=True)
class RequestOutput:
    """One request after a step (a snapshot): cumulative text and tokens, and what is new."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    text: str
    delta: str
    token_ids: tuple[int, ...]
    new_token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...]
    new_logprobs: tuple[TokenLogprobs, ...]
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    produced_at: float = 0.0  # time.monotonic() when the engine made this output
    num_cached_tokens: int = 0  # prompt tokens whose KV was reused (vLLM's field): not computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _RequestText:
    """Per-request detokenization and stop-string state."""

    def __init__(self, tokenizer: Any, request_id: str, prompt_token_ids: Sequence[int],
                 params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.request_id = request_id
        self.prompt_token_ids = tuple(prompt_token_ids)
        self.params = params
        self.stream = DecodeStream(ids=list(prompt_token_ids[-PROMPT_PRIME_TOKENS:]),
                                   skip_special_tokens=params.skip_special_tokens)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.full = ""  # all decoded text (the visible text may be cut at a stop string)
        self.emitted = 0  # characters of the visible text already sent as deltas
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    def feed(self, step: StepOutput) -> RequestOutput:
        self.token_ids.extend(step.new_token_ids)
        self.logprobs.extend(step.logprobs)
        start = len(self.full)
        for tok in step.new_token_ids:
            piece = self.stream.step(self.tokenizer._tokenizer, tok)
            if piece:
                self.full += piece
        reason, stop_reason, visible = step.finish_reason, None, self.full
        if reason == FinishReason.STOP and step.new_token_ids:
            last = step.new_token_ids[-1]
            if last in self.params.stop_token_ids:
                stop_reason = last
        if self.params.stop:
            hit = self._find_stop(start)
            if hit is not None:
                i, stop = hit
                reason, stop_reason = FinishReason.STOP, stop
                visible = self.full[: i + len(stop) if self.params.include_stop_str_in_output
                                    else i]
        end = len(visible) if reason is not None else max(self.emitted, len(visible) - self.hold)
        delta, self.emitted = visible[self.emitted : end], end
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            text=visible,
            delta=delta,
            token_ids=tuple(self.token_ids),
            new_token_ids=tuple(step.new_token_ids),
            logprobs=tuple(self.logprobs),
            new_logprobs=tuple(step.logprobs),
            finish_reason=reason,
            stop_reason=stop_reason,
            produced_at=time.monotonic(),
            num_cached_tokens=step.num_cached_tokens,
        )

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        """The earliest stop string in the new text (or straddling into it)."""
        window = max(0, start - self.hold)
        hits = [(i, s) for s in self.params.stop if (i := self.full.find(s, window)) >= 0]
        return min(hits) if hits else None


class OutputProcessor:
    """Turns StepOutputs into RequestOutputs; reports requests a stop string finished."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestText] = {}

    def add(self, request_id: str, prompt_token_ids: Sequence[int],
            params: SamplingParams) -> None:
        self.requests[request_id] = _RequestText(self.tokenizer, request_id, prompt_token_ids,
                                                 params)

    def abort(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self.requests.pop(rid, None)

    def process(self, steps: Iterable[StepOutput]) -> tuple[list[RequestOutput], list[str]]:
        """The outputs of this step, and the ids of requests a stop string just finished (the
        engine must tell the scheduler, which still counts them as running)."""
        outputs, stopped = [], []
        for step in steps:
            req = self.requests.get(step.request_id)
            if req is None:
                continue
            out = req.feed(step)
            if out.finished:
                del self.requests[step.request_id]
                if step.finish_reason is None:
                    stopped.append(step.request_id)
            outputs.append(out)
        return outputs, stopped
