"""The one loop over step outputs: incremental detokenization, stop strings, finish reasons.

Detokenization uses ``tokenizers``' ``DecodeStream`` (primed with the end of the prompt), which
holds back a token until its bytes form complete UTF-8, so no text ever carries half a
character. With stop strings, the last ``len(longest stop) - 1`` characters are held back from
streamed deltas until they can no longer start a stop string.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenizers.decoders import DecodeStream

from scheduler import FinishReason, SamplingParams, StepOutput, TokenLogprobs

PROMPT_PRIME_TOKENS = 6


@dataclass
class RequestOutput:
    """The state of one request after a step: cumulative text and tokens, and what is new."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    text: str = ""
    delta: str = ""
    token_ids: list[int] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _RequestText:
    """Per-request detokenization and stop-string state."""

    def __init__(self, tokenizer: Any, request_id: str, prompt_token_ids: Sequence[int],
                 params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.stream = DecodeStream(ids=list(prompt_token_ids[-PROMPT_PRIME_TOKENS:]),
                                   skip_special_tokens=params.skip_special_tokens)
        self.out = RequestOutput(request_id, tuple(prompt_token_ids))
        self.full = ""  # all decoded text (the visible text may be cut at a stop string)
        self.emitted = 0  # characters of the visible text already sent as deltas
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    def feed(self, step: StepOutput) -> RequestOutput:
        out = self.out
        out.new_token_ids = list(step.new_token_ids)
        out.token_ids.extend(step.new_token_ids)
        out.new_logprobs = list(step.logprobs)
        out.logprobs.extend(step.logprobs)
        out.finish_reason = step.finish_reason
        start = len(self.full)
        for tok in step.new_token_ids:
            piece = self.stream.step(self.tokenizer._tokenizer, tok)
            if piece:
                self.full += piece
        visible = self.full
        if step.finish_reason == FinishReason.STOP and step.new_token_ids:
            last = step.new_token_ids[-1]
            if last in self.params.stop_token_ids:
                out.stop_reason = last
        if self.params.stop:
            visible = self._cut_at_stop(start)
        out.text = visible
        end = len(visible) if out.finished else max(self.emitted, len(visible) - self.hold)
        out.delta = visible[self.emitted:end]
        self.emitted = end
        return out

    def _cut_at_stop(self, start: int) -> str:
        """Search the new text (and the tail a stop string could straddle) for a stop string."""
        window = max(0, start - self.hold)
        hits = [(i, s) for s in self.params.stop if (i := self.full.find(s, window)) >= 0]
        if not hits:
            return self.full
        i, stop = min(hits)
        self.out.finish_reason = FinishReason.STOP
        self.out.stop_reason = stop
        keep = i + len(stop) if self.params.include_stop_str_in_output else i
        return self.full[:keep]


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
