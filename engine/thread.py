"""ThreadEngine: ragserve's engine loop on a thread of the server process
(``--engine-process false``); the :class:`~engine.client.EngineClient` of ``--engine ragserve``
when the loop shares the server's interpreter.

The loop (:class:`engine.loop.EngineLoop`) hands its reports straight to the front on the
engine thread; outputs reach their requests' event loops with one wake-up per step.
"""

from __future__ import annotations

import threading

from engine.client import EngineDead, EngineState, FailureCallback
from engine.front import EngineFront
from engine.loop import EngineFactory, EngineLoop
from engine.messages import Command, Stop
from engine.stats import EngineObserver


class ThreadEngine(EngineFront):
    """Thread-safe front of ragserve's engine; ``generate`` is an async iterator of outputs."""

    def __init__(self, factory: EngineFactory, observer: EngineObserver | None = None,
                 on_failure: FailureCallback | None = None) -> None:
        super().__init__(observer, on_failure)
        self._loop = EngineLoop(factory, self._receive)
        self._thread = threading.Thread(target=self._loop.run, name="ragserve-engine",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._loop.put(Stop())
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.state = EngineState.STOPPED
        self._fail_streams(EngineDead("the server is shutting down"))

    def _send(self, command: Command) -> None:
        self._loop.put(command)
