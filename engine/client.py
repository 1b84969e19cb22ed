"""The engine front: the one interface the server talks to, whichever engine is behind it.

Two engines implement it: ragserve's own (:mod:`engine.thread` and :mod:`engine.process`: bucket
graphs, slot KV cache, continuous batching, in a child process or on a thread) and vLLM's
(:class:`server.vllm_engine.VLLMEngine`: vLLM's v1 ``AsyncLLM`` in-process). Everything above it
(routes, validation, errors and limits, API key, SageMaker routes, RAG, grounding, metrics of
the API) is one code path that never asks which engine it has; the only place that names the
engines is :func:`server.engines.build_engine`. Modelled on vLLM's ``EngineClient``
(vllm/engine/protocol.py): generate, abort, state and stats.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bucketing.cost import PrefillTimes
from engine.output import RequestOutput
from scheduler import SamplingParams, check_fits

#: Called once when the engine fails to load or dies: the server exits (non-zero), so that an
#: orchestrator restarts it.
FailureCallback = Callable[[BaseException], None]


class EngineState(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class EngineNotReady(RuntimeError):
    pass


class EngineDead(RuntimeError):
    """The engine stopped working under a request (not the request's fault)."""


class EngineRequestError(Exception):
    """The engine refused a request the server had accepted (its own validation); ``status``
    is the HTTP status the client should get."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know of the loaded model, whatever the engine: its name, its
    tokenizer (chat template, /tokenize, logprob texts, RAG prompt budget) and its limits."""

    name: str
    tokenizer: Any
    max_model_len: int
    # the longest prompt the engine takes: the largest prefill bucket for bucketed graphs
    max_prompt_len: int
    context_encoding_buckets: tuple[int, ...] = ()  # empty: the engine has no bucket graphs
    token_generation_buckets: tuple[int, ...] = ()

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def check_fits(self, prompt_len: int, max_tokens: int | None) -> int:
        """The effective ``max_tokens``, or :class:`scheduler.RequestTooLongError`."""
        return check_fits(prompt_len, max_tokens, max_model_len=self.max_model_len,
                          max_prompt_len=self.max_prompt_len,
                          bucketed=bool(self.context_encoding_buckets))


class EngineClient(Protocol):
    """What the server needs from an engine. Load state is read by /ready and by every handler;
    ``generate`` is the only way requests go in, and closing its iterator aborts the request."""

    #: "ragserve" or "vllm", shown in /v1/models and /ready
    name: str
    state: EngineState
    error: str | None
    load_seconds: float | None
    # while LOADING: what the load is doing ("compiling", ...) and how far, 0..1
    load_status: str | None
    load_progress: float | None
    #: one-prompt prefill step times per prefill bucket (GET /v1/buckets); stays empty for an
    #: engine without bucket graphs
    prefill_times: PrefillTimes

    @property
    def ready(self) -> bool: ...

    @property
    def info(self) -> ModelInfo | None:
        """Set once the engine is ready."""

    def start(self) -> None:
        """Begin loading in the background (returns at once); called in the server's lifespan,
        on its event loop."""

    def stop(self) -> None:
        """Fail what is still running and release the engine (after the HTTP drain)."""

    def projected_waiting(self, n_new: int) -> int:
        """How many requests would wait for a sequence slot if ``n_new`` more arrived now."""

    def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                 params: SamplingParams, arrival: float | None = None
                 ) -> AsyncIterator[RequestOutput]:
        """One request's outputs as they come (snapshots: cumulative text and tokens, and what
        is new); ``aclose()`` before the finish aborts it. Raises :class:`EngineNotReady`
        unless ready, :class:`EngineDead` if the engine dies under it."""

    async def abort(self, request_id: str) -> None: ...

    def metrics_text(self) -> bytes:
        """The engine's own Prometheus series (the server adds its API-level ones)."""
