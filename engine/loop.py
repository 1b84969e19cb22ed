"""EngineLoop: the thread that drives ragserve's :class:`~engine.core.Engine` inside a front.

One thread owns the Engine (nothing else touches it): it loads the model, then loops: apply
queued commands (adds and aborts), run one step, report. An abort queued before a step is
applied before that step is scheduled, so a disconnected client's slot is free for the very
next step. The loop also times each request for metrics (queue, TTFT, inter-token latency).

Where the loop runs and where its reports go is the front's business: the thread front calls
:meth:`EngineLoop.run` on a thread of the server process and receives the reports directly; the
process front's child runs it on its main thread and sends them through a pipe. Either way the
loop hands one ``(outputs, reports)`` pair per iteration to its ``publish`` callback.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from engine.client import EngineDead, EngineState, ModelInfo
from engine.core import Engine, ProgressCallback
from engine.memory import HeapTrimmer
from engine.messages import (
    Command,
    EngineStatus,
    FinishedReport,
    KernelReport,
    Kind,
    ReadyReport,
    Report,
    RequestFailed,
    SchedulerReport,
    StatusReport,
    StepReport,
)
from engine.output import RequestOutput
from engine.stats import FinishedRequestStats, StepStats
from scheduler import FinishReason

log = logging.getLogger(__name__)

#: builds the Engine on the loop's thread, reporting load progress to the callback
EngineFactory = Callable[[ProgressCallback], Engine]
#: receives one loop iteration's outputs (snapshots) and reports; must not block for long
Publish = Callable[[list[RequestOutput], list[Report]], None]


@dataclass
class _Times:
    """A request's times, for metrics (time.monotonic())."""

    arrival: float
    num_prompt_tokens: int
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None


class EngineLoop:
    """Runs an Engine on the calling thread (:meth:`run`); :meth:`put` is thread-safe."""

    def __init__(self, factory: EngineFactory, publish: Publish) -> None:
        self._factory = factory
        self._publish = publish
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._times: dict[str, _Times] = {}
        self._status = EngineStatus()
        self._outputs: list[RequestOutput] = []
        self._reports: list[Report] = []
        self._kernels: KernelReport | None = None
        self.engine: Engine | None = None

    def put(self, command: Command) -> None:
        """Queue a command for the loop (any thread)."""
        self._commands.put(command)
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Load, then serve until a :class:`~engine.messages.Stop` command."""
        t0 = time.perf_counter()
        try:
            self.engine = engine = self._factory(self._progress)
        except BaseException as e:
            log.exception("engine failed to load")
            self._set_status(state=EngineState.FAILED, error=f"{type(e).__name__}: {e}")
            self._flush()
            return
        b = engine.scheduler.buckets
        self._reports.append(ReadyReport(ModelInfo(
            name=engine.model_name, tokenizer=engine.tokenizer,
            max_model_len=b.max_model_len, max_prompt_len=b.max_prompt_len,
            context_encoding_buckets=tuple(b.context_encoding_buckets),
            token_generation_buckets=tuple(b.token_generation_buckets))))
        self._publish_scheduler()
        self._set_status(state=EngineState.READY, load_seconds=time.perf_counter() - t0)
        self._flush()
        log.info("engine ready in %.1fs", self._status.load_seconds)
        trimmer, busy = HeapTrimmer(), False
        while True:
            self._publish_kernels()
            if self._apply_commands():
                break
            if not engine.has_unfinished():
                self._flush()
                if busy:  # the work just ran out: hand back what its steps freed
                    trimmer.idle()
                busy = False
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            busy = True
            self._step()
            self._flush()
        self._fail_all(EngineDead("the server is shutting down"))
        self._flush()

    def _progress(self, status: str, fraction: float) -> None:
        """The factory's progress callback: what the load is doing and how far (0..1)."""
        self._set_status(load_status=status, load_progress=fraction)
        self._flush()  # nothing else flushes while loading

    def _apply_commands(self) -> bool:
        """Apply what is queued; True once a Stop has come."""
        engine = self.engine
        applied = stop = False
        while not stop:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            applied = True
            if cmd.kind is Kind.STOP:
                stop = True
            elif cmd.kind is Kind.ABORT:
                if cmd.request_id in self._times:
                    engine.abort(cmd.request_id)
                    self._finish(cmd.request_id, FinishReason.ABORT.value, 0)
            else:
                self._set_status(num_applied=self._status.num_applied + 1)
                try:
                    engine.add_request(cmd.prompt_token_ids, cmd.params,
                                       request_id=cmd.request_id, arrival_time=cmd.arrival)
                except Exception as e:  # validated by the server; anything left is reported
                    self._reports.append(RequestFailed(cmd.request_id, e))
                    continue
                self._times[cmd.request_id] = _Times(cmd.arrival, len(cmd.prompt_token_ids))
        if applied:
            self._publish_scheduler()
        return stop

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
            times = self._times.get(new.request_id)
            if times is not None:
                times.scheduled = start
        itls = []
        for o in outputs:
            times = self._times.get(o.request_id)
            if times is None:
                continue
            if o.new_token_ids:
                if times.first_token is None:
                    times.first_token = now
                else:
                    itls.append(now - times.last_token)
                times.last_token = now
            self._outputs.append(o)
            if o.finished:
                self._finish(o.request_id, o.finish_reason.value, len(o.token_ids))
        it = engine.scheduler.last_iteration  # this step's (update or fail_step wrote it)
        self._reports.append(StepReport(StepStats(
            phase=out.phase, bucket=str(out.bucket.seq_len), batch_size=out.bucket.batch_size,
            seconds=now - start,
            num_prompt_tokens=it.num_prompt_tokens, num_generation_tokens=it.num_generation_tokens,
            num_padding_tokens=it.num_padding_tokens, inter_token_latencies=tuple(itls),
            num_cached_tokens=it.num_cached_tokens, num_queried_tokens=it.num_queried_tokens)))
        self._publish_scheduler()

    # -- reports -------------------------------------------------------------------------

    def _flush(self) -> None:
        """The end of an iteration: what it produced goes out together."""
        if self._outputs or self._reports:
            outputs, reports = self._outputs, self._reports
            self._outputs, self._reports = [], []
            self._publish(outputs, reports)

    def _set_status(self, **changes: object) -> None:
        status = replace(self._status, **changes)
        if status != self._status:
            self._status = status
            self._reports.append(StatusReport(status))

    def _publish_scheduler(self) -> None:
        stats = self.engine.scheduler.stats()
        self._reports.append(SchedulerReport(stats))
        self._set_status(num_waiting=stats.num_waiting, num_free_slots=stats.num_free_slots)

    def _publish_kernels(self) -> None:
        """Report the kernel choice at ready and once more when a pending one settles; after
        that nothing changes, so the loop stops asking."""
        if self._kernels is not None and not self._kernels.pending:
            return
        report = self.engine.kernel_report()
        kernels = KernelReport() if report is None else KernelReport(*report)
        if kernels != self._kernels:
            if report is not None:  # a backend without a choice of kernels reports nothing
                self._reports.append(kernels)
            self._kernels = kernels

    def _finish(self, rid: str, reason: str, n_out: int) -> None:
        times = self._times.pop(rid, None)
        if times is None:
            return
        now = time.monotonic()
        self._reports.append(FinishedReport(FinishedRequestStats(
            finish_reason=reason,
            num_prompt_tokens=times.num_prompt_tokens,
            num_generation_tokens=n_out,
            e2e=now - times.arrival,
            queue=(times.scheduled or now) - times.arrival,
            ttft=None if times.first_token is None else times.first_token - times.arrival,
        )))

    def _fail_all(self, error: Exception) -> None:
        for rid in list(self._times):
            if self.engine is not None:
                self.engine.abort(rid)
            self._reports.append(RequestFailed(rid, error))
        self._times.clear()
