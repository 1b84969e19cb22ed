"""Start servers one after another, measure each the same way, print ragserve/other ratios.

For each server command: cold start to ready (process start until its readiness URL answers
200), peak resident memory of the whole process tree (sampled every 0.2 s from /proc, start to
stop), and the same :mod:`benchmarks.serve_load` run. Used by ``benchmarks/compare_vllm.sh``.

    python -m benchmarks.compare_servers --ragserve "CMD" --ragserve-ready URL \\
        --other "CMD" --other-ready URL --url-ragserve URL --url-other URL [serve_load flags]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx

from benchmarks import serve_load
from benchmarks.common import emit, round_floats


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo += [int(c) for c in children]
        except (OSError, ValueError):
            continue
    return total


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            time.sleep(0.2)


def stop(proc: subprocess.Popen, sampler: RssSampler, timeout: float = 60) -> None:
    """SIGTERM the server's process group (SIGKILL after ``timeout``), then the RSS sampler."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    sampler.stop.set()
    sampler.join()


def measure(name: str, cmd: str, ready_url: str, load_args: argparse.Namespace,
            timeout: float, log_dir: Path) -> dict:
    log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed below
    t0 = time.perf_counter()
    proc = subprocess.Popen(shlex.split(cmd), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ))
    sampler = RssSampler(proc.pid)
    sampler.start()
    try:
        ready_s = None
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: see {log.name}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    ready_s = time.perf_counter() - t0
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        if ready_s is None:
            raise TimeoutError(f"{name} not ready after {timeout:.0f}s")
        print(f"{name}: ready in {ready_s:.1f}s", flush=True)
        load = asyncio.run(serve_load.run(load_args))
        print(f"{name}: {load['output_tok_s']:.1f} tok/s, TTFT p50 "
              f"{load['ttft_p50_s'] * 1e3:.0f} ms, {load['errors']} errors", flush=True)
    finally:
        stop(proc, sampler)
        log.close()
    return {"ready_s": ready_s, "peak_rss_gib": sampler.peak / 2**30, **load}


def main() -> None:
    p = serve_load.build_parser()
    p.description = __doc__
    p.add_argument("--ragserve", required=True, help="the command that starts ragserve")
    p.add_argument("--ragserve-ready", required=True, help="URL that answers 200 when ready")
    p.add_argument("--url-ragserve", required=True)
    p.add_argument("--other", required=True, help="the command that starts the other server")
    p.add_argument("--other-name", default="vllm")
    p.add_argument("--other-ready", required=True)
    p.add_argument("--url-other", required=True)
    p.add_argument("--start-timeout", type=float, default=1200.0)
    p.add_argument("--log-dir", type=Path, default=Path(".cache/compare"))
    args = p.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, cmd, ready, url in (
        ("ragserve", args.ragserve, args.ragserve_ready, args.url_ragserve),
        (args.other_name, args.other, args.other_ready, args.url_other),
    ):
        load_args = argparse.Namespace(**vars(args))
        load_args.url = url
        results[name] = measure(name, cmd, ready, load_args, args.start_timeout, args.log_dir)
    r, o = results["ragserve"], results[args.other_name]
    ratios = {
        "throughput_ratio": r["output_tok_s"] / o["output_tok_s"],
        "ttft_p50_ratio": r["ttft_p50_s"] / o["ttft_p50_s"],
        "tpot_p50_ratio": r["tpot_p50_s"] / o["tpot_p50_s"],
        "ready_time_ratio": r["ready_s"] / o["ready_s"],
        "peak_rss_ratio": r["peak_rss_gib"] / o["peak_rss_gib"],
    }
    print("ragserve / " + args.other_name + ": " +
          ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    keep = ("ready_s", "peak_rss_gib", "output_tok_s", "rps", "ttft_p50_s", "ttft_p95_s",
            "tpot_p50_s", "tpot_p95_s", "errors", "completed", "usd_per_1m_output_tokens")
    emit("compare_" + args.other_name, args, {
        **round_floats(ratios),
        "concurrency": args.concurrency, "requests": args.requests,
        "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
        **{name: round_floats({k: v[k] for k in keep}, 5) for name, v in results.items()},
    })


if __name__ == "__main__":
    main()
