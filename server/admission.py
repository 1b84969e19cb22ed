"""Admission by expected queue wait, and the bound on waiting for admitted requests.

A request that cannot get a sequence slot at once waits in the engine's queue until as many
requests have left their slots (finished, or cut off by their client) as are ahead of it.
They leave at a rate measured two ways, the lower one counting:

- the departures themselves, once :data:`MIN_DEPARTURES` happened in the last
  :data:`RATE_WINDOW_SECONDS`: over the whole window and over its last ``MIN_DEPARTURES``, both
  to now (a pause since the last departure counts), so that a slowdown shows within a few
  departures. It counts what a model misses (the prefills of the requests that take the freed
  slots, time between steps).
- the pace: ``slots / holding time``, where a request holds its slot for its output tokens
  (the mean of the last that left) times the step time (the mean time between two outputs of
  a running request, on the engine's clock; the mean, not the median: the long steps that
  prefill new prompts count). A slower engine shows within a few steps, long before its
  requests leave.

Before either, the holding time is the median service time of the last finished requests
(their first output to their end); before that, nothing is known and the first requests are
admitted on the queue's length alone. The expected wait is ``ahead / rate``, but at least one
holding time per round of the slots: after a burst onto free slots every running request has
just started, and the first leaves a whole holding time later.

A request is admitted only if it is expected to start within :data:`ADMIT_SHARE` of
``--max-queue-wait`` from its arrival: the estimate is a mean, the bound a deadline, and the
engine may slow down after the request is admitted (another process takes the CPU, longer
prompts join): the rest of the bound is the margin for that. Otherwise it is refused at once
with 429 and a ``Retry-After``: when enough will have left for it to fit. Requests admitted
whose streams have not reached the engine yet are counted here (a reservation) until the
engine counts them.

The estimate corrects itself: the admitted requests that queued are checked when they start
(or give up) against what was expected of them, and while they waited longer, the expected
waits are multiplied by how much longer (:meth:`Admission.correction`).

An admitted request that still has no output when the bound passes while requests wait for a
slot is ended with an error (:class:`QueueTimeout`), never left silent; one that waits only for
the prefills ahead of it (a burst onto free slots) is being served and waits on, up to
:data:`COMPUTE_WAIT_FACTOR` times the bound. A streamed one gets SSE comments while requests
wait for a slot, so that proxies and clients do not time out.

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
#: the departure rate is used once this many departures happened within RATE_WINDOW_SECONDS;
#: it is also taken over the last this many (the lower of the two counts)
MIN_DEPARTURES = 16
RATE_WINDOW_SECONDS = 60.0
#: ... and they span at least this long (16 requests leaving in one step say little)
MIN_RATE_SPAN_SECONDS = 5.0
#: times between two outputs of a running request the step time is the mean of (16 steps of
#: 16 running requests), and how many it needs
PACE_WINDOW = 256
MIN_PACE_GAPS = 8
#: an admitted request is expected to start within this share of --max-queue-wait (the rest
#: is the margin for an engine that slows down while it waits)
ADMIT_SHARE = 0.5
#: the correction is the median of the last this many (waited / expected) of admitted requests
#: that had to wait, within RATE_WINDOW_SECONDS; expectations under this many seconds are
#: not checked (a prefill step is noise to them)
CORRECTION_WINDOW = 16
MIN_CHECKED_WAIT = 1.0
#: an admitted request counts as waiting here until its stream starts (the engine counts it
#: from then on, which may be after other requests' checks) or, if it never starts, this long
RESERVATION_SECONDS = 5.0
#: an admitted request past --max-queue-wait while no request waits for a slot (it waits for
#: the prefills ahead of it) is ended only after this many times the bound, rechecked this often
COMPUTE_WAIT_FACTOR = 4.0
COMPUTE_RECHECK_SECONDS = 1.0
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
        self._tokens: deque[int] = deque(maxlen=SERVICE_WINDOW)  # of departed requests
        self._gaps: deque[float] = deque(maxlen=PACE_WINDOW)
        self._reserved: dict[int, tuple[float, int]] = {}  # token -> (admitted at, requests)
        # token -> (arrival, expected wait from arrival) of admitted requests that queue
        self._expected: dict[int, tuple[float, float]] = {}
        self._errors: deque[tuple[float, float]] = deque(maxlen=CORRECTION_WINDOW)
        self._ids = itertools.count()

    def admit(self, engine_waiting: Callable[[int], int], n_new: int,
              waited: float = 0.0) -> int:
        """Admit ``n_new`` requests or raise the 429 (:meth:`check`). ``engine_waiting(n)``
        is the engine's count of requests that would wait if ``n`` more arrived; requests
        admitted here whose streams have not reached the engine yet are added to ``n``.
        ``waited``: seconds since the request arrived (they count against the bound too).
        Returns a token for :meth:`release` (once the engine has the requests) and
        :meth:`started` / :meth:`ended` (what its wait was)."""
        now = time.monotonic()
        wait = self.precheck(engine_waiting, n_new, now, waited)
        token = next(self._ids)
        self._reserved[token] = (now, n_new)
        for old, (arrival, _) in list(self._expected.items()):  # ended unseen: forgotten
            if now - arrival > self.max_queue_wait + RESERVATION_SECONDS:
                del self._expected[old]
        if wait >= MIN_CHECKED_WAIT:
            self._expected[token] = (now - waited, waited + wait)
        return token

    def precheck(self, engine_waiting: Callable[[int], int], n_new: int,
                 now: float | None = None, waited: float = 0.0) -> float:
        """:meth:`admit`'s check without the reservation (before a request's costly part).
        Returns the expected wait (:meth:`check`)."""
        return self.check(engine_waiting(n_new + self.reserved), now, waited)

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

    def started(self, token: int, now: float | None = None) -> None:
        """The first output of the requests of ``token`` came: how long they waited against
        what was expected goes into :meth:`correction`."""
        expected = self._expected.pop(token, None)
        if expected is not None:
            now = time.monotonic() if now is None else now
            arrival, wait = expected
            self._errors.append((now, (now - arrival) / wait))

    def ended(self, token: int, now: float | None = None) -> None:
        """The requests of ``token`` ended without an output (the bound, or their client):
        they waited at least that long, which counts if it is longer than expected."""
        expected = self._expected.pop(token, None)
        now = time.monotonic() if now is None else now
        if expected is not None and now - expected[0] > expected[1]:
            self._errors.append((now, (now - expected[0]) / expected[1]))

    def correction(self, now: float | None = None) -> float:
        """How much longer than expected the last admitted requests that queued waited: the
        median of their (waited / expected) within RATE_WINDOW_SECONDS, at least 1. The
        expected waits are multiplied by it: an estimate that proved short (an engine slowed
        by another process) admits less until it proves right again.

        >>> a = Admission(slots=4, max_queue_len=100, max_queue_wait=30)
        >>> for ratio in (0.5, 2.0, 3.0): a._errors.append((100.0, ratio))
        >>> a.correction(now=101.0), a.correction(now=200.0)
        (2.0, 1.0)
        """
        now = time.monotonic() if now is None else now
        recent = [r for t, r in self._errors if now - t <= RATE_WINDOW_SECONDS]
        return max(1.0, statistics.median(recent)) if recent else 1.0

    def observe_service(self, seconds: float, now: float | None = None,
                        tokens: int | None = None) -> None:
        """A request left its slot (``now``, ``time.monotonic()``) ``seconds`` after its first
        output, with ``tokens`` output tokens (None: not known)."""
        self._service.append(max(0.0, seconds))
        self._departures.append(time.monotonic() if now is None else now)
        if tokens is not None:
            self._tokens.append(max(1, tokens))

    def observe_step(self, seconds: float) -> None:
        """A running request's output came ``seconds`` after its previous one: one step."""
        if seconds > 0:
            self._gaps.append(seconds)

    @property
    def service_seconds(self) -> float | None:
        """Median service time of the last finished requests (None before the first)."""
        return statistics.median(self._service) if self._service else None

    def departure_rate(self, now: float | None = None) -> float | None:
        """Requests leaving their slots per second, measured over the last departures (None
        until MIN_DEPARTURES happened within RATE_WINDOW_SECONDS of ``now``): the lower of
        the rates over the window and over its last MIN_DEPARTURES, both to ``now``."""
        now = time.monotonic() if now is None else now
        recent = [t for t in self._departures if now - t <= RATE_WINDOW_SECONDS]
        if len(recent) < MIN_DEPARTURES or now - recent[0] < MIN_RATE_SPAN_SECONDS:
            return None
        rate = len(recent) / (now - recent[0])  # to now: a pause since the last one counts
        last = recent[-MIN_DEPARTURES]
        if now - last >= MIN_RATE_SPAN_SECONDS:
            rate = min(rate, MIN_DEPARTURES / (now - last))
        return rate

    def holding_seconds(self) -> float | None:
        """How long a request holds its slot at the engine's present pace: its tokens (the
        mean of the last that left) times the step time (the mean of the last times between
        two outputs of a running request); before both are measured, the median service
        time; None before that."""
        if self._tokens and len(self._gaps) >= MIN_PACE_GAPS:
            return statistics.fmean(self._tokens) * statistics.fmean(self._gaps)
        return self.service_seconds

    def rate(self, now: float | None = None) -> float | None:
        """Requests leaving their slots per second: the lower of the measured departure rate
        and ``slots / holding_seconds`` (None before either)."""
        holding = self.holding_seconds()
        rates = [r for r in (self.departure_rate(now),
                             self.slots / holding if holding else None) if r is not None]
        return min(rates) if rates else None

    def drain_seconds(self, n: int, now: float | None = None) -> float:
        """Seconds until ``n`` more requests have left their slots at :meth:`rate` (0 when
        none is to leave or nothing has been measured yet): when a refused request would fit.
        """
        rate = self.rate(now)
        return 0.0 if n <= 0 or rate is None else n / rate

    def expected_wait(self, ahead: int, now: float | None = None) -> float:
        """Seconds until ``ahead`` more requests have left their slots: :meth:`drain_seconds`,
        but at least a holding time per round of the slots, since the running requests may
        all have just started (a burst onto free slots), and then the first leaves a whole
        holding time later. 0 when none is ahead or nothing has been measured yet: the first
        requests are admitted on the queue length alone.

        >>> a = Admission(slots=4, max_queue_len=100, max_queue_wait=30)
        >>> a.expected_wait(8)
        0.0
        >>> for _ in range(3): a.observe_service(2.0, now=0.0)
        >>> a.expected_wait(8), a.expected_wait(2), a.expected_wait(0)  # 4 slots, 2 s each
        (4.0, 2.0, 0.0)
        >>> for t in range(16): a.observe_service(2.0, now=100.0 + t)  # 1 per second
        >>> a.expected_wait(8, now=116.0)
        8.0
        >>> for _ in range(8): a.observe_step(0.1)  # 100 tokens x 0.1 s: 10 s in a slot
        >>> for _ in range(16): a.observe_service(10.0, now=116.0, tokens=100)
        >>> a.drain_seconds(8, now=116.0), a.expected_wait(8, now=116.0)
        (20.0, 20.0)
        >>> a.drain_seconds(1, now=116.0), a.expected_wait(1, now=116.0)
        (2.5, 10.0)
        """
        if ahead <= 0:
            return 0.0
        rounds = math.ceil(ahead / self.slots)
        return max(self.drain_seconds(ahead, now), rounds * (self.holding_seconds() or 0.0))

    def allowed(self, seconds: float, now: float | None = None) -> int:
        """How many requests may wait so that the last is expected to start within
        ``seconds`` (the inverse of :meth:`expected_wait`)."""
        rate, holding = self.rate(now), self.holding_seconds()
        if seconds <= 0 or rate is None or not holding:
            return 0
        return min(math.floor(seconds * rate), math.floor(seconds / holding) * self.slots)

    def check(self, waiting_after: int, now: float | None = None,
              waited: float = 0.0) -> float:
        """Raise a 429 unless a request that leaves ``waiting_after`` requests waiting (itself
        included; 0 if it gets a slot at once) may queue: it must be expected to start within
        ADMIT_SHARE of --max-queue-wait of its arrival, ``waited`` seconds ago (its expected
        wait times :meth:`correction`). The ``Retry-After``: when enough will have left for
        it to fit, at :meth:`rate` (times the correction). Returns the expected wait."""
        if waiting_after <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        slow = self.correction(now)
        if waiting_after > self.max_queue_len:
            raise APIError(
                429, f"the queue is full: {waiting_after - 1} requests waiting "
                     f"(--max-queue-len {self.max_queue_len}); retry later",
                code="queue_full",
                headers=retry_after(slow * self.drain_seconds(
                    waiting_after - self.max_queue_len, now)))
        wait = slow * self.expected_wait(waiting_after, now)
        target = ADMIT_SHARE * self.max_queue_wait
        if waited + wait > target:
            rate, holding = self.rate(now) or 0.0, self.holding_seconds() or 0.0
            allowed = self.allowed((target - waited) / slow, now)
            late = (f"; the last waits were {slow:.1f}x what was expected, so is this one"
                    if slow > 1 else "")
            raise APIError(
                429, f"the server is overloaded: expected wait {wait:.0f} s for a sequence slot "
                     f"({waiting_after - 1} requests waiting, {rate:.2f} requests/s leaving "
                     f"their slots, {holding:.1f} s in a slot{late}) exceeds {target:g} s, "
                     f"the share of --max-queue-wait {self.max_queue_wait:g} s a request is "
                     "admitted for; retry later",
                code="queue_wait_exceeded",
                headers=retry_after(slow * self.drain_seconds(waiting_after - allowed, now)))
        return wait / slow


class Served:
    """What admission learns from the outputs of one HTTP request's engine streams: how long
    it waited (its first output, against what was expected of ``token``, its admission), the
    time between two outputs of a running stream (a step), and when each stream leaves its
    slot, finished or cut off (:meth:`close`, once the HTTP request is done), with its tokens.
    A stream that never produced an output never held a slot: it is no departure."""

    def __init__(self, admission: Admission, token: int | None = None) -> None:
        self.admission = admission
        self.token = token
        self._first: dict[int, float] = {}  # stream -> its first output (time.monotonic())
        self._last: dict[int, tuple[float, int]] = {}  # stream -> (produced_at, tokens)

    def output(self, i: int, produced_at: float, tokens: int, finished: bool,
               now: float) -> None:
        """Stream ``i``'s output made at ``produced_at`` (the engine's clock; 0: unknown)."""
        if not self._first and self.token is not None:
            self.admission.started(self.token, now)
        start = self._first.setdefault(i, now)
        last = self._last.get(i)
        if last is not None and produced_at and last[0]:
            self.admission.observe_step(produced_at - last[0])
        if finished:
            self._last.pop(i, None)
            self.admission.observe_service(now - start, now, tokens)
        else:
            self._last[i] = (produced_at, tokens)

    def close(self, now: float | None = None) -> None:
        """The HTTP request is done: its streams that started and did not finish were cut off
        (a disconnect, a failure) and have left their slots."""
        now = time.monotonic() if now is None else now
        if not self._first and self.token is not None:
            self.admission.ended(self.token, now)
        for i, (_, tokens) in self._last.items():
            self.admission.observe_service(now - self._first[i], now, tokens)
        self._last.clear()


async def first_within(source: AsyncIterator[T], arrival: float, bound: float,
                       keepalive: float | None, settled: Callable[[], None] | None = None,
                       drain: Callable[[], float] | None = None,
                       starved: Callable[[], bool] | None = None
                       ) -> AsyncIterator[T | KeepAlive]:
    """``source``'s items; until the first, a :data:`KEEPALIVE` every ``keepalive`` seconds
    (None: none) and :class:`QueueTimeout` once ``bound`` seconds have passed since
    ``arrival`` (``time.monotonic()``), which closes ``source`` (aborting its requests). After
    the first item it only passes items on. ``settled`` (which may be called more than once) is
    called when it ends, for a source that never started its streams: the source itself ends
    a reservation as soon as the engine counts its requests (``server.serving.merged``'s
    ``started``). ``drain()``: the seconds until the queue frees a slot, which the timeout
    carries for its ``Retry-After``.

    The bound is on the wait for a sequence slot. ``starved()`` says whether requests wait for
    one now; while none does (a burst of prompts onto free slots, whose first tokens wait for
    the prefills before theirs, not for a slot), the timeout waits on, up to
    :data:`COMPUTE_WAIT_FACTOR` times the bound: the request is being served, only slowly. Nor
    does it get keepalives then: a slow first token is what clients expect of any server, and
    some clients lose the event after an SSE comment (``vllm bench serve`` 0.32 strips each read
    of the stream, so a comment merges with the next event and both are dropped).
    """
    it = source.__aiter__()
    deadline = arrival + bound
    beat = time.monotonic() + (keepalive or 0.0)  # the next keepalive
    nxt = asyncio.ensure_future(it.__anext__())
    try:
        while not nxt.done():  # checked first: it may have come while a keepalive was sent
            now = time.monotonic()
            if now >= deadline:
                if starved is None or starved() or now - arrival >= COMPUTE_WAIT_FACTOR * bound:
                    raise QueueTimeout(now - arrival, bound,
                                       drain() if drain is not None else 0.0)
                deadline = now + min(COMPUTE_RECHECK_SECONDS, bound)
            wake = deadline if keepalive is None else min(deadline, beat)
            done, _ = await asyncio.wait({nxt}, timeout=max(0.0, wake - now))
            if not done and keepalive is not None and time.monotonic() >= beat:
                beat = time.monotonic() + keepalive
                if time.monotonic() < deadline and (starved is None or starved()):
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
