"""EngineFront: what both fronts of ragserve's engine share (the thread front,
:class:`engine.thread.ThreadEngine`, and the process front, :class:`engine.process.ProcessEngine`).

A front is the :class:`~engine.client.EngineClient` the server holds. It keeps each request's
stream (its asyncio queue and event loop), sends :mod:`engine.messages` commands to the engine
loop (:class:`engine.loop.EngineLoop`), and takes what the loop reports: outputs go to their
streams with one wake-up per event loop per step, stats go to the observer, the status to the
fields the server reads. The fronts differ only in where the loop runs and how messages travel
(:meth:`EngineFront._send`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from bucketing import PREFILL
from bucketing.cost import PrefillTimes
from engine.client import EngineNotReady, EngineState, FailureCallback, ModelInfo
from engine.messages import (
    AbortRequest,
    AddRequest,
    Command,
    EngineStatus,
    FinishedReport,
    KernelReport,
    Kind,
    OutputDelta,
    Report,
    SchedulerReport,
    StepReport,
)
from engine.output import RequestOutput
from engine.stats import EngineObserver, StepStats
from scheduler import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Stream:
    """A request as its front holds it: where its outputs go. The cumulative fields are kept
    only where the loop sends deltas (:meth:`apply`)."""

    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue
    request_id: str
    prompt_token_ids: tuple[int, ...]
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple = ()

    def apply(self, d: OutputDelta) -> RequestOutput:
        """The cumulative output after ``d``."""
        self.text += d.delta
        self.token_ids += d.new_token_ids
        if d.new_logprobs:
            self.logprobs += d.new_logprobs
        return RequestOutput(
            request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
            text=self.text, delta=d.delta, token_ids=self.token_ids,
            new_token_ids=d.new_token_ids, logprobs=self.logprobs, new_logprobs=d.new_logprobs,
            finish_reason=d.finish_reason, stop_reason=d.stop_reason, produced_at=d.produced_at,
            num_cached_tokens=d.num_cached_tokens)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput | BaseException]]) -> None:
    for sink, item in items:
        sink.put_nowait(item)


class EngineFront:
    """Load state, queue counts, streams and the observer of one engine loop."""

    name = "ragserve"

    def __init__(self, observer: EngineObserver | None,
                 on_failure: FailureCallback | None) -> None:
        self._observer = observer
        self._on_failure = on_failure
        self._info: ModelInfo | None = None
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()  # _streams: the event loop adds, the loop's side reads
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.load_seconds: float | None = None
        # while LOADING: what the load is doing ("compiling", ...) and how far, 0..1
        self.load_status: str | None = None
        self.load_progress: float | None = None
        # from the loop's status after every step or batch of commands
        self.num_waiting = 0
        self.num_free_slots = 0
        # submitted (here, on the event loop) - applied (by the loop) = adds in flight
        self._submitted = 0
        self._applied = 0
        #: one-prompt prefill step times per bucket, for GET /v1/buckets (bucket planning)
        self.prefill_times = PrefillTimes()

    @property
    def ready(self) -> bool:
        return self.state == EngineState.READY

    @property
    def info(self) -> ModelInfo | None:
        return self._info

    # -- requests (called on the event loop) ---------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       params: SamplingParams, arrival: float | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; aborts it if the consumer goes away."""
        if not self.ready:
            raise EngineNotReady(f"engine is {self.state.value}")
        sink: asyncio.Queue = asyncio.Queue()
        ids = list(prompt_token_ids)
        with self._lock:
            self._streams[request_id] = Stream(asyncio.get_running_loop(), sink, request_id,
                                               tuple(ids))
        self._submitted += 1  # before the add is sent: submitted - applied never goes below 0
        self._send(AddRequest(request_id, ids, params,
                              time.monotonic() if arrival is None else arrival))
        finished = False
        try:
            while True:
                item = await sink.get()
                if isinstance(item, BaseException):
                    finished = True  # the loop has forgotten it already
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._send(AbortRequest(request_id))

    async def abort(self, request_id: str) -> None:
        self._send(AbortRequest(request_id))

    def _send(self, command: Command) -> None:
        """Hand ``command`` to the engine loop (never blocks the event loop)."""
        raise NotImplementedError

    # -- what the server reads -----------------------------------------------------------

    def metrics_text(self) -> bytes:
        return self._observer.render() if self._observer is not None else b""

    def projected_waiting(self, n_new: int) -> int:
        """How many requests would wait for a KV slot if ``n_new`` more arrived now."""
        pending = self._submitted - self._applied
        return max(0, self.num_waiting + pending + n_new - self.num_free_slots)

    # -- what the loop reports (on the loop's thread, or the process front's reader) -----

    def _receive(self, outputs: list[RequestOutput], reports: list[Report]) -> None:
        """One loop iteration's outputs and reports, in order: outputs and failures to their
        streams (one wake-up per event loop), stats to the observer, status to this front."""
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for o in outputs:
                stream = self._streams.get(o.request_id)
                if stream is not None:
                    deliveries.setdefault(stream.loop, []).append((stream.sink, o))
            for r in reports:
                if r.kind is Kind.FAILED:
                    stream = self._streams.pop(r.request_id, None)
                    if stream is not None:
                        deliveries.setdefault(stream.loop, []).append((stream.sink, r.error))
        for loop, items in deliveries.items():
            loop.call_soon_threadsafe(_put_all, items)
        for r in reports:
            if r.kind is Kind.READY:
                self._info = r.info
            elif r.kind is Kind.STATUS:
                self._apply_status(r.status)
            elif r.kind is not Kind.FAILED:
                if r.kind is Kind.STEP:
                    self._time_prefill(r.stats)
                self._observe(r)

    def _apply_status(self, status: EngineStatus) -> None:
        before = self.state
        self.state, self.error = status.state, status.error
        self.load_seconds = status.load_seconds
        self.load_status, self.load_progress = status.load_status, status.load_progress
        self.num_waiting, self.num_free_slots = status.num_waiting, status.num_free_slots
        self._applied = status.num_applied
        if self.state == EngineState.FAILED and before != EngineState.FAILED:
            log.error("engine failed: %s", self.error)
            if self._on_failure is not None:
                self._on_failure(RuntimeError(self.error or "engine failed"))

    def _time_prefill(self, stats: StepStats) -> None:
        """A prefill of exactly one prompt with no decode rows (not a mixed step; not a failed
        one, which generates nothing) is kept in :attr:`prefill_times`: its time is the
        prefill cost of that bucket."""
        if stats.phase == PREFILL and stats.batch_size == 1 and stats.num_generation_tokens == 1:
            self.prefill_times.observe(int(stats.bucket),
                                       stats.num_prompt_tokens + stats.num_padding_tokens,
                                       stats.seconds)

    def _observe(self, r: StepReport | SchedulerReport | FinishedReport | KernelReport) -> None:
        """A stats report, to the observer."""
        obs = self._observer
        if obs is None:
            return
        try:
            if r.kind is Kind.STEP:
                obs.on_step(r.stats)
            elif r.kind is Kind.SCHEDULER:
                obs.on_scheduler(r.stats)
            elif r.kind is Kind.FINISHED:
                obs.on_finished(r.stats)
            else:
                obs.on_kernels(r.kernels, r.pending)
        except Exception:  # metrics must never take the engine down
            log.exception("observer failed on %s", r.kind.value)

    def _fail_streams(self, error: BaseException) -> None:
        """End every stream still open with ``error`` (the loop is gone)."""
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            s.loop.call_soon_threadsafe(s.sink.put_nowait, error)
