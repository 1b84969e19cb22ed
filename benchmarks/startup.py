"""Time to ready and time to full speed, first start and second start, ragserve against vLLM.

Each server starts twice on one fresh cache directory: the first start builds and caches what
it compiles (ragserve: kernel timings, inductor's kernels for the compiled decode step, the
step costs; vLLM: its torch.compile cache), the second reads it. At each start, as soon as the
server answers a one-token request (ready: a load balancer would send it traffic now), the
same load runs twice back to back (``vllm bench serve``, random prompts, ``--ignore-eos``):
the first measures the server as traffic meets it at ready, the second its steady state.
``full_speed_at_ready`` is their throughput ratio; ``time_to_full_speed_s`` is the ready time
when that ratio is at least 0.9, else the end of the first load (an upper bound).

    python -m benchmarks.startup --model-dir DIR --name NAME [--quick]
    bash benchmarks/startup.sh [--quick]    # builds both venvs, the embedded model

The last line is one JSON object: per server and start the times and throughputs, and
ragserve / vLLM for ready and full-speed times.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit, round_floats
from benchmarks.compare_engines import VLLM_ENV, bench, wait_ready
from benchmarks.compare_servers import RssSampler, stop


def commands(args: argparse.Namespace, cache: Path) -> dict[str, tuple[list[str], dict]]:
    common = ["--model", str(args.model_dir), "--served-model-name", args.name,
              "--host", "127.0.0.1", "--port", str(args.port), "--dtype", args.dtype,
              "--max-model-len", str(args.max_model_len), "--max-num-seqs",
              str(args.max_num_seqs)]
    return {
        "ragserve": ([str(args.ragserve_python), "-m", "server", *common,
                      "--cache-dir", str(cache / "ragserve")], {}),
        "vllm": ([str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server", *common],
                 {**VLLM_ENV, "VLLM_CACHE_ROOT": str(cache / "vllm")}),
    }


def one_start(name: str, cmd: list[str], env: dict, args: argparse.Namespace,
              label: str) -> dict:
    log_path = args.log_dir / f"startup-{name}-{label}.log"
    print(f"{name} ({label} start): {' '.join(cmd)}", flush=True)
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **env})
        sampler = RssSampler(proc.pid)
        sampler.start()
        try:
            ready = wait_ready(proc, f"http://127.0.0.1:{args.port}", args.name,
                               args.start_timeout, log_path) - t0
            t1 = time.perf_counter()
            first = bench(args, args.concurrency)
            first_end = time.perf_counter() - t0
            second = bench(args, args.concurrency)
        finally:
            stop(proc, sampler, timeout=90)
    at_ready = first["output_throughput"] / second["output_throughput"]
    out = {"ready_s": ready, "first_load_s": first_end - (t1 - t0),
           "at_ready_tok_s": first["output_throughput"],
           "steady_tok_s": second["output_throughput"], "full_speed_at_ready": at_ready,
           "time_to_full_speed_s": ready if at_ready >= 0.9 else first_end,
           "at_ready_tpot_p50_ms": first["median_tpot_ms"],
           "steady_tpot_p50_ms": second["median_tpot_ms"]}
    print(f"{name} ({label}): ready {ready:.1f}s, at ready {first['output_throughput']:.1f} "
          f"tok/s, steady {second['output_throughput']:.1f} tok/s ({at_ready:.2f})", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="a Hugging Face directory")
    p.add_argument("--name", required=True, help="the served model name")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--prompts-per-concurrency", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8433)
    p.add_argument("--only", nargs="+", default=["ragserve", "vllm"])
    p.add_argument("--quick", action="store_true", help="one load of one prompt per client")
    p.add_argument("--ragserve-python", type=Path, default=Path(".venv/bin/python"))
    p.add_argument("--vllm-python", type=Path, default=Path(".venv-vllm/bin/python"))
    p.add_argument("--start-timeout", type=float, default=1800.0)
    p.add_argument("--bench-timeout", type=float, default=1800.0)
    p.add_argument("--log-dir", type=Path, default=Path(".cache/startup"))
    args = p.parse_args()
    args.dataset = "random"
    args.prompts_per_concurrency = args.prompts_per_concurrency or (1 if args.quick else 2)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ragserve-startup-") as tmp:
        for name, (cmd, env) in commands(args, Path(tmp)).items():
            if name in args.only:
                results[name] = {label: one_start(name, cmd, env, args, label)
                                 for label in ("first", "second")}
    out: dict = {"dtype": args.dtype, "concurrency": args.concurrency,
                 "input_len": args.input_len, "output_len": args.output_len,
                 "servers": {n: {k: round_floats(v) for k, v in r.items()}
                             for n, r in results.items()}}
    if {"ragserve", "vllm"} <= results.keys():
        rs, vl = results["ragserve"], results["vllm"]
        out["ragserve_over_vllm"] = round_floats({
            f"{key}_{label}": rs[label][key] / vl[label]["ready_s"]
            for label in ("first", "second")
            for key in ("ready_s", "time_to_full_speed_s")})
    emit("startup", args, out)


if __name__ == "__main__":
    main()
