"""Plain statistics; Prometheus and benchmarks only read them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerStats:
    """The scheduler's state after a step."""

    num_running: int
    num_waiting: int
    num_slots: int
    num_free_slots: int
    kv_tokens_used: int
    kv_tokens_capacity: int

    @property
    def slot_usage(self) -> float:
        """Fraction of KV slots held by running sequences (0..1)."""
        return (self.num_slots - self.num_free_slots) / self.num_slots

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV positions holding real tokens (0..1)."""
        return self.kv_tokens_used / self.kv_tokens_capacity


@dataclass(frozen=True)
class IterationStats:
    """What one step scheduled and produced."""

    phase: str
    bucket: str
    batch_size: int
    num_rows: int
    num_prompt_tokens: int
    num_generation_tokens: int
    num_padding_tokens: int
    num_decode_rows: int = 0  # rows advancing one token (all of a decode step's)
    num_cached_tokens: int = 0  # prompt tokens skipped: their KV was held (prefix reuse)
    num_queried_tokens: int = 0  # prompt tokens looked up in the held prefixes

    @property
    def num_tokens(self) -> int:
        """Real tokens the model processed this step."""
        return self.num_prompt_tokens + self.num_decode_rows
