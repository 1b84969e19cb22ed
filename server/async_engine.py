"""AsyncEngine: ragserve's engine on its own thread, fed by asyncio handlers; the
:class:`~server.engine_client.EngineClient` of ``--engine ragserve``.

One thread owns the :class:`~server.engine.Engine` (nothing else touches it): it loads the model,
then loops: apply queued adds and aborts, run one step, hand each output to its request's
asyncio queue. An abort queued before a step is applied before that step is scheduled, so a
disconnected client's slot is free for the very next step.

The same loop runs in a process of its own behind :class:`server.engine_process.ProcessEngine`
(the default); the hooks ``_state_changed`` and ``_flush`` are where that one reports.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from bucketing import PREFILL
from bucketing.cost import PrefillTimes
from scheduler import FinishReason, SamplingParams, SchedulerStats
from server.engine import Engine
from server.engine_client import (
    EngineDead,
    EngineNotReady,
    EngineState,
    FailureCallback,
    ModelInfo,
)
from server.output import RequestOutput

log = logging.getLogger(__name__)


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


class EngineObserver(Protocol):
    """What the engine thread reports (metrics implement it); calls must not raise."""

    def on_scheduler(self, stats: SchedulerStats) -> None: ...

    def on_step(self, stats: StepStats) -> None: ...

    def on_finished(self, stats: FinishedRequestStats) -> None: ...

    def on_kernels(self, kernels: dict[str, str], pending: bool) -> None:
        """The implementation per shape class, and whether one is still being built."""

    def render(self) -> bytes:
        """The observed series in Prometheus' text format."""


@dataclass
class _Tracked:
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue
    arrival: float
    num_prompt_tokens: int
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for sink, output in items:
        sink.put_nowait(output)


class EngineFront:
    """What both fronts of ragserve's engine keep (this thread engine, and
    :class:`server.engine_process.ProcessEngine`): load state, queue counts, the observer."""

    name = "ragserve"

    def __init__(self, observer: EngineObserver | None,
                 on_failure: FailureCallback | None) -> None:
        self._observer = observer
        self._on_failure = on_failure
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._info: ModelInfo | None = None
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.load_seconds: float | None = None
        # while LOADING: what the load is doing ("compiling", ...) and how far, 0..1
        self.load_status: str | None = None
        self.load_progress: float | None = None
        # published by the engine thread after every step or batch of commands
        self.num_waiting = 0
        self.num_free_slots = 0
        # each written by one thread only: submitted - applied = adds not yet applied
        self._submitted = 0
        self._applied = 0
        #: one-prompt prefill step times per bucket, for GET /v1/buckets (bucket planning)
        self.prefill_times = PrefillTimes()

    @property
    def ready(self) -> bool:
        return self.state == EngineState.READY

    # -- requests (called from the event loop) -------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       params: SamplingParams, arrival: float | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; aborts it if the consumer goes away."""
        if not self.ready:
            raise EngineNotReady(f"engine is {self.state.value}")
        sink: asyncio.Queue = asyncio.Queue()
        self._submitted += 1  # before the add is queued: submitted - applied never goes below 0
        self._submit(request_id, list(prompt_token_ids), params,
                     time.monotonic() if arrival is None else arrival,
                     asyncio.get_running_loop(), sink)
        finished = False
        try:
            while True:
                item = await sink.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine has forgotten it already
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._forget(request_id)
            if not finished:
                self._abort(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def _submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                arrival: float, loop: asyncio.AbstractEventLoop, sink: asyncio.Queue) -> None:
        """Hand one request to the engine loop; its outputs go to ``sink`` on ``loop``."""
        raise NotImplementedError

    def _forget(self, request_id: str) -> None:
        """The request's stream has ended (the thread front keeps nothing to drop)."""

    def _abort(self, request_id: str) -> None:
        raise NotImplementedError

    @property
    def info(self) -> ModelInfo | None:
        return self._info

    def metrics_text(self) -> bytes:
        return self._observer.render() if self._observer is not None else b""

    def projected_waiting(self, n_new: int) -> int:
        """How many requests would wait for a KV slot if ``n_new`` more arrived now."""
        pending = self._submitted - self._applied
        return max(0, self.num_waiting + pending + n_new - self.num_free_slots)

    def _on_step(self, stats: StepStats) -> None:
        """One engine step's stats, to the observer. A prefill of exactly one prompt with no
        decode rows (not a mixed step; not a failed one, which generates nothing) is also kept
        in :attr:`prefill_times`: its time is the prefill cost of that bucket."""
        if stats.phase == PREFILL and stats.batch_size == 1 and stats.num_generation_tokens == 1:
            self.prefill_times.observe(int(stats.bucket),
                                       stats.num_prompt_tokens + stats.num_padding_tokens,
                                       stats.seconds)
        self._notify("on_step", stats)

    def _notify(self, event: str, *stats: object) -> None:
        if self._observer is None:
            return
        try:
            getattr(self._observer, event)(*stats)
        except Exception:  # metrics must never take the engine down
            log.exception("observer %s failed", event)


class AsyncEngine(EngineFront):
    """Thread-safe front of ragserve's engine; ``generate`` is an async iterator of outputs."""

    def __init__(self, factory: Callable[[], Engine], observer: EngineObserver | None = None,
                 on_failure: FailureCallback | None = None) -> None:
        super().__init__(observer, on_failure)
        self._factory = factory
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ragserve-engine", daemon=True)
        self._tracked: dict[str, _Tracked] = {}
        self.engine: Engine | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.state = EngineState.STOPPED

    # -- requests (called from the event loop) -------------------------------------------

    def _submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                arrival: float, loop: asyncio.AbstractEventLoop, sink: asyncio.Queue) -> None:
        self._commands.put(("add", request_id, prompt_token_ids, params, arrival, loop, sink))
        self._wake.set()

    def _abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self.engine = self._factory()
        except BaseException as e:
            log.exception("engine failed to load")
            self.state, self.error = EngineState.FAILED, f"{type(e).__name__}: {e}"
            self._state_changed()
            if self._on_failure is not None:
                self._on_failure(e)
            return
        self.load_seconds = time.perf_counter() - t0
        b = self.engine.scheduler.buckets
        self._info = ModelInfo(
            name=self.engine.model_name, tokenizer=self.engine.tokenizer,
            max_model_len=b.max_model_len, max_prompt_len=b.max_prompt_len,
            context_encoding_buckets=tuple(b.context_encoding_buckets),
            token_generation_buckets=tuple(b.token_generation_buckets))
        self._publish_scheduler()
        self.state = EngineState.READY
        self._state_changed()
        log.info("engine ready in %.1fs", self.load_seconds)
        self.engine.start_background_compile()  # serves eagerly meanwhile
        self._kernels_seen: tuple | None = None
        while not self._stop.is_set():
            self._publish_kernels()
            self._apply_commands()
            if not self.engine.has_unfinished():
                self._flush()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self._step()
            self._flush()
        self._fail_all(EngineDead("the server is shutting down"))
        self._flush()

    def report_load(self, status: str, fraction: float) -> None:
        """The factory's progress callback: what the load is doing and how far (0..1)."""
        self.load_status, self.load_progress = status, fraction
        self._state_changed()

    # hooks for an engine loop in another process (server.engine_process): no-ops on a thread

    def _state_changed(self) -> None:
        """Load state, model info or queue counts changed (the engine thread wrote them)."""

    def _flush(self) -> None:
        """The end of a loop iteration: what it delivered may go out together."""

    def _apply_commands(self) -> None:
        engine = self.engine
        applied = False
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            applied = True
            if cmd[0] == "abort":
                rid = cmd[1]
                if rid in self._tracked:
                    engine.abort(rid)
                    self._finish(rid, FinishReason.ABORT.value, 0)
                continue
            _, rid, ids, params, arrival, loop, sink = cmd
            self._applied += 1
            try:
                engine.add_request(ids, params, request_id=rid, arrival_time=arrival)
            except Exception as e:  # validated by the handler; anything left is reported
                loop.call_soon_threadsafe(sink.put_nowait, e)
                continue
            self._tracked[rid] = _Tracked(loop, sink, arrival, len(ids))
        if applied:
            self._publish_scheduler()

    def _publish_kernels(self) -> None:
        """Report the kernel choice at ready and once more when a pending one settles; after
        that nothing changes, so the loop stops asking."""
        if self._kernels_seen is not None and not self._kernels_seen[1]:
            return
        report = self.engine.kernel_report()
        if report is None:  # a backend without a choice of kernels
            self._kernels_seen = ({}, False)
        elif report != self._kernels_seen:
            self._kernels_seen = report
            self._notify("on_kernels", *report)

    def _publish_scheduler(self) -> None:
        stats = self.engine.scheduler.stats()
        self.num_waiting, self.num_free_slots = stats.num_waiting, stats.num_free_slots
        self._notify("on_scheduler", stats)
        self._state_changed()

    def _step(self) -> None:
        engine = self.engine
        start = time.monotonic()
        try:
            outputs = engine.step()
        except Exception as e:  # not the runner (Engine.step handles that): a bug; fail all
            log.exception("engine step failed outside the model runner")
            self._fail_all(EngineDead(f"engine step failed: {type(e).__name__}: {e}"))
            return
        now = time.monotonic()
        out = engine.last_scheduled
        for new in out.new_requests:
            tracked = self._tracked.get(new.request_id)
            if tracked is not None:
                tracked.scheduled = start
        itls = []
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        for o in outputs:
            tracked = self._tracked.get(o.request_id)
            if tracked is None:
                continue
            if o.new_token_ids:
                if tracked.first_token is None:
                    tracked.first_token = now
                else:
                    itls.append(now - tracked.last_token)
                tracked.last_token = now
            deliveries.setdefault(tracked.loop, []).append((tracked.sink, o))
            if o.finished:
                self._finish(o.request_id, o.finish_reason.value, len(o.token_ids))
        for loop, items in deliveries.items():  # one wake-up per event loop per step
            loop.call_soon_threadsafe(_deliver, items)
        it = engine.scheduler.last_iteration  # this step's (update or fail_step wrote it)
        self._on_step(StepStats(
            phase=out.phase, bucket=str(out.bucket.seq_len), batch_size=out.bucket.batch_size,
            seconds=now - start,
            num_prompt_tokens=it.num_prompt_tokens, num_generation_tokens=it.num_generation_tokens,
            num_padding_tokens=it.num_padding_tokens, inter_token_latencies=tuple(itls)))
        self._publish_scheduler()

    def _finish(self, rid: str, reason: str, n_out: int) -> None:
        tracked = self._tracked.pop(rid, None)
        if tracked is None:
            return
        now = time.monotonic()
        self._notify("on_finished", FinishedRequestStats(
            finish_reason=reason,
            num_prompt_tokens=tracked.num_prompt_tokens,
            num_generation_tokens=n_out,
            e2e=now - tracked.arrival,
            queue=(tracked.scheduled or now) - tracked.arrival,
            ttft=None if tracked.first_token is None else tracked.first_token - tracked.arrival,
        ))

    def _fail_all(self, error: BaseException) -> None:
        for rid, tracked in list(self._tracked.items()):
            if self.engine is not None:
                self.engine.abort(rid)
            tracked.loop.call_soon_threadsafe(tracked.sink.put_nowait, error)
            del self._tracked[rid]
