"""Soak under overload: N streaming chat clients for T seconds against one server, first at the
server's capacity (``--base-clients``, default 16 = ``--max-num-seqs``), then at 30x
(``--clients``, default 500), with clients that disconnect and clients that send hostile bodies.

Each client loops until the phase ends: 8% of its requests are hostile bodies (truncated JSON,
invalid UTF-8, NaN, deep nesting, a wrong Content-Type, an unknown field), which must get a 4xx;
25% of its streams disconnect after a few events; a 429 or 503 makes it sleep ``Retry-After``
and go on. A stream that receives no byte for ``--client-timeout`` seconds (120) is a client
timeout. The load generator runs at a lower priority than the server (``nice``), so that the
server has the CPU first. So that a late status is not just the starved load generator's, a
probe process at the server's priority sends one short streamed request every 0.5 s and times
its response status (``probe_status_*``).

Reported per phase: completed requests/s and completed output tokens/s (requests that ran to
their end within the phase, as the client saw them), the requests the engine ran to their end
per second of the phase and its tail (the server's count: a load generator short of CPU reads
late), the engine's generated tokens/s (all of them), refusals, client
timeouts, failures (5xx or a broken connection), the time to the response's status (served or
refused) p50/p99, the time to the first byte, the engine's mean decode step time and the share
of the phase it spent in steps, and the queue wait p99 (``vllm:request_queue_time_seconds``);
at the end, the running and waiting requests and KV use after the run (must be 0) and the
server's RSS growth (its engine process included). The last line is the JSON.

RSS growth is counted from the end of a warm-up (``--warmup-seconds`` of ``--base-clients``,
not reported otherwise): the first requests of a fresh server allocate what it keeps (the
allocator's pools, kernels per shape), which is not growth under load. The JSON has the RSS of
the API process and of the engine process at each point (``rss_mib``) and the growth over each
phase and over the run. ``cores_other`` is the CPU that other processes on the machine took
during a phase: a slower engine there is not the server's doing.

    python -m benchmarks.soak [--quick] [--clients 500] [--seconds 90]
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.common import (
    emit,
    median,
    parser,
    percentile,
    round_floats,
    wait_server_ready,
)
from benchmarks.serve_load import prompt_text

HOSTILE: list[tuple[str, bytes, str]] = [
    ("truncated", b'{"model": "m", "messages": [{"role": "user", "content": "hi"',
     "application/json"),
    ("utf8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "application/json"),
    ("nan", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     "application/json"),
    ("deep", b"[" * 5000 + b"]" * 5000, "application/json"),
    ("content-type", b'{"messages": [{"role": "user", "content": "hi"}]}', "text/plain"),
    ("unknown-field", b'{"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}',
     "application/json"),
]


@dataclass
class Phase:
    """What the clients of one phase saw."""

    clients: int
    seconds: float
    wall: float = 0.0  # the phase and its tail (requests in flight at the end)
    completed: int = 0
    completed_tokens: int = 0
    disconnected: int = 0
    refused: int = 0
    queue_timeouts: int = 0
    client_timeouts: int = 0
    failures: int = 0
    hostile: int = 0
    hostile_not_4xx: int = 0
    status_s: list[float] = field(default_factory=list)
    first_byte_s: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)


async def hostile(client: httpx.AsyncClient, url: str, rng: random.Random, ph: Phase) -> None:
    name, body, ctype = rng.choice(HOSTILE)
    ph.hostile += 1
    try:
        r = await client.post(f"{url}/v1/chat/completions", content=body,
                              headers={"content-type": ctype})
    except httpx.TransportError as e:
        ph.failures += 1
        ph.errors[f"hostile {name}: {type(e).__name__}"] += 1
        return
    if not 400 <= r.status_code < 500 or "error" not in r.json():
        ph.hostile_not_4xx += 1
        ph.errors[f"hostile {name}: {r.status_code}"] += 1


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, disconnect_after: int | None,
                     ph: Phase, deadline: float) -> None:
    t0 = time.monotonic()
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            ph.status_s.append(time.monotonic() - t0)
            if r.status_code in (429, 503):
                ph.refused += 1
                await r.aread()
                wait = float(r.headers.get("retry-after", "1"))
                await asyncio.sleep(max(0.0, min(wait, deadline - time.monotonic())))
                return
            if r.status_code != 200:
                ph.failures += r.status_code >= 500
                ph.errors[f"status {r.status_code}"] += 1
                await r.aread()
                return
            events, tokens, first, failed = 0, None, True, False
            async for line in r.aiter_lines():
                if first:
                    ph.first_byte_s.append(time.monotonic() - t0)
                    first = False
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    failed = True
                    code = event["error"].get("code")
                    ph.queue_timeouts += code == "queue_timeout"
                    ph.failures += code != "queue_timeout"
                    ph.errors[f"stream error {code}"] += 1
                    continue
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if event.get("choices"):
                    events += 1
                    if disconnect_after is not None and events >= disconnect_after:
                        ph.disconnected += 1
                        return  # leaving the block closes the connection
            if tokens is not None and not failed and time.monotonic() <= deadline:
                ph.completed += 1
                ph.completed_tokens += tokens
    except httpx.ReadTimeout:
        ph.client_timeouts += 1
    except httpx.TransportError as e:
        ph.failures += 1
        ph.errors[type(e).__name__] += 1


async def client_loop(url: str, model: str, seed: int, ph: Phase, deadline: float,
                      client: httpx.AsyncClient, args) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        if rng.random() < args.hostile_share:
            await hostile(client, url, rng, ph)
            continue
        body = {"model": model, "messages": [{"role": "user", "content": prompt_text(
                    rng, args.prompt_tokens)}],
                "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        disconnect = rng.randint(1, 8) if rng.random() < args.disconnect_share else None
        await stream_one(client, url, body, disconnect, ph, deadline)


def scrape(url: str) -> dict[str, float]:
    """Sums of the series the report needs, from /metrics."""
    out: Counter = Counter()
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("ragserve_engine_step_seconds_sum") and 'phase="decode"' in name:
            out["decode_s"] += float(value)
        elif name.startswith("ragserve_engine_step_seconds_count") and 'phase="decode"' in name:
            out["decode_steps"] += float(value)
        elif name.startswith("ragserve_engine_step_seconds_sum"):
            out["other_step_s"] += float(value)
        elif name.startswith("ragserve_engine_step_seconds_count"):
            out["other_steps"] += float(value)
        elif name.startswith("vllm:generation_tokens_total"):
            out["generated"] += float(value)
        elif name.startswith("vllm:request_success_total") and (
                'finished_reason="length"' in name or 'finished_reason="stop"' in name):
            out["finished"] += float(value)
        elif name.startswith("vllm:request_queue_time_seconds_bucket"):
            le = name.split('le="', 1)[1].split('"', 1)[0]
            out[f"queue_le_{le}"] += float(value)
        elif name.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting",
                              "vllm:kv_cache_usage_perc")):
            out[name.split("{", 1)[0]] += float(value)
    return dict(out)


def queue_p99(before: dict[str, float], after: dict[str, float]) -> float:
    """The upper bound of the histogram bucket that holds the 99th percentile queue wait."""
    les = sorted((float(k[9:]) if k[9:] != "+Inf" else float("inf"), k)
                 for k in after if k.startswith("queue_le_"))
    total = after.get("queue_le_+Inf", 0) - before.get("queue_le_+Inf", 0)
    for le, k in les:
        if total and after[k] - before.get(k, 0) >= 0.99 * total:
            return le
    return float("nan")


def rss_bytes(pid: int) -> dict[str, int]:
    """Resident memory of ``pid`` ("api") and of its children ("engine": the engine process,
    multiprocessing's resource tracker), from /proc."""
    out = {"api": 0, "engine": 0}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        rss = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        if int(status.parent.name) == pid:
            out["api"] += rss
        elif int(fields.get("PPid", "0")) == pid:
            out["engine"] += rss
    return out


def growth_pct(before: dict[str, int], after: dict[str, int]) -> float:
    """RSS growth of the whole server (API and engine processes) in percent."""
    return 100 * (sum(after.values()) - sum(before.values())) / sum(before.values())


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (not idle or waiting), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system, all threads) used so far by the server process ("api":
    HTTP, parsing, SSE), its children ("engine": the engine process), this load generator
    ("load"), and everything else on the machine ("other": the probe, other people's work),
    from /proc: where the 2 cores went in a phase."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"api": 0.0, "engine": 0.0, "load": 0.0}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
        this, ppid = int(stat.parent.name), int(fields[1])
        used = (int(fields[11]) + int(fields[12])) / tick
        if this == pid:
            out["api"] += used
        elif ppid == pid:
            out["engine"] += used
        elif this == os.getpid():
            out["load"] += used
    out["other"] = busy_seconds() - sum(out.values())  # whatever else runs on the machine
    return out


async def run_phase(url: str, model: str, clients: int, seconds: float, args) -> Phase:
    ph = Phase(clients, seconds)
    t0 = time.monotonic()
    deadline = t0 + seconds
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    timeout = httpx.Timeout(args.client_timeout, connect=args.client_timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        tasks = [asyncio.ensure_future(client_loop(url, model, 1000 * args.seed + i, ph,
                                                   deadline, client, args))
                 for i in range(clients)]
        await asyncio.wait(tasks, timeout=seconds + args.client_timeout + 30)
        for t in tasks:  # bounded: whatever is still in flight is cancelled (a disconnect)
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    ph.wall = time.monotonic() - t0
    return ph


def summary(ph: Phase, before: dict[str, float], after: dict[str, float],
            cpu: dict[str, float] | None = None) -> dict:
    cpu = cpu or {}
    decode_steps = after.get("decode_steps", 0) - before.get("decode_steps", 0)
    return round_floats({
        "clients": ph.clients, "seconds": ph.seconds,
        "completed_per_s": ph.completed / ph.seconds,
        "completed_tok_s": ph.completed_tokens / ph.seconds,
        "engine_tok_s": (after.get("generated", 0) - before.get("generated", 0)) / ph.wall,
        "server_completed_per_s": (after.get("finished", 0) - before.get("finished", 0))
        / ph.wall,
        "completed": ph.completed, "disconnected": ph.disconnected, "refused": ph.refused,
        "queue_timeouts": ph.queue_timeouts, "client_timeouts": ph.client_timeouts,
        "failures": ph.failures, "hostile": ph.hostile, "hostile_not_4xx": ph.hostile_not_4xx,
        "status_p50_s": median(ph.status_s), "status_p99_s": percentile(ph.status_s, 99),
        "status_max_s": max(ph.status_s, default=float("nan")),
        "first_byte_p99_s": percentile(ph.first_byte_s, 99),
        "decode_step_ms": 1e3 * (after.get("decode_s", 0) - before.get("decode_s", 0))
        / decode_steps if decode_steps else float("nan"),
        "decode_steps": decode_steps,
        "engine_busy": (after.get("decode_s", 0) + after.get("other_step_s", 0)
                        - before.get("decode_s", 0) - before.get("other_step_s", 0)) / ph.wall,
        "queue_wait_p99_le_s": queue_p99(before, after),
        **{f"cores_{k}": v / ph.wall for k, v in cpu.items()},
        "errors": dict(ph.errors.most_common(8)),
    })


def probe(url: str, out: str, interval: float) -> None:
    """A client at the server's priority, apart from the niced load: every ``interval``
    seconds a streamed request, timed to its response status (then closed), one JSON line per
    request in ``out``: what a client that has CPU sees, served or refused. Runs until killed."""
    body = {"model": "m", "messages": [{"role": "user", "content": "probe"}], "max_tokens": 4,
            "stream": True}
    with open(out, "a") as f, httpx.Client(timeout=120) as client:
        while True:
            t0 = time.time()
            try:
                with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    status = r.status_code
            except httpx.TransportError as e:
                status = type(e).__name__
            f.write(json.dumps({"t": t0, "s": time.time() - t0, "status": status}) + "\n")
            f.flush()
            time.sleep(max(0.0, interval - (time.time() - t0)))


def probe_stats(path: Path, start: float, end: float) -> dict:
    """The probe's requests sent between ``start`` and ``end`` (``time.time()``)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if start <= r["t"] < end]
    times = [r["s"] for r in rows]
    return {"probe_requests": len(rows), "probe_status_p50_s": median(times),
            "probe_status_p99_s": percentile(times, 99),
            "probe_status_max_s": max(times, default=float("nan")),
            "probe_statuses": dict(Counter(str(r["status"]) for r in rows))}


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--probe":  # the probe process (see probe())
        probe(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return
    p = parser(__doc__)
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--base-clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=90.0, help="per phase")
    p.add_argument("--warmup-seconds", type=float, default=30.0,
                   help="of --base-clients before the phases; RSS growth counts from its end")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--hostile-share", type=float, default=0.08)
    p.add_argument("--disconnect-share", type=float, default=0.25)
    p.add_argument("--client-timeout", type=float, default=120.0)
    p.add_argument("--port", type=int, default=8412)
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `ragserve serve` argument (repeatable)")
    args = p.parse_args()
    if args.quick:
        args.seconds = 30.0
        args.warmup_seconds = min(args.warmup_seconds, 15.0)
    cache = Path(os.environ.get("RAGSERVE_CACHE_DIR", ".cache/ragserve"))
    cache.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "server", "--port", str(args.port), "--served-model-name", "m",
           "--max-num-seqs", str(args.max_num_seqs), "--dtype", args.dtype,
           "--log-level", "warning", *(["--model", args.model] if args.model else []),
           *args.server_arg]
    log = open(cache / "soak_server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    prober: subprocess.Popen | None = None
    try:
        wait_server_ready(proc, url, log.name, 900)
        probe_log = cache / "soak_probe.jsonl"
        probe_log.unlink(missing_ok=True)
        prober = subprocess.Popen([sys.executable, "-m", "benchmarks.soak", "--probe", url,
                                   str(probe_log), "0.5"])  # started before the nice below
        os.nice(10)  # the load generator yields the CPU to the server
        rss = {"start": rss_bytes(proc.pid)}
        if args.warmup_seconds > 0:
            asyncio.run(run_phase(url, "m", args.base_clients, args.warmup_seconds, args))
            time.sleep(2)
        rss["warm"] = rss_bytes(proc.pid)
        phases = []
        for name, clients in (("base", args.base_clients), ("overload", args.clients)):
            before = scrape(url)
            cpu0 = cpu_seconds(proc.pid)
            t0 = time.time()
            ph = asyncio.run(run_phase(url, "m", clients, args.seconds, args))
            cpu1 = cpu_seconds(proc.pid)
            after = scrape(url)
            used = {k: cpu1[k] - cpu0[k] for k in cpu0}
            rss_start, rss[name] = rss[list(rss)[-1]], rss_bytes(proc.pid)
            phases.append({**summary(ph, before, after, used),
                           **probe_stats(probe_log, t0, t0 + args.seconds),
                           "rss_growth_pct": growth_pct(rss_start, rss[name])})
            print(f"{clients} clients: {phases[-1]}", flush=True)
            time.sleep(2)
        settle = time.monotonic() + 30
        while True:  # every slot back once the clients are gone
            left = scrape(url)
            busy = (left.get("vllm:num_requests_running", 0) +
                    left.get("vllm:num_requests_waiting", 0) +
                    left.get("vllm:kv_cache_usage_perc", 0))
            if busy == 0 or time.monotonic() > settle:
                break
            time.sleep(0.5)
        rss["end"] = rss_bytes(proc.pid)
    finally:
        if prober is not None:
            prober.kill()
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
        log.close()
    base, over = phases
    result = {
        "base": base, "overload": over,
        "completed_per_s_ratio": over["completed_per_s"] / base["completed_per_s"]
        if base["completed_per_s"] else float("nan"),
        "completed_tok_s_ratio": over["completed_tok_s"] / base["completed_tok_s"]
        if base["completed_tok_s"] else float("nan"),
        "decode_step_ratio": over["decode_step_ms"] / base["decode_step_ms"],
        "engine_tok_s_ratio": over["engine_tok_s"] / base["engine_tok_s"],
        "server_completed_per_s_ratio": over["server_completed_per_s"]
        / base["server_completed_per_s"],
        "after_run": {k: left.get(k, 0) for k in ("vllm:num_requests_running",
                                                  "vllm:num_requests_waiting",
                                                  "vllm:kv_cache_usage_perc")},
        "rss_growth_pct": growth_pct(rss["warm"], rss["end"]),  # after the warm-up
        "rss_growth_from_start_pct": growth_pct(rss["start"], rss["end"]),
        "rss_mib": {point: {k: v / 2**20 for k, v in by.items()} for point, by in rss.items()},
    }
    emit("soak", args, round_floats(result))


if __name__ == "__main__":
    main()
