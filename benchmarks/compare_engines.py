"""Servers one after another, one client: ragserve on its engine, ragserve on vLLM's engine
(``--engine vllm``) and vLLM's own API server (and, with ``--only``, ragserve with prefix reuse
off: ``ragserve-noreuse``), all on the same model, measured with ``vllm bench serve``
(``--ignore-eos``) at each concurrency. The load starts as soon as each server answers a
one-token request, as a load balancer would send it traffic.

``--dataset random`` (the default): random prompts of ``--input-len`` tokens.
``--dataset prefix_repetition``: ``--num-prefixes`` shared prefixes of ``--prefix-len`` tokens,
each prompt one of them plus ``--suffix-len`` tokens of its own (vLLM's dataset), with vLLM's
prefix caching on.

For each server: cold start to ready, peak resident memory of its process tree (every 0.2 s
from /proc, start to stop), and per concurrency the output tok/s and the TTFT and TPOT p50/p99
as ``vllm bench serve`` reports them. The last line is one JSON object with the ratios
ragserve-on-vLLM / vLLM (the cost of our API and RAG layer; goal within 5%), ragserve's engine
/ vLLM, and ragserve with reuse / without. Run it through ``benchmarks/compare_engines.sh``,
which builds both venvs.

    python -m benchmarks.compare_engines --model-dir DIR --name NAME \\
        [--concurrency 16 64] [--prompts-per-concurrency 8] [--input-len 128 --output-len 64]
        [--dataset prefix_repetition --prefix-len 512 --suffix-len 64 --num-prefixes 4]
        [--only ragserve ragserve-noreuse vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import httpx

from benchmarks.common import emit, round_floats
from benchmarks.compare_servers import RssSampler, stop

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_NO_USAGE_STATS": "1"}


def servers(args: argparse.Namespace) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, command, extra environment) of each server, all on 127.0.0.1:``args.port``."""
    common = ["--model", str(args.model_dir), "--served-model-name", args.name,
              "--host", "127.0.0.1", "--port", str(args.port), "--dtype", args.dtype,
              "--max-model-len", str(args.max_model_len), "--max-num-seqs",
              str(args.max_num_seqs)]
    rag = [str(args.ragserve_python), "-m", "server", *common]
    vpy = str(args.vllm_python)
    reuse = ["--enable-prefix-caching"] if args.dataset == "prefix_repetition" else []
    return [
        ("ragserve", rag, {}),
        ("ragserve-noreuse", [*rag, "--no-enable-prefix-caching"], {}),
        ("ragserve-vllm", [vpy, "-m", "server", *common, "--engine", "vllm", *reuse],
         VLLM_ENV),
        ("vllm", [vpy, "-m", "vllm.entrypoints.openai.api_server", *common, *reuse], VLLM_ENV),
    ]


DEFAULT_SERVERS = ("ragserve", "ragserve-vllm", "vllm")


def dataset_args(args: argparse.Namespace) -> list[str]:
    if args.dataset == "prefix_repetition":
        return ["--dataset-name", "prefix_repetition",
                "--prefix-repetition-prefix-len", str(args.prefix_len),
                "--prefix-repetition-suffix-len", str(args.suffix_len),
                "--prefix-repetition-num-prefixes", str(args.num_prefixes),
                "--prefix-repetition-output-len", str(args.output_len)]
    return ["--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len)]


def bench(args: argparse.Namespace, concurrency: int) -> dict:
    """One ``vllm bench serve`` run against the server on ``args.port``."""
    cmd = [str(args.vllm_python), "-m", "benchmarks.vllm_bench", "--backend", "openai-chat",
           "--endpoint", "/v1/chat/completions", "--base-url", f"http://127.0.0.1:{args.port}",
           "--model", args.name, "--tokenizer", str(args.model_dir), *dataset_args(args),
           "--ignore-eos", "--save-detailed",  # keeps the failed requests' errors
           "--num-prompts", str(concurrency * args.prompts_per_concurrency),
           "--max-concurrency", str(concurrency), "--seed", str(args.seed),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **VLLM_ENV},
                         timeout=args.bench_timeout)
    if out.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(name: str, cmd: list[str], env: dict[str, str], args: argparse.Namespace) -> dict:
    log_path = args.log_dir / f"{name}.log"
    print(f"{name}: {shlex.join(cmd)}", flush=True)
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **env})
        sampler = RssSampler(proc.pid)
        sampler.start()
        runs = {}
        try:
            ready_s = wait_ready(proc, f"http://127.0.0.1:{args.port}", args.name,
                                 args.start_timeout, log_path) - t0
            print(f"{name}: ready in {ready_s:.1f}s", flush=True)
            pending = kernels_pending(f"http://127.0.0.1:{args.port}")
            for c in args.concurrency:
                r = bench(args, c)
                runs[str(c)] = r
                print(f"{name} @{c}: {r['output_throughput']:.1f} tok/s, TTFT p50 "
                      f"{r['median_ttft_ms']:.0f} ms p99 {r['p99_ttft_ms']:.0f} ms, TPOT p50 "
                      f"{r['median_tpot_ms']:.0f} ms p99 {r['p99_tpot_ms']:.0f} ms, "
                      f"{r['failed']} failed", flush=True)
        finally:
            stop(proc, sampler, timeout=90)
    return {"ready_s": ready_s, "kernels_pending_at_ready": pending,
            "peak_rss_gib": sampler.peak / 2**30, "runs": runs}


def kernels_pending(url: str) -> bool | None:
    """Whether ragserve's engine was still building kernels when the load started
    (``ragserve_kernels_pending``; None for servers without that series)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    pending = [line for line in text.splitlines()
               if line.startswith("ragserve_kernels_pending{")]
    if not pending:
        return None
    return any(line.rsplit(" ", 1)[1] not in ("0", "0.0") for line in pending)


def wait_ready(proc: subprocess.Popen, url: str, name: str, timeout: float, log: Path
               ) -> float:
    """When the server first completes a one-token request (the same test for every server:
    vLLM's has no /ready), as a ``time.perf_counter()``."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: see {log}")
        try:
            r = httpx.post(f"{url}/v1/completions", timeout=30, json={
                "model": name, "prompt": "hi", "max_tokens": 1})
            if r.status_code == 200:
                return time.perf_counter()
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"not ready after {timeout:.0f}s: see {log}")


def ratios(a: dict, b: dict, concurrency: list[int]) -> dict:
    """a / b for throughput, TTFT and TPOT (p50 and p99) per concurrency, ready time, RSS."""
    out = {"ready_time": a["ready_s"] / b["ready_s"], "peak_rss": a["peak_rss_gib"] /
           b["peak_rss_gib"]}
    for c in map(str, concurrency):
        ra, rb = a["runs"][c], b["runs"][c]
        out[f"output_tok_s@{c}"] = ra["output_throughput"] / rb["output_throughput"]
        for key in ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms"):
            out[f"{key}@{c}"] = ra[key] / rb[key]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="a Hugging Face directory")
    p.add_argument("--name", required=True, help="the served model name")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--prompts-per-concurrency", type=int, default=4,
                   help="prompts per run = concurrency x this")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dataset", choices=["random", "prefix_repetition"], default="random")
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8431)
    p.add_argument("--only", nargs="+", default=list(DEFAULT_SERVERS),
                   help="the servers to run: ragserve, ragserve-noreuse, ragserve-vllm, vllm")
    p.add_argument("--ragserve-python", type=Path, default=Path(".venv/bin/python"))
    p.add_argument("--vllm-python", type=Path, default=Path(".venv-vllm/bin/python"))
    p.add_argument("--start-timeout", type=float, default=1800.0)
    p.add_argument("--bench-timeout", type=float, default=3600.0)
    p.add_argument("--log-dir", type=Path, default=Path(".cache/compare-engines"))
    args = p.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, cmd, env in servers(args):
        if name in args.only:
            results[name] = measure(name, cmd, env, args)
    out = {"concurrency": args.concurrency, "dataset": args.dataset,
           "input_len": (args.input_len if args.dataset == "random"
                         else f"{args.prefix_len} shared ({args.num_prefixes} prefixes) + "
                              f"{args.suffix_len}"),
           "output_len": args.output_len, "max_num_seqs": args.max_num_seqs,
           "dtype": args.dtype, "model": args.name,
           "servers": {n: {**round_floats({k: v for k, v in r.items() if k != "runs"}),
                           "runs": r["runs"]} for n, r in results.items()}}
    if {"ragserve-vllm", "vllm"} <= results.keys():
        out["ragserve_vllm_over_vllm"] = round_floats(
            ratios(results["ragserve-vllm"], results["vllm"], args.concurrency))
    if {"ragserve", "vllm"} <= results.keys():
        out["ragserve_over_vllm"] = round_floats(
            ratios(results["ragserve"], results["vllm"], args.concurrency))
    if {"ragserve", "ragserve-noreuse"} <= results.keys():
        out["reuse_over_noreuse"] = round_floats(
            ratios(results["ragserve"], results["ragserve-noreuse"], args.concurrency))
    args.quick = False
    emit("compare_engines", args, out)


if __name__ == "__main__":
    main()
