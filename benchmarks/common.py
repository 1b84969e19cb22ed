"""Shared benchmark helpers: machine description, statistics, the final JSON line."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from typing import Any


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU model, cores, memory, torch, date, commit."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = None
    with contextlib.suppress(ValueError, OSError):
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": mem_gib,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": dt.date.today().isoformat(),
        "commit": commit,
    }


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a smaller run (about a minute)")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def percentile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def emit(name: str, args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Print the human summary, then the one JSON object as the very last line."""
    info = machine()
    print(f"# {name} on {info['cpu']} ({info['cores']} cores), torch {info['torch']}, "
          f"{info['date']}", flush=True)
    out = {"benchmark": name, "quick": bool(args.quick), **result, "machine": info}
    print(json.dumps(out, sort_keys=False, default=float), flush=True)


def wait_server_ready(proc: subprocess.Popen, url: str, log_name: str, timeout: float) -> None:
    """Until ``url``'s /ready answers 200; raises if ``proc`` exits or ``timeout`` passes."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not become ready (see {log_name})")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)


def round_floats(d: dict[str, Any], ndigits: int = 4) -> dict[str, Any]:
    return {k: round(v, ndigits) if isinstance(v, float) else v for k, v in d.items()}
