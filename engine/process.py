"""ProcessEngine: ragserve's engine loop in a process of its own, so that the API side (request
parsing, validation, SSE writing, 429 storms) cannot take the interpreter from it; the
:class:`~engine.client.EngineClient` of ``--engine ragserve`` (``--engine-process``, the
default).

The design is vLLM v1's (``EngineCoreProc`` behind ``AsyncLLM``'s ``EngineCoreClient``), cut to
what ragserve needs:

- The child ("engine core") runs the same loop as the thread front
  (:class:`engine.loop.EngineLoop`: apply adds and aborts, step, time each request for
  metrics), model load included, on its main thread. Detokenization and stop strings run there
  too, since they decide when a request finishes.
- Two pipes of pickled :mod:`engine.messages`: commands in (``AddRequest``, ``AbortRequest``,
  ``Stop``), and one list per loop iteration out: each request's :class:`OutputDelta` (only
  what is new: a snapshot would carry the prompt and everything generated so far, every step,
  for every request), the stats reports and the status.
- The front keeps each request's stream and rebuilds its cumulative output from the deltas. A
  reader thread receives the child's messages and hands them to the shared
  :meth:`EngineFront._receive` (outputs to the event loop, one wake-up per step; stats to the
  observer; status to the front); a writer thread sends commands, so the event loop never
  blocks on a pipe.
- If the child dies, every request in flight gets :class:`EngineDead` and the failure callback
  runs (the server exits non-zero, as with a dead vLLM engine core). If the parent dies, the
  child sees its command pipe close and exits.

The child is started with ``spawn`` (safe with CUDA and Neuron runtimes, and with the threads
the parent already has), and builds its Engine from the :class:`engine.core.EngineConfig`.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
from multiprocessing.connection import Connection

from engine.client import EngineDead, EngineState, FailureCallback
from engine.core import Engine, EngineConfig, ProgressCallback
from engine.front import EngineFront
from engine.loop import EngineLoop
from engine.messages import Command, Kind, OutputDelta, Report, Stop
from engine.output import RequestOutput
from engine.stats import EngineObserver

log = logging.getLogger(__name__)


# -- the child ------------------------------------------------------------------------------

def _child_main(config: EngineConfig, commands: Connection, out: Connection,
                log_level: int) -> None:
    """The engine process: commands are read on a thread, the loop runs on the main thread."""
    # the parent decides when to stop (after draining HTTP); if it dies, the pipe closes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def build(progress: ProgressCallback) -> Engine:
        return Engine.from_config(config, on_progress=progress)

    def publish(outputs: list[RequestOutput], reports: list[Report]) -> None:
        out.send([OutputDelta.of(o) for o in outputs] + reports)

    loop = EngineLoop(build, publish)

    def read() -> None:
        try:
            while True:
                cmd = commands.recv()
                loop.put(cmd)
                if cmd.kind is Kind.STOP:
                    return
        except (EOFError, OSError):  # the parent is gone
            loop.put(Stop())

    threading.Thread(target=read, name="ragserve-engine-commands", daemon=True).start()
    loop.run()


# -- the front ------------------------------------------------------------------------------

class ProcessEngine(EngineFront):
    """The front of ragserve's engine in a child process; the same interface as
    :class:`engine.thread.ThreadEngine`."""

    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None,
                 on_failure: FailureCallback | None = None) -> None:
        super().__init__(observer, on_failure)
        self._config = config
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
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
        self._commands.put(Stop())
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(5)
        self.state = EngineState.STOPPED

    def _send(self, command: Command) -> None:
        self._commands.put(command)

    # -- threads ---------------------------------------------------------------------------

    def _write(self, conn: Connection) -> None:
        """Commands to the child, in order, off the event loop."""
        try:
            while True:
                cmd = self._commands.get()
                conn.send(cmd)
                if cmd.kind is Kind.STOP:
                    return
        except (OSError, EOFError):  # the child is gone: the reader reports it
            pass
        finally:
            conn.close()

    def _read(self, conn: Connection) -> None:
        """The child's messages, one list per loop iteration: deltas become each stream's
        cumulative output, and everything goes to :meth:`EngineFront._receive`."""
        try:
            while True:
                messages = conn.recv()
                outputs, reports = [], []
                with self._lock:
                    for m in messages:
                        if m.kind is Kind.OUTPUT:
                            stream = self._streams.get(m.request_id)
                            if stream is not None:
                                outputs.append(stream.apply(m))
                        else:
                            reports.append(m)
                self._receive(outputs, reports)
        except (EOFError, OSError):
            pass
        self._child_gone()

    def _child_gone(self) -> None:
        """The child's pipe closed: at shutdown, expected; otherwise the engine died."""
        code = self._process.exitcode if self._process is not None else None
        if self._process is not None and code is None:
            self._process.join(5)
            code = self._process.exitcode
        error = EngineDead("the server is shutting down" if self._stopping else
                           f"the engine process exited (code {code})")
        self._fail_streams(error)
        if self._stopping or self.state == EngineState.FAILED:
            return
        self.state, self.error = EngineState.FAILED, str(error)
        log.error("%s", error)
        if self._on_failure is not None:
            self._on_failure(error)
