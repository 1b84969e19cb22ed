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
from server.admission import KEEPALIVE, Admission, QueueTimeout, first_within
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
    a = Admission(slots=2, max_queue_len=100, max_queue_wait=5)
    for s in (4.0, 4.0, 100.0):  # the median, not the mean: one outlier does not decide
        a.observe_service(s)
    assert a.service_seconds == 4.0
    a.check(2)  # 2 ahead / 2 slots x 4 s = 4 s: admitted
    with pytest.raises(APIError) as e:
        a.check(3)  # 6 s > 5 s
    err = e.value
    assert err.status == 429 and err.code == "queue_wait_exceeded"
    assert "expected wait 6 s" in err.message and "--max-queue-wait 5 s" in err.message
    # two may wait (5 s x 2 slots / 4 s); the third in line can come back once one has left
    assert err.headers["Retry-After"] == "2"
    with pytest.raises(APIError) as e:
        a.check(12)
    assert e.value.headers["Retry-After"] == "20"  # 10 requests must leave: 10 x 4 s / 2
    b = Admission(slots=2, max_queue_len=4, max_queue_wait=1e9)
    b.observe_service(3.0)
    with pytest.raises(APIError) as e:
        b.check(9)
    assert e.value.code == "queue_full" and e.value.headers["Retry-After"] == "8"  # 5 x 3 / 2


def test_the_measured_departure_rate_replaces_the_model_once_there_are_enough_departures():
    """Under overload the slots turn over slower than slots / service time says (the prefills
    of the requests that take the freed slots, time between steps): the measured rate rules."""
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


def test_first_within_settles_as_its_source_starts():
    """The reservation ends as the engine streams start: never after the engine has counted
    the request too (both counts would refuse requests that fit)."""
    from server.serving import merged

    started: list[int] = []

    async def engine_stream(i: int):
        started.append(i)  # what an engine's generate does before its first await
        await asyncio.sleep(0.05)
        yield i

    async def run() -> tuple[list, list]:
        seen_at_settle: list = []
        source = merged([engine_stream(0), engine_stream(1)])
        got = [x async for x in first_within(source, time.monotonic(), 5.0, None,
                                             lambda: seen_at_settle.append(list(started)))]
        return got, seen_at_settle

    got, seen = asyncio.run(run())
    assert seen == [[]] and sorted(i for i, _ in got) == [0, 1]
