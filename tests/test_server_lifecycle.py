"""Server life cycle: 503 while loading, a failing step fails only its requests, SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import POISON, PoisonRunner
from serverutil import ThreadServer, engine_flags, start_subprocess, wait_ready

from engine.core import Engine, EngineConfig
from server.app import build_app, malloc_trim, trim_memory
from server.config import ServerConfig


def tiny_engine_config(model: Path) -> EngineConfig:
    return EngineConfig(model=str(model), dtype="float32", max_model_len=256, max_num_seqs=4,
                        context_encoding_buckets=(16, 32, 64, 128),
                        token_generation_buckets=(32, 64, 128, 256), warmup=False,
                        kernels="step=eager")


def test_the_api_process_trims_its_heap_until_it_stops():
    """malloc_trim (glibc: the Linux images) runs every TRIM_SECONDS until cancelled."""
    calls: list[int] = []

    async def run() -> None:
        task = asyncio.ensure_future(trim_memory(calls.append, seconds=0.0))
        while len(calls) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert calls[:3] == [0, 0, 0]
    trim = malloc_trim()
    assert trim is None or trim(0) in (0, 1)  # 1: memory was given back


def test_503_with_retry_after_until_loaded(tiny_llama_dir: Path):
    release = threading.Event()

    def slow_factory() -> Engine:
        release.wait(60)
        return Engine.from_config(tiny_engine_config(tiny_llama_dir))

    app = build_app(ServerConfig(served_model_name="tiny"), factory=slow_factory)
    with ThreadServer(app) as srv:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        r = httpx.get(f"{srv.url}/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert r.headers["retry-after"] == "5"
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny", "prompt": "hi"})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "model_loading"
        release.set()
        wait_ready(srv.url, timeout=60)
        r = httpx.post(f"{srv.url}/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200


def test_a_failing_step_answers_500_for_its_requests_and_the_server_keeps_serving(
        tiny_llama_dir: Path):
    def factory() -> Engine:
        engine = Engine.from_config(tiny_engine_config(tiny_llama_dir))
        engine.runner = PoisonRunner(engine.runner)
        return engine

    app = build_app(ServerConfig(served_model_name="tiny"), factory=factory)
    with ThreadServer(app) as srv:
        wait_ready(srv.url, timeout=60)

        async def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as c:
                url = f"{srv.url}/v1/completions"
                long = c.post(url, json={"model": "tiny", "prompt": [1, 2, 3],
                                         "max_tokens": 100, "ignore_eos": True})
                long_task = asyncio.ensure_future(long)
                await asyncio.sleep(0.2)  # let it start decoding
                bad = await c.post(url, json={"model": "tiny", "prompt": [5, POISON, 6],
                                              "max_tokens": 5})
                return bad, await long_task, await c.post(
                    url, json={"model": "tiny", "prompt": "after", "max_tokens": 4})

        bad, long, after = asyncio.run(run())
        assert bad.status_code == 500
        assert bad.json()["error"]["code"] == "engine_step_failed"
        assert long.status_code == 200
        assert long.json()["usage"]["completion_tokens"] == 100
        assert after.status_code == 200


@pytest.mark.parametrize("process", ["false", "true"])
def test_sigterm_drains_in_flight_requests_then_exits_0(engine_name: str, tiny_llama_dir: Path,
                                                       tmp_path: Path, process: str):
    """With ragserve's engine on a thread and in its own process (vLLM's: once)."""
    if engine_name != "ragserve" and process == "true":
        pytest.skip("--engine-process is ragserve's engine's")
    buckets = ["--context-encoding-buckets", "16,32,64,128", "--token-generation-buckets",
               "32,64,128,256", "--engine-process", process] if engine_name == "ragserve" else []
    proc, url = start_subprocess([
        "--model", str(tiny_llama_dir), "--dtype", "float32", "--max-model-len", "256",
        "--max-num-seqs", "2", *buckets, "--shutdown-grace-seconds", "60",
        "--served-model-name", "tiny", *engine_flags(engine_name)], tmp_path / "server.log")
    try:
        wait_ready(url, proc=proc)
        chunks: list[dict] = []
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": "drain", "max_tokens": 240, "ignore_eos": True,
                "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            chunks.append(json.loads(first[6:]))
            proc.send_signal(signal.SIGTERM)
            refused = False
            deadline = time.monotonic() + 10
            while not refused and time.monotonic() < deadline:
                try:
                    httpx.get(f"{url}/health", timeout=1)
                    time.sleep(0.05)
                except httpx.TransportError:
                    refused = True
            for line in lines:
                if line and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        assert refused, "the server kept accepting connections after SIGTERM"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        print((tmp_path / "server.log").read_text()[-3000:])


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines()
                          if ":" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            out.append(int(status.parent.name))
    return out


def test_the_engine_runs_in_its_own_process_and_its_death_fails_the_server(
        tiny_llama_dir: Path, tmp_path: Path):
    """ragserve's engine loop in a child process (--engine-process true). If it dies,
    a stream in flight ends with an engine_unavailable error event and the server exits
    non-zero, so that the orchestrator restarts it."""
    proc, url = start_subprocess([
        "--model", str(tiny_llama_dir), "--dtype", "float32", "--max-model-len", "256",
        "--max-num-seqs", "2", "--context-encoding-buckets", "16,32,64,128",
        "--token-generation-buckets", "32,64,128,256", "--served-model-name", "tiny",
        "--kernels", "step=eager", "--engine-process", "true"], tmp_path / "server.log")
    try:
        wait_ready(url, proc=proc)
        # multiprocessing's spawned child (its resource tracker is another child)
        engine = [pid for pid in children(proc.pid)
                  if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(engine) == 1, children(proc.pid)
        events: list[str] = []
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": "die", "max_tokens": 240, "ignore_eos": True,
                "stream": True}) as r:
            lines = (line for line in r.iter_lines() if line)
            events.append(next(lines))
            os.kill(engine[0], signal.SIGKILL)
            events.extend(lines)
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][6:])["error"]
        assert error["code"] == "engine_unavailable" and "engine process exited" in \
            error["message"]
        assert proc.wait(60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_engine_process_gives_the_thread_engines_tokens_and_metrics(tiny_llama_dir: Path):
    """The same loop on a thread and in a child process: the same greedy tokens, text and
    logprobs for requests that share batches (the child sends only what is new; the front
    rebuilds the snapshots), the same request and token counts in the metrics."""
    from engine.process import ProcessEngine
    from engine.thread import ThreadEngine
    from scheduler import SamplingParams
    from server.metrics import EngineMetrics

    cfg = tiny_engine_config(tiny_llama_dir)
    prompts = [[1, 2, 3], [40, 41, 42, 43, 44], [7] * 20]

    async def run(engine) -> list[tuple]:
        engine.start()
        deadline = time.monotonic() + 120
        while not engine.ready:
            assert time.monotonic() < deadline and engine.error is None, engine.error
            await asyncio.sleep(0.05)

        async def one(i: int, ids: list[int]) -> tuple:
            outputs = [o async for o in engine.generate(f"r{i}", ids, SamplingParams(
                max_tokens=12, temperature=0, ignore_eos=True, logprobs=2))]
            last = outputs[-1]
            assert "".join(o.delta for o in outputs) == last.text
            assert sum((o.new_token_ids for o in outputs), ()) == last.token_ids
            return last.token_ids, last.text, last.logprobs, last.prompt_token_ids

        try:
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
        finally:
            engine.stop()

    thread = ThreadEngine(lambda progress: Engine.from_config(cfg), observer=EngineMetrics("t"))
    child = ProcessEngine(cfg, observer=EngineMetrics("t"))
    got, want = asyncio.run(run(child)), asyncio.run(run(thread))
    for (ids, text, logprobs, prompt), (ids2, text2, logprobs2, prompt2) in zip(got, want):
        assert (ids, text, prompt) == (ids2, text2, prompt2)
        # the requests may share batches differently (arrival timing), which moves float32
        # logits in their last bits
        assert [(lp.token_id, lp.rank, [t for t, _ in lp.top]) for lp in logprobs] == \
            [(lp.token_id, lp.rank, [t for t, _ in lp.top]) for lp in logprobs2]
        assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(logprobs, logprobs2))
    for engine in (thread, child):
        text = engine.metrics_text().decode()
        assert 'vllm:request_success_total{finished_reason="length",model_name="t"} 3.0' in text
        assert 'vllm:generation_tokens_total{model_name="t"} 36.0' in text


def test_a_model_that_fails_to_load_in_the_engine_process_exits_the_server(tmp_path: Path):
    """The engine process reports its load failure to the server, which exits non-zero with
    the reason, as it does with the engine on a thread."""
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    proc, _ = start_subprocess(["--model", str(bad), "--engine-process", "true"],
                               tmp_path / "server.log")
    try:
        assert proc.wait(120) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "server.log").read_text()
    assert "exiting: the engine or the index failed" in log and "tokenizer" in log
