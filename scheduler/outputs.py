"""The typed messages between scheduler, model runner and output processing.

Only plain Python values cross these boundaries: no tensors leave the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

from bucketing import DECODE, PREFILL, Bucket
from scheduler.request import FinishReason, SamplingParams

#: a step that runs prompts and decode rows together
MIXED = "mixed"
#: what a step ran (:attr:`SchedulerOutput.phase`; the ``phase`` label of step metrics)
STEP_PHASES = (PREFILL, DECODE, MIXED)


@dataclass(frozen=True)
class NewRequestData:
    """Sent to the runner the first time a request is scheduled, so it can keep per-request
    sampling state (seeded generator, penalty history) for the life of the slot."""

    request_id: str
    slot: int
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams


@dataclass(frozen=True)
class ScheduledRow:
    """One row of the batch: feed ``token_ids`` at positions ``start_pos...`` into ``slot``
    (a prompt row starts above 0 when its slot holds the prompt's first ``start_pos`` tokens)."""

    request_id: str
    slot: int
    token_ids: tuple[int, ...]
    start_pos: int


@dataclass(frozen=True)
class KVCopy:
    """Before the step runs: copy positions ``0..num_tokens-1`` of slot ``src``'s KV into slot
    ``dst`` (a prompt's shared prefix, held by another slot)."""

    src: int
    dst: int
    num_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    """One engine step: a prefill of new requests, a decode of all running ones, or (for a
    backend that runs mixed steps) a prefill with the running requests' decode rows in it."""

    bucket: Bucket
    rows: tuple[ScheduledRow, ...]
    new_requests: tuple[NewRequestData, ...] = ()
    finished_request_ids: frozenset[str] = frozenset()
    # running requests advancing one token inside this prefill step (a mixed step)
    decode_rows: tuple[ScheduledRow, ...] = ()
    # prefixes copied between slots before the step (prefix reuse); a prompt row whose
    # ``start_pos`` is above 0 starts after the tokens its slot holds
    kv_copies: tuple[KVCopy, ...] = ()

    @property
    def phase(self) -> str:
        """One of :data:`STEP_PHASES`."""
        return MIXED if self.decode_rows else self.bucket.phase

    @property
    def is_prefill(self) -> bool:
        """The step runs prompts (a mixed step does too)."""
        return self.bucket.phase == PREFILL

    @property
    def scheduled_rows(self) -> tuple[ScheduledRow, ...]:
        """Every row that gets a token this step: decode rows first, then :attr:`rows`."""
        return self.decode_rows + self.rows

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens computed this step (a reused prefix is not)."""
        return sum(len(r.token_ids) for r in self.rows) if self.is_prefill else 0

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens this step's prompts skip: their KV was held already."""
        return sum(r.start_pos for r in self.rows) if self.is_prefill else 0

    @property
    def num_tokens(self) -> int:
        """Real tokens fed to the model this step."""
        return sum(len(r.token_ids) for r in self.rows) + len(self.decode_rows)

    @property
    def padding_tokens(self) -> int:
        """Tokens the padded graph computes beyond the real ones."""
        return self.bucket.input_tokens - self.num_tokens


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's log-probability and rank, and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ModelRunnerOutput:
    """What the device returns: one sampled token per scheduled row, as plain lists."""

    request_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None = None
    num_computed_tokens: int | None = None  # padding included; None: the bucket's shape


@dataclass(frozen=True)
class StepOutput:
    """What one step did for one request."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: tuple[TokenLogprobs, ...] = ()
    num_cached_tokens: int = 0  # of the prompt, not computed: its KV was held (prefix reuse)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
