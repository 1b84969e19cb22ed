"""Traffic-planned buckets: the length sample (bucketing.sample), the prefill cost model and
the server's prefill times (bucketing.cost), GET /v1/buckets, and ``ragserve buckets plan``
(server.buckets_cli)."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import httpx
import pytest
from serverutil import ThreadServer, wait_ready

from bucketing import generate_buckets, generate_dense_buckets, padding_ratio, plan_buckets
from bucketing.cost import (
    CPU_COST,
    TOKENS,
    PrefillCost,
    PrefillTimes,
    default_cost,
    fit_cost,
    mean_cost,
    relative_cost,
)
from bucketing.sample import LengthSample, SampleError
from server import buckets_cli
from server.cli import main

KEY = "plan-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


# -- the sample -----------------------------------------------------------------------------

def test_reservoir_is_bounded_and_counts_what_it_saw():
    s = LengthSample(capacity=100)
    for n in range(1, 1001):
        s.observe(n, 3)
    assert s.seen == (1000, 1000)
    assert len(s.prompt_lengths) == len(s.context_lengths) == len(s) == 100
    assert set(s.prompt_lengths) <= set(range(1, 1001))
    assert all(c >= 4 for c in s.context_lengths)


def test_reservoir_is_roughly_uniform_and_reproducible():
    def sample() -> LengthSample:
        s = LengthSample(capacity=1000, seed=7)
        for n in range(1, 20_001):
            s.add(prompt=n)
        return s

    a, b = sample(), sample()
    assert a.prompt_lengths == b.prompt_lengths  # fixed seed: the same sample on replay
    quarters = [0] * 4
    for n in a.prompt_lengths:
        quarters[(n - 1) * 4 // 20_000] += 1
    assert all(200 <= q <= 300 for q in quarters), quarters  # 250 each if uniform
    assert 9_000 < sum(a.prompt_lengths) / 1000 < 11_000  # mean 10,000.5


def test_reservoir_is_thread_safe():
    s = LengthSample(capacity=500)

    def work() -> None:
        for n in range(1, 2001):
            s.observe(n, 1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.seen == (8000, 8000)
    assert len(s.prompt_lengths) == len(s.context_lengths) == 500


def test_sample_round_trips_through_json():
    s = LengthSample(capacity=10)
    for n in range(1, 30):
        s.observe(n, n)
    back = LengthSample.from_json(json.loads(json.dumps(s.to_json())))
    assert back.to_json() == s.to_json()


def test_jsonl_accepts_both_shapes_and_names_bad_lines(tmp_path: Path):
    f = tmp_path / "lengths.jsonl"
    f.write_text('{"prompt_tokens": 10, "total_tokens": 15}\n\n{"prompt": 7, "context": 9}\n'
                 '{"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}\n')
    s = LengthSample.read(f)
    assert s.prompt_lengths == [10, 7, 3] and s.context_lengths == [15, 9, 5]
    for bad, why in (('{"prompt_tokens": "x"}', "integer"), ("not json", "not valid JSON"),
                     ("[1, 2]", "JSON object"), ('{"tokens": 3}', "prompt_tokens")):
        f.write_text('{"prompt": 1, "context": 2}\n' + bad + "\n")
        with pytest.raises(SampleError, match=rf"lengths.jsonl:2: .*{why}"):
            LengthSample.read(f)
    with pytest.raises(SampleError, match="cannot read"):
        LengthSample.read(tmp_path / "missing.jsonl")


# -- planning -------------------------------------------------------------------------------

def mixed_trace(n: int = 5000, seed: int = 1) -> list[tuple[int, int]]:
    """Chat-like traffic: mostly short prompts (log-normal, median ~200 tokens), a third long
    (RAG, documents: uniform up to 2,000); each generates 1..300 tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = (rng.randint(50, 2000) if rng.random() < 0.3
             else min(2000, max(1, int(rng.lognormvariate(5.3, 0.5)))))
        out.append((p, min(2048, p + rng.randint(1, 300))))
    return out


def write_jsonl(path: Path, trace: list[tuple[int, int]]) -> Path:
    path.write_text("".join(json.dumps({"prompt_tokens": p, "total_tokens": c}) + "\n"
                            for p, c in trace))
    return path


def test_planning_from_a_file_pads_no_more_than_the_default_lists(tmp_path: Path):
    trace = mixed_trace()
    src = buckets_cli.load_source(str(write_jsonl(tmp_path / "t.jsonl", trace)))
    report = buckets_cli.plan(src, max_model_len=2048)
    ce, tg = report["context_encoding"], report["token_generation"]
    assert ce["baseline"] == "default" and ce["baseline_buckets"] == generate_dense_buckets(
        128, 2048)
    assert tg["baseline_buckets"] == generate_buckets(128, 2048)
    for phase, lengths in ((ce, [p for p, _ in trace]), (tg, [c for _, c in trace])):
        assert [p["k"] for p in phase["plans"]] == list(range(len(phase["baseline_buckets"]) - 2,
                                                              len(phase["baseline_buckets"]) + 3))
        same = next(p for p in phase["plans"] if p["k"] == len(phase["baseline_buckets"]))
        assert same["padding_ratio"] <= phase["baseline_padding_ratio"]
        assert same["padding_ratio"] == round(padding_ratio(lengths, same["buckets"]), 4)
        assert same["buckets"][-1] == 2048 and len(same["buckets"]) <= same["k"]
        ratios = [p["padding_ratio"] for p in phase["plans"]]
        assert ratios == sorted(ratios, reverse=True)  # more graphs never pad more


def test_goal_shape_on_the_benchmarks_replayed_trace():
    """benchmarks/bucketing.py's trace (uniform 50..2,000, 10,000 prompts). With the default
    list's 13 graphs the planner pads 1.078x (the default 1.122x); 1.05 is out of reach for
    any 13 lengths on a uniform trace (it takes 22 graphs), so the bound checked is 1.08."""
    rng = random.Random(0)
    trace = [rng.randint(50, 2000) for _ in range(10_000)]
    default = generate_dense_buckets(128, 2048)
    planned = plan_buckets(trace, len(default), 2048)
    assert padding_ratio(trace, planned) <= min(1.08, padding_ratio(trace, default))
    assert padding_ratio(trace, plan_buckets(trace, 22, 2048)) <= 1.05


def test_lengths_past_the_largest_bucket_are_reported_not_fitting():
    src = buckets_cli.Source(LengthSample.from_json({"prompt_lengths": [100, 200, 900],
                                                     "context_lengths": [150, 300, 1000]}),
                             [128, 256, 512], [256, 1024], 1024)
    report = buckets_cli.plan(src, ks=[2])
    assert report["context_encoding"]["not_fitting"] == 1
    assert report["context_encoding"]["plans"][0]["buckets"][-1] == 512
    assert report["token_generation"]["not_fitting"] == 0
    text = buckets_cli.format_report(report, "x")
    assert "1 of 3 lengths are above 512 and fit no bucket" in text


def test_cli_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    f = write_jsonl(tmp_path / "t.jsonl", mixed_trace(2000))
    assert main(["buckets", "plan", "--from", str(f), "--max-model-len", "2048",
                 "--k", "4", "--k", "6"]) == 0
    text = capsys.readouterr().out
    assert "default (13): 128,160,192" in text and "k=4: padding" in text
    assert "k=5:" not in text
    line = next(x.strip() for x in text.splitlines()
                if x.strip().startswith("--context-encoding-buckets"))
    env = next(x.strip() for x in text.splitlines()
               if x.strip().startswith("RAGSERVE_CONTEXT_ENCODING_BUCKETS="))
    assert line.split()[1] == env.split("=")[1] and line.split()[1].endswith(",2048")
    assert "RAGSERVE_TOKEN_GENERATION_BUCKETS=" in text
    # a JSONL file names no device: the cost column is the padded-token proxy, said so
    assert "cost model: padded tokens (prefill cost of this device unknown)" in text
    assert "The plans minimise padding, not this cost" in text
    k4 = next(x for x in text.splitlines() if x.strip().startswith("k=4: padding"))
    assert k4.endswith("x of default") and ", prefill cost " in k4

    assert main(["buckets", "plan", "--from", str(f), "--max-model-len", "2048", "--json",
                 "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sample_size"] == {"prompt": 2000, "context": 2000}
    assert report["device"] == "cpu" and report["exact_shape_prefill"] is None
    cost = report["cost_model"]
    assert (cost["c"], cost["a"], cost["b"], cost["source"]) == (
        CPU_COST.c, CPU_COST.a, CPU_COST.b, CPU_COST.source) and cost["unit"] == "s"
    ce = report["context_encoding"]
    assert [p["k"] for p in ce["plans"]] == [11, 12, 13, 14, 15]
    prompts = [n for n in LengthSample.read(f).prompt_lengths if n <= 2048]
    for p in ce["plans"]:
        assert p["prefill_cost_vs_baseline"] == round(
            relative_cost(CPU_COST, prompts, p["buckets"], ce["baseline_buckets"]), 4)
    assert all("prefill_cost_vs_baseline" not in p for p in report["token_generation"]["plans"])
    assert report["token_generation"]["plans"][0]["env"].startswith(buckets_cli.TG_ENV + "=")

    assert main(["buckets", "plan", "--from", str(f), "--max-model-len", "2048", "--json",
                 "--device", "cpu", "--cost-model", "tokens"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cost_model"]["unit"] == "token"
    for p in report["context_encoding"]["plans"]:  # padded tokens: the ratio of the paddings
        assert p["prefill_cost_vs_baseline"] == pytest.approx(p["padding_vs_baseline"],
                                                              abs=2e-4)


def test_cli_env_names_and_devices_match_the_servers():
    from server.config import DEVICES, env_name

    assert env_name(buckets_cli.CE_FLAG) == buckets_cli.CE_ENV
    assert env_name(buckets_cli.TG_FLAG) == buckets_cli.TG_ENV
    assert buckets_cli.DEVICES == DEVICES


# -- the prefill cost model -----------------------------------------------------------------

def test_fit_cost_recovers_known_coefficients():
    c, a, b = 0.135, 0.21e-3, 0.47e-6
    lengths = generate_dense_buckets(128, 8192)
    fitted = fit_cost([(n, c + a * n + b * n * n) for n in lengths])
    assert fitted == pytest.approx((c, a, b), rel=1e-6)
    assert fit_cost([(16, 2.0), (32, 3.0), (64, 5.0), (64, 5.0)]) == pytest.approx(
        (1.0, 1 / 16, 0.0), abs=1e-9)  # a straight line: no quadratic term
    with pytest.raises(ValueError, match="3 distinct lengths, got 2"):
        fit_cost([(128, 1.0), (256, 2.0), (256, 2.1)])


def test_relative_cost_of_the_current_list_is_1_and_finer_lists_cost_less():
    rng = random.Random(3)
    uniform = [rng.randint(50, 2000) for _ in range(5000)]
    current = generate_buckets(128, 2048)
    finer = generate_dense_buckets(128, 2048)
    for cost in (CPU_COST, TOKENS):
        assert relative_cost(cost, uniform, current, current) == 1.0
        assert relative_cost(cost, uniform, finer, current) < 0.9
        assert relative_cost(cost, uniform, [2048], current) > 1.0
    assert relative_cost(TOKENS, uniform, finer, current) == pytest.approx(
        padding_ratio(uniform, finer) / padding_ratio(uniform, current))
    # the quadratic term makes padding in a long bucket dearer than its token count
    assert relative_cost(CPU_COST, uniform, [2048], current) > relative_cost(
        PrefillCost(CPU_COST.c, CPU_COST.a, 0.0, "linear"), uniform, [2048], current)


def test_cost_counts_lengths_like_padding_ratio():
    """A length equal to a bucket runs in it; one past the largest bucket raises (the server
    rejects such prompts), as bucketing.padding_ratio does."""
    assert mean_cost(TOKENS, [128], [128, 256]) == 128
    assert mean_cost(TOKENS, [129], [128, 256]) == 256
    with pytest.raises(ValueError, match=r"length 300 exceeds the largest bucket \(256\)"):
        mean_cost(TOKENS, [100, 300], [128, 256])
    with pytest.raises(ValueError, match="no lengths"):
        mean_cost(TOKENS, [], [128])


def test_default_costs_per_device():
    assert default_cost("cpu") is CPU_COST and CPU_COST.positive_up_to(32768)
    for device in ("neuron", "cuda", None):
        cost = default_cost(device)
        assert cost.is_tokens and "unknown" in cost.source


def test_prefill_times_keep_one_entry_per_bucket():
    t = PrefillTimes()
    for i in range(1000):
        t.observe((16, 32, 64)[i % 3], (10, 32, 64)[i % 3], 0.001 * (i % 3 + 1))
    assert len(t) == 3 and t.steps == 1000
    assert t.to_json() == {"16": {"count": 334, "mean_tokens": 10.0, "mean_s": 0.001},
                           "32": {"count": 333, "mean_tokens": 32.0, "mean_s": 0.002},
                           "64": {"count": 333, "mean_tokens": 64.0, "mean_s": 0.003}}
    assert [(round(n, 6), round(s, 6)) for n, s in t.points()] == [
        (10, 0.001), (32, 0.002), (64, 0.003)]
    assert PrefillTimes.from_json(t.to_json()).to_json() == t.to_json()
    for bad, why in (([], "an object"), ({"x": {}}, "bucket length"),
                     ({"16": 3}, "expected an object"),
                     ({"16": {"count": 1, "mean_tokens": 16, "mean_s": -1}}, "mean_s")):
        with pytest.raises(ValueError, match=why):
            PrefillTimes.from_json(bad)


def timed_body(times: dict[int, float], device: str = "cpu") -> dict:
    """A GET /v1/buckets body with one-prompt prefill times for static graphs."""
    rng = random.Random(5)
    prompts = [rng.randint(10, 512) for _ in range(500)]
    return {"context_encoding_buckets": [64, 128, 256, 512],
            "token_generation_buckets": [256, 512, 1024], "max_model_len": 1024,
            "prompt_lengths": prompts, "context_lengths": [p + 100 for p in prompts],
            "device": device,
            "prefill_seconds_by_bucket": {str(b): {"count": 4, "mean_tokens": b, "mean_s": s}
                                          for b, s in times.items()}}


def test_a_body_with_prefill_times_is_fitted_and_one_without_falls_back(tmp_path: Path):
    truth = PrefillCost(0.01, 2e-4, 1e-6, "truth")
    body = timed_body({b: truth(b) for b in (64, 128, 256, 512)})
    report = buckets_cli.plan(buckets_cli.source_from_json(body))
    cost = report["cost_model"]
    assert cost["source"].startswith("fitted to this server's prefill steps (16 one-prompt "
                                     "prefills in 4 buckets, 64..512 tokens)")
    assert (cost["c"], cost["a"], cost["b"]) == pytest.approx((truth.c, truth.a, truth.b))
    assert report["exact_shape_prefill"] is False
    prompts = body["prompt_lengths"]
    for p in report["context_encoding"]["plans"]:
        assert p["prefill_cost_vs_baseline"] == round(
            relative_cost(truth, prompts, p["buckets"], [64, 128, 256, 512]), 4)
    saved = tmp_path / "b.json"
    saved.write_text(json.dumps(body))
    assert buckets_cli.plan(buckets_cli.load_source(str(saved)))["cost_model"] == cost

    for times, device, why in (
            ({}, "cpu", None),
            ({64: 0.1, 128: 0.2}, "cpu", "in 2 bucket length(s), 3 are needed"),
            ({64: 0.5, 128: 0.01, 256: 0.5}, "cpu", "is not > 0 up to 512"),
            ({}, "neuron", None)):
        report = buckets_cli.plan(buckets_cli.source_from_json(timed_body(times, device)))
        source = report["cost_model"]["source"]
        assert source.startswith(default_cost(device).source), source
        assert (why is None) == (";" not in source) and (why or "") in source
    neuron = timed_body({b: truth(b) for b in (64, 128, 256)}, "neuron")
    assert buckets_cli.plan(buckets_cli.source_from_json(neuron))["cost_model"][
        "source"].startswith("fitted to this server's prefill steps")
    # lists for another device than the one timed: its times do not apply
    src = buckets_cli.source_from_json(body)
    cost = buckets_cli.choose_cost(src, 512, device="neuron")
    assert cost.is_tokens and "prefill times are from cpu, not neuron" in cost.source
    with pytest.raises(buckets_cli.PlanError, match="count must be"):
        buckets_cli.source_from_json({**body, "prefill_seconds_by_bucket": {"64": {}}})


def test_only_one_prompt_prefill_steps_are_timed():
    """The engine front keeps the time of a prefill of one prompt alone: not decode or mixed
    steps, not batched prefills, not a failed step (which generates nothing)."""
    from server.async_engine import AsyncEngine, StepStats

    front = AsyncEngine(lambda: None)  # never started: only its step bookkeeping runs
    base = dict(phase="prefill", bucket="64", batch_size=1, seconds=0.5, num_prompt_tokens=40,
                num_generation_tokens=1, num_padding_tokens=24, inter_token_latencies=())
    for change in ({}, {"phase": "decode"}, {"phase": "mixed", "num_generation_tokens": 3},
                   {"batch_size": 2, "num_generation_tokens": 2},
                   {"num_generation_tokens": 0}, {"bucket": "128", "seconds": 1.5}):
        front._on_step(StepStats(**{**base, **change}))
    assert front.prefill_times.to_json() == {
        "64": {"count": 1, "mean_tokens": 64.0, "mean_s": 0.5},
        "128": {"count": 1, "mean_tokens": 64.0, "mean_s": 1.5}}


def test_the_engine_process_sends_step_stats_to_the_front():
    """In the engine process, step stats go into the outbox as they are; the front's reader
    records the prefill times and tells its observer."""
    from server.async_engine import StepStats
    from server.engine import EngineConfig
    from server.engine_process import ProcessEngine, _ChildEngine

    class Pipe:
        def __init__(self) -> None:
            self.sent: list = []

        def send(self, items: list) -> None:
            self.sent.append(items)

        def recv(self) -> list:
            if not self.sent:
                raise EOFError
            return self.sent.pop(0)

    class Observer:
        def __init__(self) -> None:
            self.steps: list = []

        def on_step(self, stats: StepStats) -> None:
            self.steps.append(stats)

    pipe = Pipe()
    child = _ChildEngine(EngineConfig(), pipe)  # never started: no model is loaded
    stats = StepStats(phase="prefill", bucket="32", batch_size=1, seconds=0.25,
                      num_prompt_tokens=20, num_generation_tokens=1, num_padding_tokens=0,
                      inter_token_latencies=())
    child._on_step(stats)
    child._flush()
    assert pipe.sent == [[("step", stats)]]
    front = ProcessEngine(EngineConfig(), observer=(observer := Observer()))
    front._stopping = True  # the pipe's end reads as a shutdown
    front._read(pipe)
    assert observer.steps == [stats]
    assert front.prefill_times.to_json() == {"32": {"count": 1, "mean_tokens": 20.0,
                                                    "mean_s": 0.25}}


@pytest.mark.parametrize("content, message", [
    ("", "the sample is empty"),
    ('{"prompt_lengths": [], "context_lengths": []}', "the sample is empty"),
    ("garbage\n", "not valid JSON"),
    ('{"prompt_lengths": [0]}', "integers >= 1"),
])
def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                           message: str):
    f = tmp_path / "bad.json"
    f.write_text(content)
    assert main(["buckets", "plan", "--from", str(f)]) == 2
    assert message in capsys.readouterr().err


def test_cli_errors_for_a_missing_file_and_an_unreachable_url(
        capsys: pytest.CaptureFixture[str], tmp_path: Path):
    assert main(["buckets", "plan", "--from", str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    from serverutil import free_port

    url = f"http://127.0.0.1:{free_port()}"
    assert main(["buckets", "plan", "--from", url]) == 2
    assert f"cannot reach {url}/v1/buckets" in capsys.readouterr().err


# -- end to end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bucket_server(tiny_llama_dir: Path):
    from server.app import build_app
    from server.config import ServerConfig

    config = ServerConfig(model=str(tiny_llama_dir), served_model_name="tiny", api_key=KEY,
                          dtype="float32", max_model_len=256, max_num_seqs=4,
                          context_encoding_buckets=(16, 32, 64, 128),
                          token_generation_buckets=(32, 64, 128, 256),
                          kernels="step=eager", engine_process=False)
    with ThreadServer(build_app(config)) as srv:
        wait_ready(srv.url, AUTH)
        yield srv.url


def test_server_samples_finished_requests_and_plan_reads_it(
        bucket_server: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch):
    r = httpx.get(f"{bucket_server}/v1/buckets", timeout=30)
    assert r.status_code == 401  # behind the API key
    usages = []
    for i, (prompt, max_tokens) in enumerate([("hello", 5), ("tell me about buckets " * 6, 9),
                                              ("a b c d e f g h i j k l", 3)]):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                "ignore_eos": True, "stream": i == 2,
                **({"stream_options": {"include_usage": True}} if i == 2 else {})}
        r = httpx.post(f"{bucket_server}/v1/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200
        if i == 2:
            events = [json.loads(x[6:]) for x in r.text.splitlines()
                      if x.startswith("data: {")]
            usages.append(events[-1]["usage"])
        else:
            usages.append(r.json()["usage"])
    r = httpx.get(f"{bucket_server}/v1/buckets", headers=AUTH, timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["context_encoding_buckets"] == [16, 32, 64, 128]
    assert body["token_generation_buckets"] == [32, 64, 128, 256]
    assert body["max_model_len"] == 256
    assert body["sample_size"] == {"prompt": 3, "context": 3} == body["seen"]
    assert sorted(body["prompt_lengths"]) == sorted(u["prompt_tokens"] for u in usages)
    assert sorted(body["context_lengths"]) == sorted(u["total_tokens"] for u in usages)
    prompts = body["prompt_lengths"]
    assert body["padding_ratio"]["context_encoding"] == round(
        padding_ratio(prompts, [16, 32, 64, 128]), 4)
    assert body["padding_ratio"]["token_generation"] >= 1.0
    # each request ran alone, so each prefill was one prompt's, timed in its bucket; PyTorch
    # eager prefills at the prompt's exact length
    assert body["device"] == "cpu"
    by_bucket: dict[str, list[int]] = {}
    for n in prompts:
        by_bucket.setdefault(str(next(b for b in (16, 32, 64, 128) if n <= b)), []).append(n)
    timed = body["prefill_seconds_by_bucket"]
    assert {b: (t["count"], t["mean_tokens"]) for b, t in timed.items()} == {
        b: (len(ns), round(sum(ns) / len(ns), 1)) for b, ns in by_bucket.items()}
    assert all(t["mean_s"] > 0 for t in timed.values())

    monkeypatch.setenv("RAGSERVE_API_KEY", KEY)
    assert main(["buckets", "plan", "--from", bucket_server, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ce = report["context_encoding"]
    assert ce["baseline"] == "current" and ce["baseline_buckets"] == [16, 32, 64, 128]
    assert ce["align"] == 16 and report["max_model_len"] == 256
    assert report["device"] == "cpu" and report["exact_shape_prefill"] is True
    assert len(timed) < buckets_cli.MIN_FIT_BUCKETS  # too few bucket lengths to fit
    assert report["cost_model"]["source"] == (
        f"{CPU_COST.source}; the server timed one-prompt prefills in {len(timed)} bucket "
        "length(s), 3 are needed for a fit")
    assert all(p["prefill_cost_vs_baseline"] > 0 for p in ce["plans"])
    assert [p["k"] for p in ce["plans"]] == [2, 3, 4, 5, 6]
    assert all(p["buckets"][-1] == 128 for p in ce["plans"])
    assert all(p["buckets"][-1] == 256 for p in report["token_generation"]["plans"])
    same = next(p for p in ce["plans"] if p["k"] == 4)
    assert same["padding_ratio"] <= body["padding_ratio"]["context_encoding"]

    saved = tmp_path / "buckets.json"
    saved.write_text(json.dumps(body))
    assert main(["buckets", "plan", "--from", str(saved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["context_encoding"] == ce

    monkeypatch.delenv("RAGSERVE_API_KEY")
    assert main(["buckets", "plan", "--from", bucket_server]) == 2
    assert "answered 401 (pass --api-key" in capsys.readouterr().err
