"""Starting real servers for tests: a ``python -m server`` subprocess, or uvicorn in a thread."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

#: The engines the server tests run against: ``make test`` runs ragserve's, ``make test-vllm``
#: sets RAGSERVE_TEST_ENGINES=vllm in the venv that has vLLM.
ENGINES = tuple(e for e in os.environ.get("RAGSERVE_TEST_ENGINES", "ragserve").split(",") if e)

#: RAGSERVE_TEST_DTYPE=bfloat16 (or float32) runs the test engines that assert no model's words
#: in that dtype: the servers given :func:`engine_flags` and the engines built with
#: :func:`engine_dtype`. Unset, each keeps its own pin. Tests that assert words pin float32
#: without these (bf16 words differ per CPU: helpers.BF16_TIE).
TEST_DTYPES = ("float32", "bfloat16")
TEST_DTYPE = os.environ.get("RAGSERVE_TEST_DTYPE", "")


def engine_dtype(pinned: str = "float32") -> str:
    """The dtype of an in-process test engine: RAGSERVE_TEST_DTYPE when set, else ``pinned``."""
    return TEST_DTYPE or pinned


def engine_flags(engine: str) -> list[str]:
    """``ragserve serve`` flags that select ``engine`` for a test server, last on its command
    line (they override its own ``--dtype`` under RAGSERVE_TEST_DTYPE). Both run eager (no
    torch.compile: they start in seconds on a small CPU)."""
    dtype = ["--dtype", TEST_DTYPE] if TEST_DTYPE else []
    if engine == "vllm":
        return ["--engine", "vllm", "--vllm-arg", "enforce_eager=true", *dtype]
    return ["--kernels", "step=eager", *dtype]  # no background compile in a short-lived server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, headers: dict | None = None, timeout: float = 300.0,
               proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/ready", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def start_subprocess(args: list[str], log_path: Path, env: dict[str, str] | None = None
                     ) -> tuple[subprocess.Popen, str]:
    """``python -m server`` on a free port of 127.0.0.1. vLLM (when ``args`` select it) gets a
    1 GiB CPU KV cache, loopback for its engine-core sockets, and ``tests/`` on its path (the
    scripted logits processor lives there)."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_HOST_IP="127.0.0.1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS),
                                                        os.environ.get("PYTHONPATH")])),
               **(env or {}))
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port), *args],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


class ThreadServer:
    """A real uvicorn server on 127.0.0.1, in a thread of the test process."""

    def __init__(self, app: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def metric(text: str, name: str, **labels: str) -> float:
    """A sample's value from Prometheus text (labels must all match); 0 if absent."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
