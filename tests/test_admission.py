"""Bounded waiting: admission by expected queue wait (429 with an estimated Retry-After), an
admitted request that outwaits --max-queue-wait ends with an error (an SSE error event after
keep-alive comments, or a 503), and nothing is left behind in the engine.

The server runs ragserve's real engine (scheduler, runner, output processing) over a backend
whose every step takes STEP seconds, so that queue waits are long enough to measure and do not
depend on the speed of the machine."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import torch
from helpers import StubBackend
from serverutil import ThreadServer, metric, wait_ready

from bucketing import BucketConfig
from engine.core import Engine
from runtime.runner import ModelRunner
from scheduler import Scheduler
from server.admission import (
    KEEPALIVE,
    MIN_PACE_GAPS,
    PACE_WINDOW,
    Admission,
    QueueTimeout,
    Served,
    first_within,
)
from server.app import build_app
from server.config import ServerConfig
from server.errors import APIError

EOT = 128009
TOKEN = 1000
STEP = 0.05
BOUND = 1.0  # --max-queue-wait
LONG = 60  # tokens: at least 3 s of steps, well past BOUND


# -- the admission rule -------------------------------------------------------------------

def test_admits_on_queue_length_alone_until_a_service_time_is_measured():
    a = Admission(slots=2, max_queue_len=3, max_queue_wait=5)
    for waiting in (0, 1, 3):
        a.check(waiting)
    with pytest.raises(APIError) as e:
        a.check(4)
    assert e.value.status == 429 and e.value.code == "queue_full"
    assert e.value.headers["Retry-After"] == "1"  # no estimate yet: the minimum


def test_refuses_what_would_wait_longer_than_the_bound_with_an_estimated_retry_after():
    """Admitted: what is expected to start within half the bound (5 s of 10 s)."""
    a = Admission(slots=2, max_queue_len=100, max_queue_wait=10)
    for s in (4.0, 4.0, 100.0):  # the median, not the mean: one outlier does not decide
        a.observe_service(s)
    assert a.service_seconds == 4.0
    a.check(2)  # 2 ahead / 2 slots x 4 s = 4 s: admitted
    with pytest.raises(APIError) as e:
        a.check(3)  # the third waits for a second round of the slots: 8 s > 5 s
    err = e.value
    assert err.status == 429 and err.code == "queue_wait_exceeded"
    assert "expected wait 8 s" in err.message and "--max-queue-wait 10 s" in err.message
    # two may wait (5 s x 2 slots / 4 s); the third in line can come back once one has left
    assert err.headers["Retry-After"] == "2"
    with pytest.raises(APIError) as e:
        a.check(12)
    assert e.value.headers["Retry-After"] == "20"  # 10 requests must leave: 10 x 4 s / 2
    assert "expected wait 24 s" in e.value.message
    b = Admission(slots=2, max_queue_len=4, max_queue_wait=1e9)
    b.observe_service(3.0)
    with pytest.raises(APIError) as e:
        b.check(9)
    assert e.value.code == "queue_full" and e.value.headers["Retry-After"] == "8"  # 5 x 3 / 2


def test_the_measured_departure_rate_rules_once_there_are_enough_departures():
    """Under overload the slots turn over slower than slots / service time says (the prefills
    of the requests that take the freed slots, time between steps): the lower, measured rate
    rules."""
    a = Admission(slots=1, max_queue_len=100, max_queue_wait=10)
    for i in range(15):  # 1 s each on 1 slot would be 1/s; they leave at 0.5/s
        a.observe_service(1.0, now=1000.0 + 2 * i)
    assert a.departure_rate(now=1030.0) is None  # 15 < MIN_DEPARTURES: the model
    assert a.expected_wait(3, now=1030.0) == 3.0
    a.observe_service(1.0, now=1030.0)
    assert a.departure_rate(now=1032.0) == 0.5  # 16 departures over the 32 s to now
    assert a.expected_wait(3, now=1032.0) == 6.0
    assert a.departure_rate(now=1032.0 + 200) is None  # old departures say nothing
    b = Admission(slots=2, max_queue_len=100, max_queue_wait=10)
    for _ in range(16):  # all in one step: no rate from that
        b.observe_service(4.0, now=50.0)
    assert b.departure_rate(now=51.0) is None


def test_the_time_since_arrival_counts_against_the_bound():
    """A request that spent its time before the check (templating, retrieval, a starved event
    loop) has that much less of the bound left."""
    a = Admission(slots=2, max_queue_len=100, max_queue_wait=10)
    a.observe_service(4.0)
    a.check(2, waited=0.5)  # 0.5 + 4 s <= 5 s
    with pytest.raises(APIError) as e:
        a.check(2, waited=1.5)  # 1.5 + 4 s > 5 s
    assert e.value.code == "queue_wait_exceeded"
    # none may wait (3.5 s left is less than a holding time): once both ahead have left
    assert e.value.headers["Retry-After"] == "4"
    engine_waiting = lambda n: n  # noqa: E731 - a busy engine: every new request waits
    a.admit(engine_waiting, 2, waited=0.5)
    with pytest.raises(APIError):
        a.admit(engine_waiting, 1, waited=0.0)  # the 2 just admitted are ahead of it: 6 s


def test_the_last_departures_rule_when_they_are_slower_than_the_window():
    """An engine that slows down shows in its last MIN_DEPARTURES departures long before the
    window's rate falls: the lower rate counts."""
    a = Admission(slots=4, max_queue_len=100, max_queue_wait=100)
    for i in range(48):  # 4 per second
        a.observe_service(1.0, now=100.0 + i / 4)
    last = 100.0 + 47 / 4
    assert a.departure_rate(now=last) == pytest.approx(48 / (47 / 4))
    for i in range(1, 17):  # then one per second
        a.observe_service(1.0, now=last + i)
    now = last + 16
    window, tail = 64 / (now - 100.0), 16 / (now - (last + 1))
    assert tail < window
    assert a.departure_rate(now=now) == pytest.approx(tail)
    assert a.expected_wait(8, now=now) == pytest.approx(8 / tail)


def test_the_pace_of_running_requests_shows_a_slowdown_before_any_departure():
    """slots / (tokens x step): at 0.05 s a step, 2 slots of 20-token requests leave at 2 per
    second; when the steps take 0.25 s (another process took the CPU), at 0.4 per second once
    the last steps are the slow ones, whatever the departures said before. The step is the
    mean: a few long steps (prefills) weigh what they cost."""
    a = Admission(slots=2, max_queue_len=100, max_queue_wait=100)
    for i in range(16):  # 16 departures at 2 per second, 20 tokens each
        a.observe_service(1.0, now=100.0 + i / 2, tokens=20)
    for _ in range(64):
        a.observe_step(0.05)
    now = 108.0
    assert a.holding_seconds() == pytest.approx(1.0)  # 20 tokens x 0.05 s
    assert a.departure_rate(now=now) == pytest.approx(2.0) == a.rate(now=now)
    assert a.expected_wait(4, now=now) == pytest.approx(2.0)
    a.observe_step(0.05 + 65 * 0.2)  # one long step: the mean of the 65 is 0.25 s
    assert a.holding_seconds() == pytest.approx(5.0)
    assert a.rate(now=now) == pytest.approx(0.4)
    for _ in range(PACE_WINDOW):
        a.observe_step(0.25)
    assert a.rate(now=now) == pytest.approx(0.4)
    assert a.expected_wait(4, now=now) == pytest.approx(10.0)
    a.observe_step(0.0)  # two outputs of one step (the same instant) say nothing of its time
    assert a.holding_seconds() == pytest.approx(5.0)


def test_after_a_burst_onto_free_slots_the_first_in_line_waits_a_whole_holding_time():
    """4 slots, 10 s in a slot: in the steady state one leaves every 2.5 s, but the slots may
    all have just been filled at once, so the first four in line wait up to 10 s and the fifth
    up to 20 s. With --max-queue-wait 30 (15 s for admission) four may wait; the fifth may
    come back when one has left at the steady rate."""
    a = Admission(slots=4, max_queue_len=100, max_queue_wait=30)
    a.observe_service(10.0, tokens=100)
    for _ in range(MIN_PACE_GAPS):
        a.observe_step(0.1)
    assert a.drain_seconds(1) == pytest.approx(2.5) and a.expected_wait(1) == 10.0
    assert a.expected_wait(4) == 10.0 and a.expected_wait(5) == 20.0
    assert a.allowed(15.0) == 4
    a.check(4)
    with pytest.raises(APIError) as e:
        a.check(5)
    assert e.value.headers["Retry-After"] == "3"  # 1 / 0.4 per second


def test_the_pace_needs_both_tokens_and_steps():
    a = Admission(slots=2, max_queue_len=100, max_queue_wait=100)
    for _ in range(64):
        a.observe_step(0.1)
    assert a.holding_seconds() is None and a.rate() is None  # no request has left yet
    a.observe_service(2.0, tokens=None)
    assert a.holding_seconds() == 2.0 and a.expected_wait(2) == 2.0  # the service time
    b = Admission(slots=2, max_queue_len=100, max_queue_wait=100)
    b.observe_service(2.0, tokens=10)
    for _ in range(MIN_PACE_GAPS - 1):
        b.observe_step(0.1)
    assert b.holding_seconds() == 2.0
    b.observe_step(0.1)
    assert b.holding_seconds() == pytest.approx(1.0)  # 10 tokens x 0.1 s
    assert b.rate() == pytest.approx(2.0)


def test_served_counts_steps_and_departures_finished_or_cut_off():
    """Per stream: the engine's time between two outputs is a step; a stream leaves its slot
    when it finishes, or when the HTTP request ends before it did (a disconnect); a stream
    that never produced an output never held a slot."""
    a = Admission(slots=4, max_queue_len=100, max_queue_wait=100)
    served = Served(a)
    served.output(0, produced_at=10.0, tokens=1, finished=False, now=20.0)
    served.output(1, produced_at=10.0, tokens=1, finished=False, now=20.0)
    served.output(0, produced_at=10.2, tokens=2, finished=False, now=21.0)  # read late
    served.output(1, produced_at=10.2, tokens=2, finished=False, now=21.0)
    served.output(0, produced_at=10.4, tokens=3, finished=True, now=21.5)
    assert list(a._gaps) == pytest.approx([0.2, 0.2, 0.2])
    assert list(a._tokens) == [3] and list(a._service) == [1.5]
    served.close(now=22.0)  # stream 1 was cut off after 2 tokens; stream 2 never started
    assert list(a._tokens) == [3, 2] and list(a._service) == [1.5, 2.0]
    assert list(a._departures) == [21.5, 22.0]
    served.close(now=23.0)  # once
    assert len(a._departures) == 2


def test_waits_longer_than_expected_make_admission_stricter_until_they_are_not():
    """Self-correcting: the admitted requests that queued waited 3x what was expected (the
    engine slowed after their admission): the next expected waits are 3x longer, fewer are
    admitted, and Retry-After is 3x later. Once waits come in as expected (or the window
    passes), the correction is gone."""
    a = Admission(slots=2, max_queue_len=100, max_queue_wait=30)  # 15 s for admission
    a.observe_service(4.0)
    engine_waiting = lambda n: n  # noqa: E731 - a busy engine: every new request waits
    t0 = time.monotonic()
    tokens = [a.admit(engine_waiting, 1) for _ in range(3)]  # expected 4, 4 and 8 s
    for token in tokens:
        a.release(token)
    assert a.correction() == 1.0
    a.started(tokens[0], now=t0 + 12.0)  # 3x
    a.ended(tokens[2], now=t0 + 24.0)  # gave up (or timed out) after 3x, without a start
    assert a.correction(now=t0 + 24.0) == pytest.approx(3.0, rel=1e-3)
    a.check(2, now=t0 + 24.0)  # 4 s x 3 <= 15 s
    with pytest.raises(APIError) as e:
        a.check(3, now=t0 + 24.0)  # 8 s x 3 > 15 s
    assert "expected wait 24 s" in e.value.message and "3.0x" in e.value.message
    assert e.value.headers["Retry-After"] == "6"  # one must leave: 2 s at the rate, x 3
    a.started(tokens[1], now=t0 + 12.4)  # 3.1x
    assert a.correction(now=t0 + 25.0) == pytest.approx(3.0, rel=1e-3)  # the median
    for _ in range(4):  # then waits shorter than expected
        token = a.admit(engine_waiting, 1)
        a.release(token)
        a.started(token, now=time.monotonic() + 1.0)
    assert a.correction() == 1.0
    assert a.correction(now=t0 + 1000.0) == 1.0  # and old errors expire anyway


def test_what_is_expected_of_requests_that_queue_is_checked_once_and_forgotten():
    """Only requests expected to wait at least MIN_CHECKED_WAIT are checked; a request whose
    end comes before what was expected says nothing; nothing is kept once they end."""
    a = Admission(slots=2, max_queue_len=100, max_queue_wait=30)
    a.observe_service(4.0)
    t0 = time.monotonic()
    free = a.admit(lambda n: 0, 1)  # a free slot: nothing to check
    queued = a.admit(lambda n: n, 1)
    assert list(a._expected) == [queued]
    a.started(free, now=t0 + 100.0)
    a.ended(queued, now=t0 + 1.0)  # its client left before the 4 s were up
    assert a._expected == {} and len(a._errors) == 0 and a.correction() == 1.0
    a.started(queued, now=t0 + 100.0)  # once
    assert len(a._errors) == 0


def test_served_reports_the_start_or_the_end_of_an_admitted_request():
    a = Admission(slots=2, max_queue_len=100, max_queue_wait=30)
    a.observe_service(4.0)
    t0 = time.monotonic()
    started, never = a.admit(lambda n: n, 1), a.admit(lambda n: n, 1)  # 4 s each
    served = Served(a, started)
    served.output(0, produced_at=1.0, tokens=1, finished=False, now=t0 + 8.0)  # 2x
    served.output(0, produced_at=1.1, tokens=2, finished=False, now=t0 + 8.1)
    Served(a, never).close(now=t0 + 8.0)  # its client left after 2x
    assert [r for _, r in a._errors] == pytest.approx([2.0, 2.0], rel=1e-3)


def test_admitted_requests_count_until_their_streams_reach_the_engine():
    """A burst is checked before any of its streams has started (the engine has not seen
    them yet): each admitted request counts until its first output, or for a few seconds."""
    a = Admission(slots=1, max_queue_len=3, max_queue_wait=100)
    engine_waiting = lambda n: max(0, n - 1)  # noqa: E731 - an idle engine with one free slot
    tokens = [a.admit(engine_waiting, 1) for _ in range(4)]  # 1 slot + 3 waiting
    with pytest.raises(APIError) as e:
        a.admit(engine_waiting, 1)
    assert e.value.code == "queue_full"
    a.release(tokens[0])
    a.admit(engine_waiting, 1)


# -- first_within -------------------------------------------------------------------------

async def _source(delay: float, items: list[int], closed: list[bool]):
    try:
        await asyncio.sleep(delay)
        for x in items:
            yield x
    finally:
        closed.append(True)


def test_first_within_sends_keepalives_then_passes_items_on():
    async def run() -> list:
        closed: list[bool] = []
        got = [x async for x in first_within(_source(0.35, [1, 2, 3], closed),
                                             time.monotonic(), 5.0, 0.1)]
        assert closed == [True]
        return got

    got = asyncio.run(run())
    keepalives = [x for x in got if x is KEEPALIVE]
    assert 2 <= len(keepalives) <= 4 and got[len(keepalives):] == [1, 2, 3]


def test_first_within_passes_a_first_item_that_came_while_a_keepalive_was_sent():
    """The first output came within the bound, but the consumer (a slow socket) took the
    keepalive back only after the bound: the output goes on, it is no queue timeout."""
    async def run() -> list:
        closed: list[bool] = []
        got = []
        async for x in first_within(_source(0.2, [1, 2], closed), time.monotonic(), 0.5, 0.1):
            got.append(x)
            if x is KEEPALIVE and len(got) == 1:
                await asyncio.sleep(1.0)  # past the bound, and past the first item
        return got

    got = asyncio.run(run())
    assert got == [KEEPALIVE, 1, 2]


def test_first_within_times_out_and_closes_its_source():
    async def run() -> tuple[list, list[bool], QueueTimeout]:
        closed: list[bool] = []
        got = []
        with pytest.raises(QueueTimeout) as e:
            async for x in first_within(_source(10, [1], closed), time.monotonic() - 0.2,
                                        0.5, None):
                got.append(x)
        return got, closed, e.value

    got, closed, err = asyncio.run(run())
    assert got == [] and closed == [True]
    assert 0.45 <= err.waited < 2 and "--max-queue-wait 0.5 s" in str(err)


@pytest.mark.parametrize("starved, first_at, expect", [
    (False, 0.9, [1]),  # no request waits for a slot: it is served, only slowly
    (True, 0.9, QueueTimeout),  # it waits for a slot: the bound holds
    (False, 10, QueueTimeout),  # served, but past COMPUTE_WAIT_FACTOR times the bound
])
def test_first_within_bounds_the_wait_for_a_slot_not_for_the_prefills_ahead(
        starved: bool, first_at: float, expect: object, monkeypatch: pytest.MonkeyPatch):
    import server.admission as admission

    monkeypatch.setattr(admission, "COMPUTE_RECHECK_SECONDS", 0.05)
    checks: list[float] = []

    def is_starved() -> bool:
        checks.append(time.monotonic())
        return starved

    async def run() -> tuple[list, list[bool]]:
        closed: list[bool] = []
        got: list = []
        async for x in first_within(_source(first_at, [1], closed), time.monotonic(), 0.3,
                                    0.1, starved=is_starved):
            got.append(x)
        return [x for x in got if x is not KEEPALIVE], closed

    if expect is QueueTimeout:
        with pytest.raises(QueueTimeout) as e:
            asyncio.run(run())
        assert e.value.waited < 0.4 if starved else 1.2 <= e.value.waited < 1.6
    else:
        got, closed = asyncio.run(run())
        assert got == expect and closed == [True] and len(checks) >= 2


def test_first_within_sends_keepalives_only_while_requests_wait_for_a_slot():
    async def run(starved: bool) -> int:
        got = [x async for x in first_within(_source(0.35, [1], []), time.monotonic(), 5.0,
                                             0.1, starved=lambda: starved)]
        return len([x for x in got if x is KEEPALIVE])

    assert asyncio.run(run(False)) == 0
    assert 2 <= asyncio.run(run(True)) <= 4


# -- through the server -------------------------------------------------------------------

class SlowBackend(StubBackend):
    """Every step takes STEP seconds and picks TOKEN (then the engine's stop rules apply)."""

    def forward(self, input_ids, cache_ids, start_ids, last_token_id) -> torch.Tensor:
        time.sleep(STEP)
        logits = torch.full((input_ids.shape[0], self.vocab_size), -1e4)
        logits[:, TOKEN] = 0.0
        return logits


@pytest.fixture(scope="module")
def slow_server(llama3_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))
    buckets = BucketConfig.default(256, 1, context_encoding_buckets=(64,),
                                   token_generation_buckets=(256,))

    def factory() -> Engine:
        return Engine(Scheduler(buckets, [EOT]), ModelRunner(SlowBackend(buckets,
                                                                         len(tokenizer))),
                      tokenizer, "slow")

    config = ServerConfig(max_num_seqs=1, max_queue_wait=BOUND, max_queue_len=8)
    with ThreadServer(build_app(config, factory=factory)) as srv:
        wait_ready(srv.url, {})
        yield srv.url


def body(max_tokens: int, stream: bool) -> dict:
    return {"prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}


async def _read_stream(c: httpx.AsyncClient, url: str, max_tokens: int) -> list[str]:
    async with c.stream("POST", f"{url}/v1/completions", json=body(max_tokens, True)) as r:
        assert r.status_code == 200
        return [line async for line in r.aiter_lines() if line]


def test_an_admitted_request_that_outwaits_the_bound_ends_with_an_error(slow_server: str):
    """Before any request has finished there is no service time: the second and third
    requests are admitted behind a long one, and end at the bound instead of waiting for it
    (ordering, not a wall-clock ceiling: a loaded machine stretches every step)."""
    async def run() -> tuple[list[str], list[str], httpx.Response, float, float, float]:
        async with httpx.AsyncClient(timeout=60) as c:
            t0 = time.monotonic()
            long = asyncio.ensure_future(_read_stream(c, slow_server, LONG))
            long.add_done_callback(lambda _: ends.setdefault("long", time.monotonic() - t0))
            await asyncio.sleep(0.2)  # the long one holds the only slot
            t1 = time.monotonic()
            waiting = asyncio.ensure_future(_read_stream(c, slow_server, 4))
            plain = await c.post(f"{slow_server}/v1/completions", json=body(4, False))
            t_plain = time.monotonic() - t1
            lines = await waiting
            t_stream = time.monotonic() - t1
            return await long, lines, plain, t_plain, t_stream, ends["long"] - (t1 - t0)

    ends: dict[str, float] = {}
    long, lines, plain, t_plain, t_stream, t_long = asyncio.run(run())
    assert long[-1] == "data: [DONE]" and len(long) > LONG  # the running one is untouched
    assert BOUND - 0.1 < t_plain < t_long and BOUND - 0.1 < t_stream < t_long
    assert plain.status_code == 503
    err = plain.json()["error"]
    assert err["code"] == "queue_timeout" and "--max-queue-wait 1 s" in err["message"]
    assert int(plain.headers["retry-after"]) >= 1
    comments = [x for x in lines if x.startswith(":")]
    assert comments and all(x == ": waiting for a sequence slot" for x in comments)
    events = [x for x in lines if not x.startswith(":")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "queue_timeout"


def test_refused_at_once_when_the_expected_wait_exceeds_the_bound(slow_server: str):
    """Once a long request has finished, the service time is known (~1.5 s on one slot): a
    request that would wait behind a running one is refused within a second of arriving."""
    async def run() -> tuple[list[str], httpx.Response, float]:
        async with httpx.AsyncClient(timeout=30) as c:
            await _read_stream(c, slow_server, LONG)  # measured: a LONG-token service time
            long = asyncio.ensure_future(_read_stream(c, slow_server, LONG))
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            refused = await c.post(f"{slow_server}/v1/completions", json=body(4, False))
            elapsed = time.monotonic() - t0
            return await long, refused, elapsed

    long, refused, elapsed = asyncio.run(run())
    assert long[-1] == "data: [DONE]"
    assert refused.status_code == 429 and elapsed < 1.0
    err = refused.json()["error"]
    assert err["code"] == "queue_wait_exceeded" and "--max-queue-wait 1 s" in err["message"]
    # about the running request's remaining service time (LONG steps), never absurd
    assert 1 <= int(refused.headers["retry-after"]) <= 3 * LONG * STEP
    text = httpx.get(f"{slow_server}/metrics").text  # nothing left behind
    assert metric(text, "vllm:num_requests_running") == 0
    assert metric(text, "vllm:num_requests_waiting") == 0


def test_a_reservation_ends_once_the_engine_counts_the_streams():
    """The reservation ends in the same event-loop step as the engine streams' first steps
    (where an engine's generate counts its request), one stream or several: no other task
    ever sees the requests counted by neither (a burst admitted past the bound) or by both
    (refused at the queue's edge)."""
    from server.serving import merged

    async def run(n: int) -> tuple[list, list]:
        started: list[int] = []
        released: list[bool] = []
        views: list[tuple[bool, int]] = []

        async def engine_stream(i: int):
            started.append(i)  # what an engine's generate does before its first await
            await asyncio.sleep(0.05)
            yield i

        async def other_requests() -> None:  # what another handler's admission check sees
            while len(views) < 200:
                views.append((bool(released), len(started)))
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(other_requests())
        await asyncio.sleep(0)
        source = merged([engine_stream(i) for i in range(n)], lambda: released.append(True))
        got = [x async for x in first_within(source, time.monotonic(), 5.0, None)]
        watcher.cancel()
        return got, views

    for n in (1, 3):
        got, views = asyncio.run(run(n))
        assert sorted(i for i, _ in got) == list(range(n))
        assert (False, 0) in views and (True, n) in views
        assert all(v in ((False, 0), (True, n)) for v in views), views


def test_first_within_settles_a_source_that_never_started():
    """A request that ends before its source took a step (here: past the bound already) does
    not keep its reservation until it expires."""
    released: list[bool] = []

    async def run() -> None:
        with pytest.raises(QueueTimeout):
            async for _ in first_within(_source(0.0, [1], []), time.monotonic() - 10, 0.5,
                                        None, lambda: released.append(True)):
                pass

    asyncio.run(run())
    assert released == [True]
