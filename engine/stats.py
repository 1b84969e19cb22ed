"""What ragserve's engine reports for metrics: plain dataclasses, read by the observer
(``server.metrics.EngineMetrics``), which alone knows Prometheus."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from scheduler import SchedulerStats


@dataclass(frozen=True)
class FinishedRequestStats:
    """One finished request, for metrics (times in seconds)."""

    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e: float
    queue: float
    ttft: float | None


@dataclass(frozen=True)
class StepStats:
    """One engine step, for metrics."""

    phase: str
    bucket: str
    batch_size: int  # the batch bucket (rows the graph runs)
    seconds: float
    num_prompt_tokens: int
    num_generation_tokens: int
    num_padding_tokens: int
    inter_token_latencies: tuple[float, ...]
    num_cached_tokens: int = 0  # prompt tokens whose KV was held (prefix reuse): not computed
    num_queried_tokens: int = 0  # prompt tokens looked up in the held prefixes


class EngineObserver(Protocol):
    """What the engine reports (metrics implement it); calls must not raise."""

    def on_scheduler(self, stats: SchedulerStats) -> None: ...

    def on_step(self, stats: StepStats) -> None: ...

    def on_finished(self, stats: FinishedRequestStats) -> None: ...

    def on_kernels(self, kernels: dict[str, str], pending: bool) -> None:
        """The implementation per shape class, and whether one is still being built."""

    def render(self) -> bytes:
        """The observed series in Prometheus' text format."""
