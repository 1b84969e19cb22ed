"""Requests and their sampling parameters, as the scheduler sees them: integers and strings."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    """Why a request stopped; ``stop`` and ``length`` are OpenAI's ``finish_reason`` values."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


class RequestStatus(enum.IntEnum):
    """Ordered: every status past RUNNING is finished."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4
    FINISHED_ERROR = 5

    @property
    def finished(self) -> bool:
        return self > RequestStatus.RUNNING

    @classmethod
    def for_reason(cls, reason: FinishReason) -> RequestStatus:
        return _STATUS_FOR_REASON[reason]

    @property
    def finish_reason(self) -> FinishReason | None:
        return _REASON_FOR_STATUS.get(self)


_STATUS_FOR_REASON = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
    FinishReason.ERROR: RequestStatus.FINISHED_ERROR,
}
_REASON_FOR_STATUS = {v: k for k, v in _STATUS_FOR_REASON.items()}


class StructuredKind(str, enum.Enum):
    """What constrains a structured output: vLLM's ``structured_outputs`` fields."""

    JSON = "json"  # a JSON schema (``spec`` is its JSON text)
    JSON_OBJECT = "json_object"  # any JSON object (``spec`` is empty)
    REGEX = "regex"
    CHOICE = "choice"  # ``spec`` is a JSON list of the allowed strings
    GRAMMAR = "grammar"  # EBNF (GBNF-style) grammar text


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on a request's output tokens, as text: it crosses to the engine process,
    which compiles it against its own tokenizer (``runtime/structured.py``)."""

    kind: StructuredKind
    spec: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", StructuredKind(self.kind))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; the fields and meanings of vLLM's SamplingParams.

    ``temperature == 0`` is greedy. ``top_k`` of 0 or -1 disables top-k. ``logprobs`` is the
    number of top alternatives to return with each sampled token (0: only the sampled token's
    own log-probability; None: none). ``max_tokens`` None means "up to the model's length".
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()
    structured: StructuredOutput | None = None

    MAX_LOGPROBS = 20
    MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 (ban) .. 100 (force)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1")
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.top_k >= 0, "top_k", "must be -1 (disabled), 0 (disabled) or >= 1")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        _check(_finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
               "presence_penalty", "must be in [-2, 2]")
        _check(_finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
               "frequency_penalty", "must be in [-2, 2]")
        _check(_finite(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", "must be > 0")
        _check(self.min_tokens >= 0, "min_tokens", "must be >= 0")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               "min_tokens", "must be <= max_tokens")
        _check(self.logprobs is None or 0 <= self.logprobs <= self.MAX_LOGPROBS,
               "logprobs", f"must be in [0, {self.MAX_LOGPROBS}]")
        _check(all(s for s in self.stop), "stop", "must not contain empty strings")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be >= 0")
        _check(self.seed is None or -(2**63) <= self.seed < 2**64, "seed", "must fit in 64 bits")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b))
                                                     for t, b in self.logit_bias))
        _check(all(t >= 0 for t, _ in self.logit_bias), "logit_bias", "token ids must be >= 0")
        # the grammar decides where a structured output ends: it allows EOS only there
        _check(self.structured is None or not self.ignore_eos, "ignore_eos",
               "cannot be combined with a structured output")
        _check(self.structured is None or not self.min_tokens, "min_tokens",
               "cannot be combined with a structured output")
        _check(all(_finite(b) and abs(b) <= self.MAX_LOGIT_BIAS for _, b in self.logit_bias),
               "logit_bias", f"values must be in [-{self.MAX_LOGIT_BIAS:g}, "
               f"{self.MAX_LOGIT_BIAS:g}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
        )


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}")


@dataclass(frozen=True)
class GenerationRequest:
    """What the server hands the engine: a tokenized prompt and how to continue it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    arrival_time: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        if not self.prompt_token_ids:
            raise ValueError("prompt must contain at least one token")


@dataclass
class Request:
    """A request inside the scheduler (mutable, scheduler-owned)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    max_tokens: int
    eos_token_ids: frozenset[int]
    arrival_time: float = 0.0
    status: RequestStatus = RequestStatus.WAITING
    slot: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV was held already: not computed

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def check_stop(self, max_model_len: int) -> FinishReason | None:
        """Why this request is done after its latest token, or None to continue."""
        n_out = len(self.output_token_ids)
        params = self.sampling_params
        if n_out >= params.min_tokens:
            tok = self.output_token_ids[-1]
            if (not params.ignore_eos and tok in self.eos_token_ids) or (
                tok in params.stop_token_ids
            ):
                return FinishReason.STOP
        if n_out >= self.max_tokens or self.num_tokens >= max_model_len:
            return FinishReason.LENGTH
        return None
