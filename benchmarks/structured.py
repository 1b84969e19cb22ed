"""Structured outputs (``response_format`` json_schema) on ragserve and on vLLM 0.32's own
server: decode cost, grammar compile time, and whether the outputs validate.

    python -m benchmarks.structured [--quick] [--skip-vllm]
    bash benchmarks/structured.sh [--quick] [--skip-vllm]      (builds the venvs first)

Model: the embedded SmolLM2-135M-Instruct (its dequantized Hugging Face directory), both servers
started with the same flags (``--max-model-len 2048 --max-num-seqs 16 --dtype bfloat16``, on
127.0.0.1), one after the other, never both at once. Load starts as soon as each says it is
ready (ragserve: ``/ready`` answers 200; vLLM: ``/v1/models``). The client is the official
``openai.AsyncOpenAI`` for everything. Measured:

1. **Grammar compile, in-process** (before any server starts): ``runtime.structured.
   GrammarCompiler`` on the model's tokenizer, the 20-property schema of
   ``benchmarks.grammar_libs``. Cold: a fresh schema each time (one property renamed, so both the
   spec text our cache keys on and the grammar itself are new); cached: the same spec again. The
   one-off tokenizer table (``setup_s``) is reported apart.

2. **Per server, in this order**: one free-text warm-up request; the first structured request
   of the server's life (its TTFT includes any one-off grammar setup); **validity**; **the cost of
   a new schema at the first token**; **TPOT** last. ragserve builds and times a compiled
   decode step in the background for a minute or two after ``/ready`` and then switches to the
   faster kernel; so that no switch falls between the ABAB rounds, the TPOT phase waits (at
   most ``--settle-timeout``) until ``ragserve_kernels_pending`` reads 0 on /metrics. The wait
   (``kernels_settle_wait_s``, usually 0: the phases before take longer) and the gauge before and
   after the TPOT phase are reported. vLLM compiles before it says it is ready.

   *Validity*: 200 (``--quick``: 32) non-streamed completions at 16 concurrent with a realistic
   schema (nested object, enum, bounded integers, bounded array of bounded strings, all
   properties required, no additional ones), different prompts, seeds and temperatures 0.7-1.0,
   ``max_tokens`` 384 (longer than the longest output the schema allows with SmolLM2's
   tokenizer save for pathological whitespace, which ragserve's grammar does not allow and
   vLLM's default grammar does). Each answer is parsed and validated with ``jsonschema``
   (Draft 2020-12). Reported: the share of those that finished ``stop`` that parse and validate
   (goal 100%), and, apart, how many finished ``length`` (truncated by ``max_tokens``). A
   request refused with 429/503 (an overloaded machine: the queue-wait bound) is sent again
   up to twice, counted in ``retries``; latency is not measured in this phase.

   *New schema at the first token*: on the otherwise idle server, for each of a few fresh
   20-property schemas, three streamed requests one after the other (different prompts of the
   same length, so no prefix cache helps one more than another): the new schema, the same schema
   again, and free text. TTFT p50 of each; ``new - repeat`` is what a new schema costs a client
   (ragserve compiles it in the API process before queueing, and again in the engine process:
   both are in this number), ``repeat - free`` what the constraint costs the first token.

   *TPOT*, constrained vs free, at 1 and 16 concurrent streams. TPOT of a request =
   (arrival of its last chunk with ``choices`` - arrival of its first) / (completion tokens - 1),
   the tokens counted by ``stream_options={"include_usage": True}``; as ``vllm bench serve`` and
   ``benchmarks.serve_load`` time it (both servers send their first chunk with the first token).
   **Comparable lengths by construction**: both conditions get the same prompts, seeds,
   temperature (0.8) and a fixed ``max_tokens`` (128; quick 64). Free text runs with
   ``ignore_eos``; the constrained requests use a schema whose *shortest* valid output is
   longer than ``max_tokens`` (``{"people": [...]}`` with ``minItems`` 24 objects of four
   required fields, roughly 20 tokens each even when empty), so every constrained request must
   run to ``max_tokens`` too and finish ``length`` (the finish reasons are reported to show it).
   So both conditions decode the same number of tokens per request with the same batch sizes
   throughout, and the ratio is the cost of the mask alone; ``ignore_eos`` is not used on the
   constrained side, where it would mean decoding past the grammar's end. A round is 16
   simultaneous requests at concurrency 16 and 2 sequential ones at concurrency 1 (quick: 1);
   rounds alternate free, constrained, free, constrained... (ABAB), 3 of each (quick: 2), after
   one warm-up request of each kind. Reported per condition: TPOT p50 and mean, and the
   ratio constrained / free at each concurrency (goal <= 1.10).

3. **vLLM** (unless ``--skip-vllm``): the same phases, same schemas, prompts, seeds, client and
   concurrency against ``vllm.entrypoints.openai.api_server`` from ``.venv-vllm`` (started as
   ``benchmarks/compare_vllm.sh`` starts it), with its own defaults (xgrammar, any whitespace
   allowed between JSON tokens); ``--vllm-arg`` adds flags to it.

The server logs go to ``--log-dir`` (``.cache/structured``). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from benchmarks.common import emit, mean, median, round_floats
from benchmarks.grammar_libs import SCHEMA_20

NAME = "SmolLM2-135M-Instruct"
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_NO_USAGE_STATS": "1"}
TPOT_TEMPERATURE = 0.8
VALIDITY_MAX_TOKENS = 384
VALIDITY_CONCURRENCY = 16
#: times a validity request refused with 429/503 (an overloaded machine) is sent again
VALIDITY_RETRIES = 2

# The validity schema: nested object, enum, integer bounds, a bounded array, bounded strings.
PROFILE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "department": {"enum": ["engineering", "sales", "support", "finance", "research"]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 40},
                "city": {"type": "string", "minLength": 1, "maxLength": 30},
                "country": {"type": "string", "minLength": 1, "maxLength": 30},
            },
            "required": ["street", "city", "country"],
            "additionalProperties": False,
        },
        "skills": {"type": "array", "items": {"type": "string", "minLength": 1,
                                              "maxLength": 24},
                   "minItems": 1, "maxItems": 5},
        "years_experience": {"type": "integer", "minimum": 0, "maximum": 60},
        "remote": {"type": "boolean"},
    },
    "additionalProperties": False,
}
PROFILE_SCHEMA["required"] = list(PROFILE_SCHEMA["properties"])

# The TPOT schema: its shortest valid output is far longer than max_tokens (see the docstring).
PEOPLE_MIN_ITEMS = 24
PEOPLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"people": {
        "type": "array", "minItems": PEOPLE_MIN_ITEMS, "maxItems": 64,
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "city": {"type": "string"},
                "role": {"enum": ["engineer", "manager", "designer", "analyst", "nurse",
                                  "teacher"]},
                "note": {"type": "string"},
            },
            "required": ["name", "city", "role", "note"],
            "additionalProperties": False,
        },
    }},
    "required": ["people"],
    "additionalProperties": False,
}

CITIES = ("Lisbon", "Osaka", "Nairobi", "Toronto", "Lyon", "Austin", "Pune", "Bergen",
          "Cordoba", "Leeds", "Busan", "Tartu")
INDUSTRIES = ("software", "shipping", "bakery", "insurance", "robotics", "publishing",
              "solar energy", "hospital", "retail", "telecom")


def schema_variant(tag: str, i: int) -> dict[str, Any]:
    """``SCHEMA_20`` with one property renamed: a new spec text and a new grammar."""
    s = copy.deepcopy(SCHEMA_20)
    s["properties"] = {(f"field_0_{tag}_{i}" if k == "field_0" else k): v
                       for k, v in s["properties"].items()}
    s["required"] = list(s["properties"])
    return s


def response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                   "strict": True}}


def profile_prompt(rng: random.Random) -> str:
    return (f"Invent a fictional employee of a {rng.choice(INDUSTRIES)} company in "
            f"{rng.choice(CITIES)}. Reply with a JSON object with their name, age, department, "
            "address (street, city, country), skills (a short list), years_experience and "
            "remote (true or false).")


def people_prompt(i: int) -> str:
    return (f"Write a JSON object whose key \"people\" lists at least {PEOPLE_MIN_ITEMS} "
            f"fictional people living in {CITIES[i % len(CITIES)]}, each with a name, a city, a "
            "role and a one-sentence note. Be creative.")


def record_prompt(k: int, which: str) -> str:
    """Same length for ``which`` in a/b/c; different text, so prefix caches share nothing more."""
    return (f"Case {k:03d}{which}: fill in a record of a fictional warehouse item with eight "
            "text fields, six counts, a score, a flag, tags, a kind, an owner and a note.")


# --------------------------------------------------------------------------- in-process compile

def compile_times(path: Path, n_cold: int) -> dict[str, Any]:
    """Cold and cached compile of 20-property schemas with ragserve's ``GrammarCompiler``."""
    from runtime.loader import load_tokenizer
    from runtime.structured import GrammarCompiler
    from scheduler import StructuredKind, StructuredOutput

    tok = load_tokenizer(path)
    eos = tok.eos_token_id
    compiler = GrammarCompiler(tok, len(tok), [] if eos is None else [eos])
    t0 = time.perf_counter()
    compiler.warm()
    setup_s = time.perf_counter() - t0
    cold, cached = [], []
    for i in range(n_cold):
        so = StructuredOutput(StructuredKind.JSON, json.dumps(schema_variant("inproc", i)))
        t0 = time.perf_counter()
        compiler.compile(so)
        cold.append(time.perf_counter() - t0)
        for _ in range(3):
            t0 = time.perf_counter()
            compiler.compile(so)
            cached.append(time.perf_counter() - t0)
    others = {}
    for name, schema in (("profile", PROFILE_SCHEMA), ("people", PEOPLE_SCHEMA)):
        t0 = time.perf_counter()
        compiler.compile(StructuredOutput(StructuredKind.JSON, json.dumps(schema)))
        others[f"{name}_schema_ms"] = (time.perf_counter() - t0) * 1e3
    return {
        "setup_s": setup_s,
        "n_cold": n_cold,
        "cold_p50_ms": median(cold) * 1e3,
        "cold_max_ms": max(cold) * 1e3,
        "cached_p50_us": median(cached) * 1e6,
        **others,
    }


# --------------------------------------------------------------------------- servers

@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict[str, str]
    url: str
    ready_path: str


def server_specs(args: argparse.Namespace, model_dir: Path) -> list[Server]:
    def common(port: int) -> list[str]:
        return ["--model", str(model_dir), "--served-model-name", NAME, "--host", "127.0.0.1",
                "--port", str(port), "--max-model-len", "2048", "--max-num-seqs", "16",
                "--dtype", args.dtype]

    out = [Server("ragserve", [str(args.ragserve_python), "-m", "server",
                               *common(args.ragserve_port)],
                  {}, f"http://127.0.0.1:{args.ragserve_port}", "/ready")]
    if not args.skip_vllm:
        out.append(Server("vllm", [str(args.vllm_python), "-m",
                                   "vllm.entrypoints.openai.api_server",
                                   *common(args.vllm_port), *args.vllm_arg],
                          VLLM_ENV, f"http://127.0.0.1:{args.vllm_port}", "/v1/models"))
    return out


def start(server: Server, log_path: Path, timeout: float) -> tuple[subprocess.Popen, float]:
    """Start ``server`` in a session of its own; (process, seconds to ready)."""
    log = open(log_path, "w")  # noqa: SIM115 - the child holds it; closed when we return
    t0 = time.perf_counter()
    proc = subprocess.Popen(server.cmd, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, **server.env})
    log.close()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {proc.returncode}: see {log_path}")
        if time.perf_counter() - t0 > timeout:
            stop(proc)
            raise TimeoutError(f"{server.name} not ready after {timeout:.0f} s: see {log_path}")
        try:
            if httpx.get(server.url + server.ready_path, timeout=2).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.25)


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the server's own process group (SIGKILL after ``timeout``)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def kernels_pending(url: str) -> int | None:
    """ragserve's ``ragserve_kernels_pending`` (1 while it times kernels in the background)."""
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    m = re.search(r"^ragserve_kernels_pending\{[^}]*\} ([0-9.]+)$", text, re.MULTILINE)
    return int(float(m.group(1))) if m else None


# --------------------------------------------------------------------------- requests

@dataclass
class Streamed:
    ttft: float
    tpot: float | None
    tokens: int
    finish: str | None
    text: str


async def streamed(client: openai.AsyncOpenAI, prompt: str, max_tokens: int,
                   temperature: float, seed: int, fmt: dict[str, Any] | None,
                   ignore_eos: bool = False) -> Streamed:
    """One streamed chat completion; TTFT and TPOT as ``benchmarks.serve_load`` times them."""
    kw: dict[str, Any] = {}
    if fmt is not None:
        kw["response_format"] = fmt
    if ignore_eos:
        kw["extra_body"] = {"ignore_eos": True}
    t0 = time.perf_counter()
    first = last = None
    n_out, finish, parts = 0, None, []
    stream = await client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=temperature, top_p=1.0, seed=seed, stream=True,
        stream_options={"include_usage": True}, **kw)
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            first = first or now
            last = now
            c = chunk.choices[0]
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
        if chunk.usage is not None:
            n_out = chunk.usage.completion_tokens
    if first is None or last is None:
        raise RuntimeError("no choices streamed")
    tpot = (last - first) / (n_out - 1) if n_out > 1 else None
    return Streamed(first - t0, tpot, n_out, finish, "".join(parts))


def err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


async def tpot_phase(client: openai.AsyncOpenAI, concurrency: int, rounds: int,
                     per_round: int, max_tokens: int, seed: int) -> dict[str, Any]:
    """ABAB rounds of free (``ignore_eos``) and constrained requests; see the docstring."""
    fmt = response_format("people", PEOPLE_SCHEMA)
    samples: dict[str, list[Streamed]] = {"free": [], "json_schema": []}
    errors: dict[str, list[str]] = {"free": [], "json_schema": []}

    async def one(cond: str, i: int) -> None:
        try:
            samples[cond].append(await streamed(
                client, people_prompt(i), max_tokens, TPOT_TEMPERATURE, seed + i,
                fmt if cond == "json_schema" else None, ignore_eos=cond == "free"))
        except Exception as e:  # counted and reported, the run goes on
            errors[cond].append(err(e))

    async def round_of(cond: str, base: int) -> None:
        if concurrency == 1:
            for j in range(per_round):
                await one(cond, base + j)
        else:
            await asyncio.gather(*[one(cond, base + j) for j in range(per_round)])

    for cond in samples:  # warm-up: the schema compiled, both paths taken once; not counted
        with contextlib.suppress(Exception):
            await streamed(client, people_prompt(999), 8, TPOT_TEMPERATURE, seed,
                           fmt if cond == "json_schema" else None, ignore_eos=cond == "free")
    for r in range(rounds):
        for cond in ("free", "json_schema"):  # A B A B ...: the same prompts and seeds for both
            await round_of(cond, r * per_round)
    out: dict[str, Any] = {"concurrency": concurrency, "rounds": rounds,
                           "requests_per_round": per_round, "max_tokens": max_tokens}
    for cond, ss in samples.items():
        tp = [s.tpot for s in ss if s.tpot is not None]
        out[cond] = round_floats({
            "n": len(ss), "errors": len(errors[cond]), "error_examples": errors[cond][:2],
            "tpot_p50_ms": median(tp) * 1e3, "tpot_mean_ms": mean(tp) * 1e3,
            "tokens_mean": mean([s.tokens for s in ss]),
            "finish": dict(Counter(str(s.finish) for s in ss)),
        }, 3)
    f, c = out["free"], out["json_schema"]
    out["ratio_p50"] = round(c["tpot_p50_ms"] / f["tpot_p50_ms"], 4) if f["n"] and c["n"] \
        else None
    out["ratio_mean"] = round(c["tpot_mean_ms"] / f["tpot_mean_ms"], 4) if f["n"] and c["n"] \
        else None
    return out


async def validity_phase(client: openai.AsyncOpenAI, n: int, seed: int) -> dict[str, Any]:
    """``n`` constrained completions, ``VALIDITY_CONCURRENCY`` at a time, each validated."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(PROFILE_SCHEMA)
    fmt = response_format("employee", PROFILE_SCHEMA)
    rng = random.Random(seed)
    jobs = [(profile_prompt(rng), (0.7, 0.8, 0.9, 1.0)[i % 4], seed * 1000 + i)
            for i in range(n)]
    results: list[tuple[str | None, str, int]] = []
    errors: list[str] = []
    retries: list[str] = []
    next_job = iter(jobs)

    async def worker() -> None:
        for prompt, temp, s in next_job:  # shared iterator: a bounded loop over all jobs
            for attempt in range(VALIDITY_RETRIES + 1):
                try:
                    r = await client.chat.completions.create(
                        model=NAME, messages=[{"role": "user", "content": prompt}],
                        max_tokens=VALIDITY_MAX_TOKENS, temperature=temp, top_p=1.0, seed=s,
                        response_format=fmt)  # type: ignore[arg-type]
                    c = r.choices[0]
                    results.append((c.finish_reason, c.message.content or "",
                                    r.usage.completion_tokens if r.usage else 0))
                    break
                except openai.APIStatusError as e:  # an overloaded server's 429/503: again
                    if e.status_code in (429, 503) and attempt < VALIDITY_RETRIES:
                        retries.append(err(e))
                        await asyncio.sleep(1.0)
                        continue
                    errors.append(err(e))
                    break
                except Exception as e:
                    errors.append(err(e))
                    break

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(VALIDITY_CONCURRENCY)])
    wall = time.perf_counter() - t0
    stats: Counter[str] = Counter()
    bad: list[str] = []
    for finish, text, _ in results:
        kind = "stop" if finish == "stop" else "length" if finish == "length" else "other"
        stats[kind] += 1
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if kind == "stop":
                bad.append(f"not JSON ({e.msg}): {text[:160]!r}")
            continue
        stats[f"{kind}_parsed"] += 1
        problem = next(iter(validator.iter_errors(obj)), None)
        if problem is None:
            stats[f"{kind}_valid"] += 1
        elif kind == "stop":
            bad.append(f"invalid ({problem.message[:100]}): {text[:160]!r}")
    stop_n = stats["stop"]
    return round_floats({
        "requests": n, "completed": len(results), "errors": len(errors),
        "error_examples": errors[:3], "retries": len(retries),
        "retry_examples": retries[:2], "wall_s": wall,
        "finished_stop": stop_n, "finished_length": stats["length"],
        "finished_other": stats["other"],
        "stop_parsed": stats["stop_parsed"], "stop_valid": stats["stop_valid"],
        "valid_share_of_stop": stats["stop_valid"] / stop_n if stop_n else None,
        "valid_share_of_all": stats["stop_valid"] / n if n else None,
        "length_parsed": stats["length_parsed"],
        "completion_tokens_mean": mean([t for _, _, t in results]),
        "completion_tokens_max": max((t for _, _, t in results), default=0),
        "invalid_examples": bad[:3],
    })


async def new_schema_phase(client: openai.AsyncOpenAI, server: str, pairs: int,
                           seed: int) -> dict[str, Any]:
    """TTFT of a new 20-property schema, the same schema again, and free text, one at a time."""
    ttft: dict[str, list[float]] = {"new": [], "repeat": [], "free": []}
    errors: list[str] = []
    for k in range(pairs):
        fmt = response_format(f"record_{k}", schema_variant(f"{server}_{seed}", k))
        for which, cond in (("a", "new"), ("b", "repeat"), ("c", "free")):
            try:
                s = await streamed(client, record_prompt(k, which), 8, 0.0, seed + k,
                                   None if cond == "free" else fmt)
                ttft[cond].append(s.ttft)
            except Exception as e:
                errors.append(f"{cond}: {err(e)}")
    p50 = {k: median(v) * 1e3 for k, v in ttft.items()}
    return round_floats({
        "pairs": pairs, "errors": len(errors), "error_examples": errors[:3],
        "new_ttft_p50_ms": p50["new"], "repeat_ttft_p50_ms": p50["repeat"],
        "free_ttft_p50_ms": p50["free"],
        "new_minus_repeat_p50_ms": median([a - b for a, b in zip(ttft["new"],
                                                                 ttft["repeat"])]) * 1e3,
        "repeat_minus_free_p50_ms": median([a - b for a, b in zip(ttft["repeat"],
                                                                  ttft["free"])]) * 1e3,
    }, 2)


async def measure(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """Every phase against one running server."""
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0,
                                timeout=600.0)
    out: dict[str, Any] = {}
    try:
        warm = await streamed(client, "Say hello.", 8, 0.0, args.seed, None)
        out["warmup_free_ttft_ms"] = round(warm.ttft * 1e3, 2)
        try:
            first = await streamed(client, profile_prompt(random.Random(-1)), 8, 0.0, args.seed,
                                   response_format("employee", PROFILE_SCHEMA))
            out["first_structured_ttft_ms"] = round(first.ttft * 1e3, 2)
        except Exception as e:
            out["first_structured_error"] = err(e)
        print(f"{server.name}: warm-up TTFT {out['warmup_free_ttft_ms']:.0f} ms, first "
              f"structured request TTFT {out.get('first_structured_ttft_ms', float('nan')):.0f} "
              "ms", flush=True)

        v = await validity_phase(client, args.validity_requests, args.seed)
        out["validity"] = v
        share = v["valid_share_of_stop"]
        print(f"{server.name}: validity {v['stop_valid']}/{v['finished_stop']} of 'stop' valid"
              f" ({'n/a' if share is None else f'{share:.1%}'}), {v['finished_length']} "
              f"'length', {v['errors']} errors, {v['wall_s']:.0f} s", flush=True)

        ns = await new_schema_phase(client, server.name, args.schema_pairs, args.seed)
        out["new_schema"] = ns
        print(f"{server.name}: TTFT new schema {ns['new_ttft_p50_ms']:.0f} ms, repeat "
              f"{ns['repeat_ttft_p50_ms']:.0f} ms, free {ns['free_ttft_p50_ms']:.0f} ms "
              f"(p50 of {ns['pairs']})", flush=True)

        if server.name == "ragserve":  # no kernel switch in the middle of the ABAB rounds
            t0 = time.perf_counter()
            while (kernels_pending(server.url) == 1
                   and time.perf_counter() - t0 < args.settle_timeout):
                await asyncio.sleep(1.0)
            out["kernels_settle_wait_s"] = round(time.perf_counter() - t0, 1)
            out["kernels_pending_before_tpot"] = kernels_pending(server.url)
        out["tpot"] = {}
        for c, rounds, per_round in ((1, args.rounds_c1, args.c1_requests),
                                     (16, args.rounds_c16, 16)):
            t = await tpot_phase(client, c, rounds, per_round, args.max_tokens, args.seed)
            out["tpot"][f"c{c}"] = t
            print(f"{server.name}: @{c} TPOT p50 free {t['free']['tpot_p50_ms']:.1f} ms, "
                  f"json_schema {t['json_schema']['tpot_p50_ms']:.1f} ms, ratio p50 "
                  f"{t['ratio_p50']} mean {t['ratio_mean']} (finish free "
                  f"{t['free']['finish']}, json_schema {t['json_schema']['finish']})",
                  flush=True)
        if server.name == "ragserve":
            out["kernels_pending_after_tpot"] = kernels_pending(server.url)
    finally:
        await client.close()
    return out


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smaller run (under ~4 minutes)")
    p.add_argument("--skip-vllm", action="store_true", help="ragserve only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--ragserve-python", type=Path, default=Path(".venv/bin/python"))
    p.add_argument("--vllm-python", type=Path, default=Path(".venv-vllm/bin/python"))
    p.add_argument("--vllm-arg", action="append", default=[],
                   help="an extra flag for vLLM's server (repeat; e.g. "
                        "--vllm-arg=--structured-outputs-config.disable_any_whitespace=true)")
    p.add_argument("--ragserve-port", type=int, default=8411)
    p.add_argument("--vllm-port", type=int, default=8412)
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--settle-timeout", type=float, default=300.0,
                   help="seconds to wait before the TPOT rounds while ragserve still times "
                        "its kernels in the background (ragserve_kernels_pending 1)")
    p.add_argument("--log-dir", type=Path, default=Path(".cache/structured"))
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    q = args.quick
    args.validity_requests = 32 if q else 200
    args.schema_pairs = 3 if q else 8
    args.max_tokens = 64 if q else 128
    args.rounds_c1, args.c1_requests = (2, 1) if q else (3, 2)
    args.rounds_c16 = 2 if q else 3
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
        os.environ.setdefault(k, v)
    args.log_dir.mkdir(parents=True, exist_ok=True)

    from runtime.loader import resolve_model

    model_dir = resolve_model(None).path
    print(f"model {NAME}: {model_dir}", flush=True)
    comp = round_floats(compile_times(model_dir, 8 if q else 20), 3)
    print(f"in-process compile, 20-property schema: cold p50 {comp['cold_p50_ms']:.1f} ms "
          f"(max {comp['cold_max_ms']:.1f}), cached p50 {comp['cached_p50_us']:.1f} us, "
          f"tokenizer setup {comp['setup_s']:.2f} s", flush=True)

    servers: dict[str, Any] = {}
    for server in server_specs(args, model_dir):
        log_path = args.log_dir / f"{server.name}.log"
        try:
            proc, ready_s = start(server, log_path, args.start_timeout)
        except (RuntimeError, TimeoutError) as e:
            print(f"{server.name}: {e}", file=sys.stderr, flush=True)
            servers[server.name] = {"error": err(e)}
            continue
        print(f"{server.name}: ready in {ready_s:.1f} s", flush=True)
        try:
            servers[server.name] = {"ready_s": round(ready_s, 2),
                                    **asyncio.run(measure(server, args))}
        except Exception as e:  # one server failing still reports the other
            print(f"{server.name}: {err(e)} (log: {log_path})", file=sys.stderr, flush=True)
            servers[server.name] = {"error": err(e)}
        finally:
            stop(proc)

    headline: dict[str, Any] = {}
    for name, r in servers.items():
        if "tpot" not in r:
            continue
        for c, t in r["tpot"].items():
            headline[f"{name}_tpot_ratio_{c}"] = t["ratio_p50"]
        headline[f"{name}_valid_share_of_stop"] = r["validity"]["valid_share_of_stop"]
        headline[f"{name}_finished_length"] = r["validity"]["finished_length"]
        headline[f"{name}_new_schema_ttft_ms"] = r["new_schema"]["new_ttft_p50_ms"]
        headline[f"{name}_new_minus_repeat_ttft_ms"] = r["new_schema"]["new_minus_repeat_p50_ms"]
    if all("tpot" in servers.get(n, {}) for n in ("ragserve", "vllm")):
        for c in ("c1", "c16"):  # ragserve / vLLM, constrained TPOT p50 (different times!)
            r, v = servers["ragserve"]["tpot"][c], servers["vllm"]["tpot"][c]
            headline[f"json_tpot_p50_ragserve_over_vllm_{c}"] = round(
                r["json_schema"]["tpot_p50_ms"] / v["json_schema"]["tpot_p50_ms"], 4)
    headline["compile_cold_p50_ms"] = comp["cold_p50_ms"]
    headline["compile_cached_p50_us"] = comp["cached_p50_us"]
    goals = {"tpot_ratio": "<= 1.10", "valid_share_of_stop": "1.0",
             "compile_cold_p50_ms": "<= 50", "compile_cached": "~0"}
    print("headline: " + ", ".join(f"{k} {v}" for k, v in headline.items()), flush=True)
    emit("structured", args, {
        **headline, "goals": goals, "model": NAME, "dtype": args.dtype,
        "max_tokens_tpot": args.max_tokens, "validity_max_tokens": VALIDITY_MAX_TOKENS,
        "compile": comp, **servers,
    })


if __name__ == "__main__":
    main()
