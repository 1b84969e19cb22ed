"""Admission by expected queue wait, and the bound on waiting for admitted requests.

A request that cannot get a sequence slot at once waits in the engine's queue. Its wait is
about ``ahead / rate``: the requests ahead of it leave at the rate requests leave their slots.
That rate is measured: the departures of the last requests that held a slot (finished or
aborted), when at least :data:`MIN_DEPARTURES` of them happened in the last
:data:`RATE_WINDOW_SECONDS`; before that, it is ``slots / service time`` (the median of the last
finished requests, from their first output to their end). The measured rate counts what the
model alone misses (prefills of the requests that take the freed slots, time between steps),
so under overload it is the one that holds. A request expected to wait more than
``--max-queue-wait`` is refused at once with 429 and a ``Retry-After`` computed the same way.
The estimate can still be wrong (long requests ahead), so an admitted request that still has no
output when the bound passes is ended with an error (:class:`QueueTimeout`), never left silent;
a streamed one meanwhile gets SSE comments, so that proxies and clients do not time out.

Engine-independent: it reads only ``projected_waiting`` and the outputs the server sees.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from server.errors import APIError, QueueTimeout, retry_after

T = TypeVar("T")

#: finished requests the service time is the median of, and the departure rate is taken over
SERVICE_WINDOW = 64
#: the departure rate is used once this many departures happened within RATE_WINDOW_SECONDS
MIN_DEPARTURES = 16
RATE_WINDOW_SECONDS = 60.0
#: ... and they span at least this long (16 requests leaving in one step say little)
MIN_RATE_SPAN_SECONDS = 5.0
#: an admitted request counts as waiting here until its stream starts (the engine counts it
#: from then on, which may be after other requests' checks) or, if it never starts, this long
RESERVATION_SECONDS = 5.0
#: at most this long between SSE comments while a stream waits for its first output
KEEPALIVE_SECONDS = 10.0


class KeepAlive:
    """Yielded by :func:`first_within` while the first output is awaited."""


KEEPALIVE = KeepAlive()


class Admission:
    """Decides whether a request may queue, from the queue's length and its expected wait."""

    def __init__(self, slots: int, max_queue_len: int, max_queue_wait: float) -> None:
        self.slots = slots
        self.max_queue_len = max_queue_len
        self.max_queue_wait = max_queue_wait
        self._service: deque[float] = deque(maxlen=SERVICE_WINDOW)
        self._departures: deque[float] = deque(maxlen=SERVICE_WINDOW)
        self._reserved: dict[int, tuple[float, int]] = {}  # token -> (admitted at, requests)
        self._tokens = itertools.count()

    def admit(self, engine_waiting: Callable[[int], int], n_new: int) -> int:
        """Admit ``n_new`` requests or raise the 429 (:meth:`check`). ``engine_waiting(n)``
        is the engine's count of requests that would wait if ``n`` more arrived; requests
        admitted here whose streams have not reached the engine yet are added to ``n``.
        Returns a token for :meth:`release` (once the engine has the requests)."""
        now = time.monotonic()
        self.precheck(engine_waiting, n_new, now)
        token = next(self._tokens)
        self._reserved[token] = (now, n_new)
        return token

    def precheck(self, engine_waiting: Callable[[int], int], n_new: int,
                 now: float | None = None) -> None:
        """:meth:`admit`'s check without the reservation (before a request's costly part)."""
        self.check(engine_waiting(n_new + self.reserved), now)

    @property
    def reserved(self) -> int:
        """Requests admitted here that the engine may not count yet (reservations expire
        after RESERVATION_SECONDS)."""
        now = time.monotonic()
        for token, (at, _) in list(self._reserved.items()):
            if now - at > RESERVATION_SECONDS:
                del self._reserved[token]
        return sum(n for _, n in self._reserved.values())

    def release(self, token: int) -> None:
        """The admitted requests of ``token`` are in the engine (its counts have them)."""
        self._reserved.pop(token, None)

    def observe_service(self, seconds: float, now: float | None = None) -> None:
        """A request left its slot (``now``, ``time.monotonic()``) ``seconds`` after its first
        output."""
        self._service.append(max(0.0, seconds))
        self._departures.append(time.monotonic() if now is None else now)

    @property
    def service_seconds(self) -> float | None:
        """Median service time of the last finished requests (None before the first)."""
        return statistics.median(self._service) if self._service else None

    def departure_rate(self, now: float | None = None) -> float | None:
        """Requests leaving their slots per second, measured over the last departures (None
        until MIN_DEPARTURES happened within RATE_WINDOW_SECONDS of ``now``)."""
        now = time.monotonic() if now is None else now
        recent = [t for t in self._departures if now - t <= RATE_WINDOW_SECONDS]
        if len(recent) < MIN_DEPARTURES or now - recent[0] < MIN_RATE_SPAN_SECONDS:
            return None
        return len(recent) / (now - recent[0])  # to now: a pause since the last one counts

    def expected_wait(self, ahead: int, now: float | None = None) -> float:
        """Seconds until ``ahead`` more requests have left their slots (0 when none is ahead
        or nothing has been measured yet: the first requests are admitted on the queue length
        alone).

        >>> a = Admission(slots=4, max_queue_len=100, max_queue_wait=30)
        >>> a.expected_wait(8)
        0.0
        >>> for _ in range(3): a.observe_service(10.0, now=0.0)
        >>> a.expected_wait(8), a.expected_wait(0)  # slots / service: 8 x 10 s / 4
        (20.0, 0.0)
        >>> for t in range(16): a.observe_service(10.0, now=100.0 + t / 2)  # 2 per second
        >>> a.expected_wait(8, now=108.0)
        4.0
        """
        if ahead <= 0:
            return 0.0
        rate = self.departure_rate(now)
        if rate is not None:
            return ahead / rate
        service = self.service_seconds
        return 0.0 if service is None else ahead * service / self.slots

    def check(self, waiting_after: int, now: float | None = None) -> None:
        """Raise a 429 unless a request that leaves ``waiting_after`` requests waiting (itself
        included; 0 if it gets a slot at once) may queue."""
        if waiting_after <= 0:
            return
        if waiting_after > self.max_queue_len:
            raise APIError(
                429, f"the queue is full: {waiting_after - 1} requests waiting "
                     f"(--max-queue-len {self.max_queue_len}); retry later",
                code="queue_full",
                headers=retry_after(self.expected_wait(waiting_after - self.max_queue_len)))
        wait = self.expected_wait(waiting_after, time.monotonic() if now is None else now)
        if wait > self.max_queue_wait:
            per_s = waiting_after / wait
            allowed = math.floor(self.max_queue_wait * per_s)
            raise APIError(
                429, f"the server is overloaded: expected wait {wait:.0f} s for a sequence slot "
                     f"({waiting_after - 1} requests waiting, {per_s:.2f} requests/s leaving "
                     f"their slots) exceeds --max-queue-wait {self.max_queue_wait:g} s; "
                     "retry later",
                code="queue_wait_exceeded",
                headers=retry_after(self.expected_wait(waiting_after - allowed)))


async def first_within(source: AsyncIterator[T], arrival: float, bound: float,
                       keepalive: float | None, settled: Callable[[], None] | None = None,
                       drain: Callable[[], float] | None = None
                       ) -> AsyncIterator[T | KeepAlive]:
    """``source``'s items; until the first, a :data:`KEEPALIVE` every ``keepalive`` seconds
    (None: none) and :class:`QueueTimeout` once ``bound`` seconds have passed since
    ``arrival`` (``time.monotonic()``), which closes ``source`` (aborting its requests). After
    the first item it only passes items on. ``settled`` is called as the source starts (the
    engines count a request from its stream's first step, one turn of the event loop later:
    for that turn it is counted by neither, rather than by both, which would refuse requests
    that fit). ``drain()``: the seconds until the queue frees a slot, which the timeout carries
    for its ``Retry-After``.
    """
    it = source.__aiter__()
    deadline = arrival + bound
    if settled is not None:
        settled()
        settled = None
    nxt = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QueueTimeout(time.monotonic() - arrival, bound,
                                   drain() if drain is not None else 0.0)
            timeout = left if keepalive is None else min(left, keepalive)
            done, _ = await asyncio.wait({nxt}, timeout=timeout)
            if done:
                break
            if keepalive is not None and deadline - time.monotonic() > 0:
                yield KEEPALIVE
        try:
            first = nxt.result()
        except StopAsyncIteration:
            return
        nxt = None
        yield first
        async for item in it:
            yield item
    finally:
        if settled is not None:
            settled()
        if nxt is not None and not nxt.done():
            nxt.cancel()
            await asyncio.gather(nxt, return_exceptions=True)
        await it.aclose()  # type: ignore[attr-defined]
