"""ProcessEngine: ragserve's engine loop in a process of its own, so that the API side (request
parsing, validation, SSE writing, 429 storms) cannot take the interpreter from it; the
:class:`~server.engine_client.EngineClient` of ``--engine ragserve`` (``--engine-process``, the
default).

The design is vLLM v1's (``EngineCoreProc`` behind ``AsyncLLM``'s ``EngineCoreClient``), cut to
what ragserve needs:

- The child ("engine core") runs the same loop as the thread engine
  (:class:`server.async_engine.AsyncEngine`: apply adds and aborts, step, track each request's
  times for metrics), model load included. Detokenization and stop strings run there too, since
  they decide when a request finishes.
- Two pipes of pickled messages: commands in (``add``, ``abort``, ``stop``), and one message per
  loop iteration out: that step's outputs, its step stats (the front feeds the observer and
  keeps prefill times for ``GET /v1/buckets``), the other observer events (scheduler, finished
  request, kernels) and the state the front reads (load progress, ready, queue counts).
- The front keeps each request's asyncio queue. A reader thread receives the child's
  messages, hands outputs to the event loop (one wake-up per step), and feeds the metrics; a
  writer thread sends commands, so the event loop never blocks on a pipe.
- If the child dies, every request in flight gets :class:`EngineDead` and the failure callback
  runs (the server exits non-zero, as with a dead vLLM engine core). If the parent dies, the
  child sees its command pipe close and exits.

The child is started with ``spawn`` (safe with CUDA and Neuron runtimes, and with the threads
the parent already has), and builds its Engine from the :class:`server.engine.EngineConfig`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from scheduler import SamplingParams
from server.async_engine import AsyncEngine, EngineFront, EngineObserver, StepStats, _deliver
from server.engine import Engine, EngineConfig
from server.engine_client import (
    EngineDead,
    EngineState,
    FailureCallback,
)
from server.output import RequestOutput

log = logging.getLogger(__name__)

#: the front's fields the child keeps current (sent when they change)
STATE_FIELDS = ("state", "error", "load_seconds", "load_status", "load_progress",
                "num_waiting", "num_free_slots", "_applied")


# -- the child ------------------------------------------------------------------------------

class _Outbox:
    """What one loop iteration of the child sends back, in order."""

    def __init__(self) -> None:
        self.items: list[tuple] = []


class _Immediate:
    """Stands in for the event loop in the child: ``call_soon_threadsafe`` runs at once (it only
    appends to the outbox)."""

    @staticmethod
    def call_soon_threadsafe(fn: Any, *args: Any) -> None:
        fn(*args)


@dataclass
class _RemoteSink:
    """Stands in for a request's asyncio queue in the child. An output goes out as what is new
    in it (the front keeps the cumulative text, tokens and logprobs): a snapshot would carry
    the prompt and everything generated so far, every step, for every request."""

    request_id: str
    outbox: _Outbox

    def put_nowait(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self.outbox.items.append(("err", self.request_id, item))
        else:
            self.outbox.items.append(("out", self.request_id, (
                item.delta, item.new_token_ids, item.new_logprobs, item.finish_reason,
                item.stop_reason, item.produced_at)))


class _RemoteObserver:
    """The child's observer: every event goes back to the front's observer."""

    def __init__(self, outbox: _Outbox) -> None:
        self.outbox = outbox

    def __getattr__(self, event: str) -> Any:
        if not event.startswith("on_"):
            raise AttributeError(event)
        return lambda *stats: self.outbox.items.append(("obs", event, stats))

    def render(self) -> bytes:
        return b""


class _ChildEngine(AsyncEngine):
    """The thread engine's loop, run on the child's main thread, reporting through the pipe."""

    def __init__(self, config: EngineConfig, out: Connection) -> None:
        self._outbox = _Outbox()
        self._out = out
        self._sent_state: dict[str, Any] = {}
        self._sent_info = False
        super().__init__(lambda: Engine.from_config(config, on_progress=self.report_load),
                         observer=_RemoteObserver(self._outbox), on_failure=None)

    def _state_changed(self) -> None:
        if self._info is not None and not self._sent_info:  # before "ready" reaches the front
            self._sent_info = True
            self._outbox.items.append(("info", self._info))
        state = {f: getattr(self, f) for f in STATE_FIELDS}
        if state != self._sent_state:
            self._sent_state = state
            self._outbox.items.append(("state", state))
        if self.state != EngineState.READY:  # loading or failed: nothing else would flush
            self._flush()

    def _on_step(self, stats: StepStats) -> None:
        """Sent as they are: the front records them and tells its observer."""
        self._outbox.items.append(("step", stats))

    def _flush(self) -> None:
        if self._outbox.items:
            items, self._outbox.items = self._outbox.items, []
            self._out.send(items)

    def add(self, request_id: str, ids: list[int], params: SamplingParams,
            arrival: float) -> None:
        self._submitted += 1
        self._commands.put(("add", request_id, ids, params, arrival, _Immediate,
                            _RemoteSink(request_id, self._outbox)))
        self._wake.set()


def _child_main(config: EngineConfig, commands: Connection, out: Connection,
                log_level: int) -> None:
    """The engine process: read commands on a thread, run the loop on the main thread."""
    # the parent decides when to stop (after draining HTTP); if it dies, the pipe closes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    child = _ChildEngine(config, out)

    def read() -> None:
        try:
            while True:
                cmd = commands.recv()
                if cmd[0] == "add":
                    child.add(*cmd[1:])
                elif cmd[0] == "abort":
                    child._abort(cmd[1])
                else:  # "stop"
                    break
        except (EOFError, OSError):  # the parent is gone
            pass
        child._stop.set()
        child._wake.set()

    threading.Thread(target=read, name="ragserve-engine-commands", daemon=True).start()
    child._run()


# -- the front ------------------------------------------------------------------------------

@dataclass
class _Tracked:
    """A request in the front: where its outputs go, and what it has produced so far."""

    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue
    request_id: str
    prompt_token_ids: tuple[int, ...]
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple = ()

    def snapshot(self, new: tuple) -> RequestOutput:
        """The cumulative output after ``new`` (what the child's _RemoteSink sent)."""
        delta, new_token_ids, new_logprobs, finish_reason, stop_reason, produced_at = new
        self.text += delta
        self.token_ids += new_token_ids
        if new_logprobs:
            self.logprobs += new_logprobs
        return RequestOutput(
            request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
            text=self.text, delta=delta, token_ids=self.token_ids,
            new_token_ids=new_token_ids, logprobs=self.logprobs, new_logprobs=new_logprobs,
            finish_reason=finish_reason, stop_reason=stop_reason, produced_at=produced_at)


class ProcessEngine(EngineFront):
    """The front of ragserve's engine in a child process; the same interface as
    :class:`server.async_engine.AsyncEngine`."""

    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None,
                 on_failure: FailureCallback | None = None) -> None:
        super().__init__(observer, on_failure)
        self._config = config
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()  # _tracked: the event loop adds, the reader removes
        self._process: multiprocessing.process.BaseProcess | None = None
        self._stopping = False

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        cmd_recv, cmd_send = ctx.Pipe(duplex=False)
        out_recv, out_send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_child_main, name="ragserve-engine-core",
                                    args=(self._config, cmd_recv, out_send,
                                          logging.getLogger().getEffectiveLevel()),
                                    daemon=True)
        self._process.start()
        cmd_recv.close()
        out_send.close()
        threading.Thread(target=self._write, args=(cmd_send,), name="ragserve-engine-writer",
                         daemon=True).start()
        threading.Thread(target=self._read, args=(out_recv,), name="ragserve-engine-reader",
                         daemon=True).start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(("stop",))
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(5)
        self.state = EngineState.STOPPED

    # -- requests (EngineFront.generate calls these on the event loop) ------------------

    def _submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                arrival: float, loop: asyncio.AbstractEventLoop, sink: asyncio.Queue) -> None:
        with self._lock:
            self._tracked[request_id] = _Tracked(loop, sink, request_id,
                                                 tuple(prompt_token_ids))
        self._commands.put(("add", request_id, prompt_token_ids, params, arrival))

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._tracked.pop(request_id, None)

    def _abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # -- threads ---------------------------------------------------------------------------

    def _write(self, conn: Connection) -> None:
        """Commands to the child, in order, off the event loop."""
        try:
            while True:
                cmd = self._commands.get()
                conn.send(cmd)
                if cmd[0] == "stop":
                    return
        except (OSError, EOFError):  # the child is gone: the reader reports it
            pass
        finally:
            conn.close()

    def _read(self, conn: Connection) -> None:
        """The child's messages: outputs to their requests' event loops (one wake-up per loop
        per message), step stats and events to the observer, state to this front."""
        try:
            while True:
                items = conn.recv()
                deliveries: dict[asyncio.AbstractEventLoop, list] = {}
                for item in items:
                    kind = item[0]
                    if kind in ("out", "err"):
                        with self._lock:
                            tracked = self._tracked.get(item[1])
                        if tracked is not None:
                            output = tracked.snapshot(item[2]) if kind == "out" else item[2]
                            deliveries.setdefault(tracked.loop, []).append((tracked.sink,
                                                                            output))
                    elif kind == "step":
                        self._on_step(item[1])
                    elif kind == "obs":
                        self._notify(item[1], *item[2])
                    elif kind == "state":
                        self._apply_state(item[1])
                    elif kind == "info":
                        self._info = item[1]
                for loop, batch in deliveries.items():
                    loop.call_soon_threadsafe(_deliver, batch)
        except (EOFError, OSError):
            pass
        self._child_gone()

    def _apply_state(self, state: dict[str, Any]) -> None:
        before = self.state
        for name, value in state.items():
            setattr(self, name, value)
        if self.state == EngineState.FAILED and before != EngineState.FAILED:
            log.error("engine failed to load: %s", self.error)
            if self._on_failure is not None:
                self._on_failure(RuntimeError(self.error or "engine failed"))

    def _child_gone(self) -> None:
        """The child's pipe closed: at shutdown, expected; otherwise the engine died."""
        code = self._process.exitcode if self._process is not None else None
        if self._process is not None and code is None:
            self._process.join(5)
            code = self._process.exitcode
        error = EngineDead("the server is shutting down" if self._stopping else
                           f"the engine process exited (code {code})")
        with self._lock:
            tracked, self._tracked = list(self._tracked.values()), {}
        for t in tracked:
            t.loop.call_soon_threadsafe(t.sink.put_nowait, error)
        if self._stopping or self.state == EngineState.FAILED:
            return
        self.state, self.error = EngineState.FAILED, str(error)
        log.error("%s", error)
        if self._on_failure is not None:
            self._on_failure(error)
