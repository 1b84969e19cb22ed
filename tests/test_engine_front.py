"""The engine fronts and loop: what the thread and process fronts keep and pass on, and the
typed messages between them."""

import asyncio
import pickle

from engine.client import EngineDead
from engine.core import EngineConfig
from engine.front import Stream
from engine.messages import (
    AddRequest,
    EngineStatus,
    Kind,
    OutputDelta,
    RequestFailed,
    StatusReport,
    Stop,
)
from engine.process import ProcessEngine
from engine.stats import StepStats
from engine.thread import ThreadEngine
from scheduler import SamplingParams

STEP = dict(phase="prefill", bucket="64", batch_size=1, seconds=0.5, num_prompt_tokens=40,
            num_generation_tokens=1, num_padding_tokens=24, inter_token_latencies=())


def test_only_one_prompt_prefill_steps_are_timed():
    """The engine front keeps the time of a prefill of one prompt alone: not decode or mixed
    steps, not batched prefills, not a failed step (which generates nothing)."""
    front = ThreadEngine(lambda progress: None)  # never started: only its bookkeeping runs
    for change in ({}, {"phase": "decode"}, {"phase": "mixed", "num_generation_tokens": 3},
                   {"batch_size": 2, "num_generation_tokens": 2},
                   {"num_generation_tokens": 0}, {"bucket": "128", "seconds": 1.5}):
        front._time_prefill(StepStats(**{**STEP, **change}))
    assert front.prefill_times.to_json() == {
        "64": {"count": 1, "mean_tokens": 64.0, "mean_s": 0.5},
        "128": {"count": 1, "mean_tokens": 64.0, "mean_s": 1.5}}


class Pipe:
    def __init__(self, *sent: list) -> None:
        self.sent = list(sent)

    def recv(self) -> list:
        if not self.sent:
            raise EOFError
        return pickle.loads(self.sent.pop(0))  # as the pipe would: pickled across


class Observer:
    def __init__(self) -> None:
        self.steps: list = []

    def on_step(self, stats: StepStats) -> None:
        self.steps.append(stats)


def test_the_process_front_reads_typed_messages():
    """The child's messages, pickled as the pipe sends them: step stats reach the observer and
    the prefill times, the status reaches the front's fields (the adds the loop has applied
    included), a refused add reaches its request only."""
    from engine.client import EngineState
    from engine.messages import StepReport

    stats = StepStats(**{**STEP, "bucket": "32", "seconds": 0.25, "num_prompt_tokens": 20,
                         "num_padding_tokens": 0})
    status = EngineStatus(state=EngineState.READY, load_seconds=1.5, num_waiting=2,
                          num_free_slots=3, num_applied=4)
    error = ValueError("prompt too long")
    pipe = Pipe(pickle.dumps([StepReport(stats), StatusReport(status),
                              RequestFailed("r1", error)]))
    front = ProcessEngine(EngineConfig(), observer=(observer := Observer()))
    loop = asyncio.new_event_loop()
    sinks = {rid: asyncio.Queue() for rid in ("r1", "r2")}
    front._streams = {rid: Stream(loop, sink, rid, (1,)) for rid, sink in sinks.items()}
    front._stopping = True  # the pipe's end reads as a shutdown
    front._read(pipe)
    loop.run_until_complete(asyncio.sleep(0))  # run the deliveries
    loop.close()
    refused = sinks["r1"].get_nowait()
    assert isinstance(refused, ValueError) and str(refused) == "prompt too long"
    assert [type(sinks[r].get_nowait()) for r in ("r2",)] == [EngineDead]  # the shutdown
    assert sinks["r1"].empty() and sinks["r2"].empty()
    assert observer.steps == [stats]
    assert front.prefill_times.to_json() == {"32": {"count": 1, "mean_tokens": 20.0,
                                                    "mean_s": 0.25}}
    assert (front.state, front.load_seconds, front.num_waiting, front.num_free_slots) == (
        EngineState.READY, 1.5, 2, 3)
    front._submitted = 6
    assert front.projected_waiting(1) == 2 + (6 - 4) + 1 - 3


def test_messages_name_their_kind_and_pickle():
    params = SamplingParams(max_tokens=3)
    for msg, kind in [(AddRequest("r", [1, 2], params, 0.5), Kind.ADD), (Stop(), Kind.STOP),
                      (OutputDelta("r", "hi", (5,), (), None, None, 1.0), Kind.OUTPUT)]:
        assert msg.kind is kind
        assert pickle.loads(pickle.dumps(msg)) == msg
