"""Everything that crosses between an engine front and the engine loop: small typed messages,
as vLLM v1's ``EngineCoreRequest`` / ``EngineCoreOutputs`` and SGLang's ``io_struct.py``.

Front -> loop: :class:`AddRequest`, :class:`AbortRequest`, :class:`Stop`. Loop -> front, one
list per loop iteration: :class:`OutputDelta` (only what is new: the front keeps the cumulative
text, tokens and logprobs), :class:`RequestFailed`, the stats the observer reads
(:class:`StepReport`, :class:`SchedulerReport`, :class:`FinishedReport`, :class:`KernelReport`),
:class:`StatusReport` (load state and queue counts) and :class:`ReadyReport` (the model's info,
once, before the status that says ready). Each message names its :class:`Kind`; the thread
front passes them as objects, the process front pickles them through a pipe.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

from engine.client import EngineState, ModelInfo
from engine.output import RequestOutput
from engine.stats import FinishedRequestStats, StepStats
from scheduler import FinishReason, SamplingParams, SchedulerStats, TokenLogprobs


class Kind(enum.Enum):
    # front -> loop
    ADD = "add"
    ABORT = "abort"
    STOP = "stop"
    # loop -> front
    OUTPUT = "output"
    FAILED = "failed"
    STEP = "step"
    SCHEDULER = "scheduler"
    FINISHED = "finished"
    KERNELS = "kernels"
    STATUS = "status"
    READY = "ready"


# -- front -> loop ---------------------------------------------------------------------------

@dataclass(frozen=True)
class AddRequest:
    kind: ClassVar[Kind] = Kind.ADD
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float  # time.monotonic() when the server received it


@dataclass(frozen=True)
class AbortRequest:
    kind: ClassVar[Kind] = Kind.ABORT
    request_id: str


@dataclass(frozen=True)
class Stop:
    kind: ClassVar[Kind] = Kind.STOP


Command = AddRequest | AbortRequest | Stop


# -- loop -> front ---------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputDelta:
    """What one step added to a request's output."""

    kind: ClassVar[Kind] = Kind.OUTPUT
    request_id: str
    delta: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[TokenLogprobs, ...]
    finish_reason: FinishReason | None
    stop_reason: str | int | None
    produced_at: float
    num_cached_tokens: int = 0

    @classmethod
    def of(cls, output: RequestOutput) -> OutputDelta:
        return cls(output.request_id, output.delta, output.new_token_ids, output.new_logprobs,
                   output.finish_reason, output.stop_reason, output.produced_at,
                   output.num_cached_tokens)


@dataclass(frozen=True)
class RequestFailed:
    """The request ends with ``error`` raised to its consumer (an add the engine refused, or
    an engine that stops under it)."""

    kind: ClassVar[Kind] = Kind.FAILED
    request_id: str
    error: Exception


@dataclass(frozen=True)
class StepReport:
    kind: ClassVar[Kind] = Kind.STEP
    stats: StepStats


@dataclass(frozen=True)
class SchedulerReport:
    kind: ClassVar[Kind] = Kind.SCHEDULER
    stats: SchedulerStats


@dataclass(frozen=True)
class FinishedReport:
    kind: ClassVar[Kind] = Kind.FINISHED
    stats: FinishedRequestStats


@dataclass(frozen=True)
class KernelReport:
    """The implementation per shape class, and whether one is still being built."""

    kind: ClassVar[Kind] = Kind.KERNELS
    kernels: dict[str, str] = field(default_factory=dict)
    pending: bool = False


@dataclass(frozen=True)
class EngineStatus:
    """What a front reads of the loop: load state and progress, and the queue counts that
    admission projects from (``num_applied``: adds the loop has taken in)."""

    state: EngineState = EngineState.LOADING
    error: str | None = None
    load_seconds: float | None = None
    load_status: str | None = None  # while loading: what it is doing ("compiling", ...)
    load_progress: float | None = None  # ... and how far, 0..1
    num_waiting: int = 0
    num_free_slots: int = 0
    num_applied: int = 0


@dataclass(frozen=True)
class StatusReport:
    kind: ClassVar[Kind] = Kind.STATUS
    status: EngineStatus


@dataclass(frozen=True)
class ReadyReport:
    kind: ClassVar[Kind] = Kind.READY
    info: ModelInfo


Report = (OutputDelta | RequestFailed | StepReport | SchedulerReport | FinishedReport
          | KernelReport | StatusReport | ReadyReport)
