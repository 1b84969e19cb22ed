"""Requests, KV slots and token-level continuous batching. Standard library only."""

from scheduler.outputs import (
    MIXED,
    STEP_PHASES,
    KVCopy,
    ModelRunnerOutput,
    NewRequestData,
    ScheduledRow,
    SchedulerOutput,
    StepOutput,
    TokenLogprobs,
)
from scheduler.request import (
    FinishReason,
    GenerationRequest,
    Request,
    RequestStatus,
    SamplingParams,
    StructuredKind,
    StructuredOutput,
)
from scheduler.scheduler import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    RequestTooLongError,
    Scheduler,
    check_fits,
)
from scheduler.slots import SlotPool
from scheduler.stats import IterationStats, SchedulerStats
from scheduler.step_costs import StepCosts

__all__ = [
    "DEFAULT_MAX_NUM_BATCHED_TOKENS",
    "MIXED",
    "STEP_PHASES",
    "FinishReason",
    "GenerationRequest",
    "IterationStats",
    "KVCopy",
    "ModelRunnerOutput",
    "NewRequestData",
    "Request",
    "RequestStatus",
    "RequestTooLongError",
    "SamplingParams",
    "ScheduledRow",
    "Scheduler",
    "SchedulerOutput",
    "SchedulerStats",
    "SlotPool",
    "StepCosts",
    "StepOutput",
    "StructuredKind",
    "StructuredOutput",
    "TokenLogprobs",
    "check_fits",
]
