"""Traffic-planned buckets: the length sample (bucketing.sample), the length histograms on
/metrics and read back from a Prometheus text (bucketing.histogram, planning.length_histograms),
the prefill cost model and the server's prefill times (bucketing.cost), GET /v1/buckets, and
``ragserve buckets plan`` (planning.buckets)."""

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
from bucketing.histogram import BinnedLengths, LengthHistogram, Lengths, length_bounds
from bucketing.sample import LengthSample, SampleError
from planning import buckets as buckets_plan
from planning.length_histograms import CONTEXT, PROMPT, read_exposition
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
    src = buckets_plan.load_source(str(write_jsonl(tmp_path / "t.jsonl", trace)))
    report = buckets_plan.plan(src, max_model_len=2048)
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
    src = buckets_plan.Source(LengthSample.from_json({"prompt_lengths": [100, 200, 900],
                                                     "context_lengths": [150, 300, 1000]}),
                             [128, 256, 512], [256, 1024], 1024)
    report = buckets_plan.plan(src, ks=[2])
    assert report["context_encoding"]["not_fitting"] == 1
    assert report["context_encoding"]["plans"][0]["buckets"][-1] == 512
    assert report["token_generation"]["not_fitting"] == 0
    text = buckets_plan.format_report(report, "x")
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
    assert report["token_generation"]["plans"][0]["env"].startswith(
        "RAGSERVE_TOKEN_GENERATION_BUCKETS=")

    assert main(["buckets", "plan", "--from", str(f), "--max-model-len", "2048", "--json",
                 "--device", "cpu", "--cost-model", "tokens"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cost_model"]["unit"] == "token"
    for p in report["context_encoding"]["plans"]:  # padded tokens: the ratio of the paddings
        assert p["prefill_cost_vs_baseline"] == pytest.approx(p["padding_vs_baseline"],
                                                              abs=2e-4)


def test_cli_env_names_and_devices_match_the_servers():
    """The flags and variables the plan prints, and the devices it takes, are the server's."""
    import argparse

    from bucketing import (
        CONTEXT_ENCODING_ENV,
        CONTEXT_ENCODING_FLAG,
        TOKEN_GENERATION_ENV,
        TOKEN_GENERATION_FLAG,
    )
    from server.config import DEVICES, add_serve_args, env_name

    assert env_name(CONTEXT_ENCODING_FLAG) == CONTEXT_ENCODING_ENV
    assert env_name(TOKEN_GENERATION_FLAG) == TOKEN_GENERATION_ENV
    p = argparse.ArgumentParser()
    add_serve_args(p)
    flags = {s for a in p._actions for s in a.option_strings}
    assert {CONTEXT_ENCODING_FLAG, TOKEN_GENERATION_FLAG} <= flags
    assert buckets_plan.DEVICES == DEVICES


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
    report = buckets_plan.plan(buckets_plan.source_from_json(body))
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
    assert buckets_plan.plan(buckets_plan.load_source(str(saved)))["cost_model"] == cost

    for times, device, why in (
            ({}, "cpu", None),
            ({64: 0.1, 128: 0.2}, "cpu", "in 2 bucket length(s), 3 are needed"),
            ({64: 0.5, 128: 0.01, 256: 0.5}, "cpu", "is not > 0 up to 512"),
            ({}, "neuron", None)):
        report = buckets_plan.plan(buckets_plan.source_from_json(timed_body(times, device)))
        source = report["cost_model"]["source"]
        assert source.startswith(default_cost(device).source), source
        assert (why is None) == (";" not in source) and (why or "") in source
    neuron = timed_body({b: truth(b) for b in (64, 128, 256)}, "neuron")
    assert buckets_plan.plan(buckets_plan.source_from_json(neuron))["cost_model"][
        "source"].startswith("fitted to this server's prefill steps")
    # lists for another device than the one timed: its times do not apply
    src = buckets_plan.source_from_json(body)
    cost = buckets_plan.choose_cost(src, 512, device="neuron")
    assert cost.is_tokens and "prefill times are from cpu, not neuron" in cost.source
    with pytest.raises(buckets_plan.PlanError, match="count must be"):
        buckets_plan.source_from_json({**body, "prefill_seconds_by_bucket": {"64": {}}})


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


# -- Prometheus histograms ------------------------------------------------------------------

def test_length_bounds_follow_the_documented_rule():
    assert length_bounds(1) == [1]
    assert length_bounds(256) == list(range(32, 257, 32))
    assert length_bounds(300) == [*range(32, 289, 32), 300]  # the last bound is max_model_len
    for max_len, count in ((2048, 64), (4096, 96), (8192, 160), (32768, 256), (131072, 320),
                           (1 << 20, 416)):
        bounds = length_bounds(max_len)
        assert len(bounds) == count and bounds[-1] == max_len
        widths = BinnedLengths(tuple(bounds), (0,) * count).widths()
        for hi, w in zip(bounds, widths):
            lo = hi - w
            step = 32 if lo < 2048 else 64 if lo < 8192 else 256 if lo < 32768 else (
                1 << (lo.bit_length() - 1)) // 32
            assert w == step and lo % w == 0, (hi, w)
    assert len(length_bounds(10_000_000)) < 550  # a few hundred even at 10M tokens
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_model_len"):
            length_bounds(bad)


def test_histogram_counts_bins_and_the_exact_sum():
    h = LengthHistogram(length_bounds(256))
    for n in (1, 32, 33, 256, 257, 1000):
        h.observe(n)
    b = h.snapshot()
    assert b.counts == (2, 1, 0, 0, 0, 0, 0, 1) and b.above == 2 and b.total == 1579
    assert b.count == 6 and b.cumulative()[-1] == 6
    assert BinnedLengths.from_cumulative(zip(b.bounds, b.cumulative()), 6, 1579) == b
    with pytest.raises(ValueError, match="not cumulative"):
        BinnedLengths.from_cumulative([(32, 5), (64, 3)], 5)


TWO_REPLICAS = """\
# HELP ragserve_prompt_length_tokens Prompt tokens.
# TYPE ragserve_prompt_length_tokens histogram
ragserve_prompt_length_tokens_bucket{instance="a",le="32.0",model_name="m"} 2.0
ragserve_prompt_length_tokens_bucket{instance="a",le="64.0",model_name="m"} 3.0
ragserve_prompt_length_tokens_bucket{instance="a",le="+Inf",model_name="m"} 3.0
ragserve_prompt_length_tokens_count{instance="a",model_name="m"} 3.0
ragserve_prompt_length_tokens_sum{instance="a",model_name="m"} 90.0
ragserve_prompt_length_tokens_bucket{instance="b",le="32.0",model_name="m"} 0.0
ragserve_prompt_length_tokens_bucket{instance="b",le="64.0",model_name="m"} 4.0
ragserve_prompt_length_tokens_bucket{instance="b",le="+Inf",model_name="m"} 5.0
ragserve_prompt_length_tokens_count{instance="b",model_name="m"} 5.0
ragserve_prompt_length_tokens_sum{instance="b",model_name="m"} 400.0
# TYPE ragserve_decode_context_length_tokens_bucket untyped
ragserve_decode_context_length_tokens_bucket{instance="a",le="64",model_name="m"} 3 1700000000000
ragserve_decode_context_length_tokens_bucket{instance="a",le="+Inf",model_name="m"} 3 1700000000000
ragserve_decode_context_length_tokens_sum{instance="a",model_name="m"} 150 1700000000000
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="m"} 12345.0
"""


def test_exposition_sums_label_sets():
    """Two replicas (the second type line is how Prometheus's /federate writes a series it
    has no type for, with timestamps): their bins are added per upper bound."""
    h = read_exposition(TWO_REPLICAS)
    assert h.prompt == BinnedLengths((32, 64), (2, 5), above=1, total=490.0)
    assert h.context == BinnedLengths((64,), (3,), above=0, total=150.0)
    assert h.summed == 2 and h.model == "m" and h.max_model_len == 64
    # two servers' /metrics concatenated: the same label set twice is two histograms
    one = read_exposition(TWO_REPLICAS.replace('instance="b"', 'instance="a"'))
    assert one.prompt == h.prompt and one.summed == 2


def test_exposition_of_several_models_needs_model(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]):
    text = TWO_REPLICAS + TWO_REPLICAS.replace('model_name="m"', 'model_name="other"')
    f = tmp_path / "metrics.txt"
    f.write_text(text)
    assert main(["buckets", "plan", "--from", str(f)]) == 2
    assert "length histograms of 2 models ('m', 'other'): pick one with --model" in \
        capsys.readouterr().err
    assert main(["buckets", "plan", "--from", str(f), "--model", "x"]) == 2
    assert "no length histograms of model_name='x'" in capsys.readouterr().err
    assert main(["buckets", "plan", "--from", str(f), "--model", "other", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["histograms"]["model_name"] == "other"
    assert report["sample_size"] == {"prompt": 8, "context": 3}
    assert report["context_encoding"]["not_fitting"] == 1  # the +Inf observation
    jsonl = write_jsonl(tmp_path / "t.jsonl", [(5, 9)])
    assert main(["buckets", "plan", "--from", str(jsonl), "--model", "m"]) == 2
    assert "--model picks a model_name in a Prometheus text" in capsys.readouterr().err


def exposition(trace: list[tuple[int, int]], max_model_len: int, name: str = "m") -> str:
    """The server's /metrics text after ``trace`` (prompt, prompt + generated) finished."""
    from server.metrics import Metrics

    m = Metrics(name, max_model_len)
    for p, c in trace:
        m.observe_lengths(p, c)
    return m.render().decode()


def test_metrics_declare_the_histograms_before_the_model_loads():
    from server.metrics import Metrics

    loaded: list[int] = []
    m = Metrics("m", lambda: loaded[0] if loaded else None)
    text = m.render().decode()
    assert f"# TYPE {PROMPT} histogram" in text and f"{PROMPT}_bucket" not in text
    m.observe_lengths(5, 9)  # cannot happen before a load; nothing to count it in
    loaded.append(64)
    m.observe_lengths(5, 40)
    h = read_exposition(m.render().decode())
    assert h.prompt == BinnedLengths((32, 64), (1, 0), 0, 5.0)
    assert h.context == BinnedLengths((32, 64), (0, 1), 0, 40.0)


@pytest.mark.parametrize("multiples", [True, False])
def test_plan_from_histograms_equals_plan_from_lengths(tmp_path: Path, multiples: bool):
    """With bucket lengths that are multiples of the bin width (32 up to 2048: align 64 and
    ragserve's default lists), a histogram gives the plan the raw lengths give; its padding
    divides by the histogram's _sum, so it matches too, whatever the lengths. With lengths that
    are multiples of the bin width every length is its bin's upper bound."""
    trace = mixed_trace(3000, seed=4)
    if multiples:
        trace = [(-(-p // 32) * 32, -(-c // 32) * 32) for p, c in trace]
    raw = buckets_plan.plan(buckets_plan.load_source(str(write_jsonl(tmp_path / "t.jsonl",
                                                                   trace))),
                           max_model_len=2048, cost_model="tokens")
    f = tmp_path / "metrics.txt"
    f.write_text(exposition(trace, 2048))
    binned = buckets_plan.plan(buckets_plan.load_source(str(f)), cost_model="tokens")
    assert binned["max_model_len"] == 2048  # the histogram's last bound
    assert binned["histograms"]["requests"] == {"prompt": 3000, "context": 3000}
    assert binned["histograms"]["real_tokens"]["prompt"] == sum(p for p, _ in trace)
    for key in ("context_encoding", "token_generation"):
        assert binned[key].pop("binned_inexact") == 0
        assert binned[key] == raw[key]
    if not multiples:  # the upper bounds as real tokens would under-count the padding
        prompts = [p for p, _ in trace]
        bounds = [-(-p // 32) * 32 for p in prompts]
        ce = binned["context_encoding"]
        assert ce["baseline_padding_ratio"] == round(padding_ratio(prompts,
                                                                  ce["baseline_buckets"]), 4)
        assert ce["baseline_padding_ratio"] > round(padding_ratio(bounds,
                                                                 ce["baseline_buckets"]), 4)


def test_neuron_plan_reads_a_prometheus_text(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]):
    """``ragserve neuron plan --from`` takes the same sources: from the histograms of the same
    requests, the same lists and notes as from their lengths."""
    from test_neuron_plan import LLAMA3_8B, write_model

    model = write_model(tmp_path, "Llama-3-8B", LLAMA3_8B)
    trace = mixed_trace(1000, seed=6)
    (tmp_path / "metrics.txt").write_text(exposition(trace, 4096))
    base = ["neuron", "plan", "--model", str(model), "--instance", "inf2.8xlarge",
            "--max-model-len", "4096", "--max-num-seqs", "4", "--json", "--from"]
    assert main([*base, str(write_jsonl(tmp_path / "t.jsonl", trace))]) == 0
    from_lengths = json.loads(capsys.readouterr().out)
    assert main([*base, str(tmp_path / "metrics.txt")]) == 0
    assert json.loads(capsys.readouterr().out) == from_lengths
    assert any("prefill buckets planned from 1000 observed lengths" in n
               for n in from_lengths["notes"])


def test_weighted_planner_matches_repeated_lengths():
    rng = random.Random(2)
    values = sorted(rng.sample(range(1, 2049), 80))
    counts = [rng.randint(0, 50) for _ in values]
    repeated = [v for v, c in zip(values, counts) for _ in range(c)]
    for k in (1, 3, 8):
        assert plan_buckets(values, k, 2048, counts=counts) == plan_buckets(repeated, k, 2048)
    buckets = plan_buckets(repeated, 5, 2048)
    assert padding_ratio(values, buckets, counts) == padding_ratio(repeated, buckets)
    assert mean_cost(CPU_COST, values, buckets, counts) == pytest.approx(
        mean_cost(CPU_COST, repeated, buckets))
    assert relative_cost(TOKENS, values, buckets, [2048], counts) == pytest.approx(
        relative_cost(TOKENS, repeated, buckets, [2048]))
    with pytest.raises(ValueError, match="one integer >= 0 per length"):
        plan_buckets(values, 2, 2048, counts=counts[:-1])


def test_bins_split_by_the_alignment_are_reported(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]):
    """Past 2,048 the bins are 64 wide, past 8,192 256 wide: with --align 32 their lengths
    count at the bin's upper bound, and the report says how many."""
    trace = [(100, 2100), (3000, 3100), (9000, 9100)]
    f = tmp_path / "metrics.txt"
    f.write_text(exposition(trace, 16384))
    assert main(["buckets", "plan", "--from", str(f), "--align", "32", "--k", "3",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["context_encoding"]["binned_inexact"] == 2
    assert report["token_generation"]["binned_inexact"] == 3
    assert main(["buckets", "plan", "--from", str(f), "--align", "32", "--k", "3"]) == 0
    text = capsys.readouterr().out
    assert "bins 32 tokens wide up to 2048, 64 up to 8192, 256 up to 16384" in text
    assert "2 of 3 lengths lie in bins that a multiple of 32 or a default bucket splits" in text
    assert "From Prometheus histograms of model_name m (1 histogram): 3 requests" in text


def test_lengths_within_a_shorter_limit_share_the_sum():
    binned = Lengths.from_bins(BinnedLengths((32, 64, 96), (1, 1, 2), 1, 300))
    fit = binned.within(64)
    assert (fit.values, fit.counts, len(binned) - len(fit)) == ((32, 64), (1, 1), 3)
    assert 1 + 33 <= fit.real <= 32 + 64  # within what the two bins allow
    assert binned.within(96).real == pytest.approx(300 * 288 / (288 + 97))


@pytest.mark.parametrize("content, message", [
    ("# HELP x_total a counter\n# TYPE x_total counter\nx_total 3\n",
     f"no {PROMPT} or {CONTEXT} histogram in the text"),
    (f'{PROMPT}_bucket{{le="32.0"}} 1\n{PROMPT}_bucket{{le="64.0"}} 0\n',
     "not cumulative"),
    (f'{PROMPT}_bucket{{le="0.5"}} 1\n', "not a length bound"),
    (f'# HELP x y\n{PROMPT}_bucket{{le="32.0"}} many\n', "not a Prometheus text exposition"),
    (f'{PROMPT}_bucket{{le="32.0"}} 0\n{PROMPT}_bucket{{le="+Inf"}} 0\n',
     "the sample is empty"),
])
def test_bad_expositions_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                content: str, message: str):
    f = tmp_path / "metrics.txt"
    f.write_text(content)
    assert main(["buckets", "plan", "--from", str(f)]) == 2
    assert message in capsys.readouterr().err


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
    assert len(timed) < buckets_plan.MIN_FIT_BUCKETS  # too few bucket lengths to fit
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


def test_plan_from_the_servers_metrics_matches_its_sample(
        bucket_server: str, capsys: pytest.CaptureFixture[str], tmp_path: Path):
    """The /metrics histograms count the same finished requests as the /v1/buckets sample:
    planned with bucket lengths that are multiples of the bin width (32), both give the same
    plans and padding."""
    for prompt, max_tokens in (("one two three", 4), ("histograms " * 20, 7)):
        r = httpx.post(f"{bucket_server}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                             "ignore_eos": True})
        assert r.status_code == 200
    body = httpx.get(f"{bucket_server}/v1/buckets", headers=AUTH, timeout=30).json()
    text = httpx.get(f"{bucket_server}/metrics", headers=AUTH, timeout=30).text
    h = read_exposition(text)
    assert h.model == "tiny" and h.max_model_len == 256 == body["max_model_len"]
    assert (h.prompt.count, h.context.count) == (body["seen"]["prompt"],
                                                 body["seen"]["context"])
    assert h.prompt.total == sum(body["prompt_lengths"])
    assert h.context.total == sum(body["context_lengths"])

    args = ["--align", "32", "--device", "cpu", "--json"]
    assert main(["buckets", "plan", "--from", f"{bucket_server}/metrics", "--api-key", KEY,
                 *args]) == 0
    from_metrics = json.loads(capsys.readouterr().out)
    saved = tmp_path / "metrics.txt"
    saved.write_text(text)
    assert main(["buckets", "plan", "--from", str(saved), *args]) == 0
    assert {k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "source"} == {
        k: v for k, v in from_metrics.items() if k != "source"}
    # the sample, without the server's lists (a Prometheus text has none)
    sample = buckets_plan.Source(LengthSample.from_json(body), max_model_len=256)
    from_sample = buckets_plan.plan(sample, align=32, device="cpu")
    for key in ("context_encoding", "token_generation"):
        assert from_metrics[key].pop("binned_inexact") == 0
        assert from_metrics[key] == from_sample[key]
    assert from_metrics["sample_size"] == from_sample["sample_size"]

    assert main(["buckets", "plan", "--from", f"{bucket_server}/metrics"]) == 2
    assert "/metrics answered 401 (pass --api-key" in capsys.readouterr().err


# -- the Prometheus HTTP API ----------------------------------------------------------------

class FakePrometheus:
    """``GET /api/v1/query`` on 127.0.0.1, answered from ``answers`` (query -> JSON body,
    status 200; ``(status, body)`` for another status), else an empty vector; ``queries``
    records what was asked."""

    def __init__(self, answers: dict[str, object]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlsplit

        fake = self
        self.answers, self.queries, self.auth = answers, [], []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                q = parse_qs(parts.query).get("query", [""])[0]
                fake.queries.append(q)
                fake.auth.append(self.headers.get("Authorization"))
                answer = fake.answers.get(q, {"status": "success", "data": {
                    "resultType": "vector", "result": []}})
                status, body = answer if isinstance(answer, tuple) else (200, answer)
                if parts.path != "/api/v1/query":
                    status, body = 404, {"status": "error", "error": "not found"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"prometheus+http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakePrometheus:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def vector(*series: tuple[dict[str, str], float]) -> dict:
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": m, "value": [1700000000.0, repr(float(v))]} for m, v in series]}}


def answers_for(text: str, window: str, model: str | None, jitter: bool = False) -> dict:
    """What Prometheus answers to the queries for ``window`` when the histograms of ``text``
    (one model, "m") are its increase. With ``jitter`` the counts are extrapolated: +0.3 on
    each, and an empty bin's cumulative count 0.2 below the one before it; the sum as the
    count."""
    from planning.prometheus import queries

    h = read_exposition(text)
    labels = {} if model is not None else {"model_name": "m"}
    out: dict[str, object] = {}
    for name, b in ((PROMPT, h.prompt), (CONTEXT, h.context)):
        q = queries(window, model)[name]
        cum = [float(n) for n in b.cumulative()]
        if jitter:
            cum = [n + 0.3 for n in cum]
            cum = [n - 0.5 if i and b.cumulative()[i] == b.cumulative()[i - 1] else n
                   for i, n in enumerate(cum)]
        les = [f"{bound}.0" for bound in b.bounds] + ["+Inf"]
        out[q["bucket"]] = vector(*(({**labels, "le": le}, n) for le, n in zip(les, cum)))
        # the sum, extrapolated as its count is (Prometheus scales a histogram's series, which
        # share their sample times, alike)
        out[q["sum"]] = vector((labels, b.total * cum[-1] / b.cumulative()[-1]))
        out[q["count"]] = vector((labels, cum[-1]))
    return out


@pytest.mark.parametrize("model, jitter", [("m", False), (None, True)])
def test_plan_from_prometheus_equals_plan_from_the_text(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str | None, jitter: bool):
    """The increase over a window, from the HTTP API, plans as the text of the same counts
    does; extrapolated (non-integer, briefly decreasing) counts are rounded and reported."""
    trace = mixed_trace(2000, seed=8)
    text = exposition(trace, 2048)
    f = tmp_path / "metrics.txt"
    f.write_text(text)
    assert main(["buckets", "plan", "--from", str(f), "--json"]) == 0
    from_text = json.loads(capsys.readouterr().out)
    with FakePrometheus(answers_for(text, "3d", model, jitter)) as prom:
        args = ["buckets", "plan", "--from", prom.url, "--window", "3d",
                "--prometheus-token", "prom-token", "--api-key", KEY]
        args += ["--model", model] if model else []
        assert main([*args, "--json"]) == 0
        from_prom = json.loads(capsys.readouterr().out)
        assert main(args) == 0
        report_text = capsys.readouterr().out
    assert len(prom.queries) == 12 and all("[3d]" in q for q in prom.queries)
    assert all(('model_name="m"' in q) == (model is not None) for q in prom.queries)
    assert all(("by (le, model_name)" in q) for q in prom.queries[::3]) == (model is None)
    assert set(prom.auth) == {"Bearer prom-token"}  # never ragserve's key
    info = from_prom.pop("prometheus")
    assert info["url"] == prom.url.removeprefix("prometheus+") and info["window"] == "3d"
    assert info["queries"] == prom.queries[:6]
    assert (info["rounded"] > 0, info["raised"] > 0) == (jitter, jitter)
    assert from_text.pop("prometheus") is None
    for report in (from_text, from_prom):
        report.pop("source")
    assert from_prom == from_text
    assert f"Sample from Prometheus {info['url']} (increase over the last 3d): 2000" in \
        report_text
    assert (f"increase() extrapolates: {info['rounded']} of {info['cumulative_counts']} "
            "cumulative bucket counts were not whole") in report_text


def test_neuron_plan_reads_prometheus(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from test_neuron_plan import LLAMA3_8B, write_model

    model = write_model(tmp_path, "Llama-3-8B", LLAMA3_8B)
    trace = mixed_trace(1000, seed=6)
    (tmp_path / "metrics.txt").write_text(text := exposition(trace, 4096))
    base = ["neuron", "plan", "--model", str(model), "--instance", "inf2.8xlarge",
            "--max-model-len", "4096", "--max-num-seqs", "4", "--json", "--from"]
    assert main([*base, str(tmp_path / "metrics.txt")]) == 0
    from_text = json.loads(capsys.readouterr().out)
    from planning.prometheus import DEFAULT_WINDOW

    with FakePrometheus(answers_for(text, DEFAULT_WINDOW, None)) as prom:
        assert main([*base, prom.url]) == 0
    assert json.loads(capsys.readouterr().out) == from_text


def test_prometheus_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from serverutil import free_port

    from planning.prometheus import queries

    text = exposition(mixed_trace(50, seed=3), 256)
    good = answers_for(text, "7d", "m")
    bucket = queries("7d", "m")[PROMPT]["bucket"]
    err = {"status": "error", "errorType": "bad_data",
           "error": "invalid parameter \"query\": 1:2: parse error"}
    for answers, message in (
            ({**good, bucket: (400, err)}, f"Prometheus answered bad_data to {bucket}: "
                                           "invalid parameter"),
            ({**good, bucket: err}, "invalid parameter \"query\""),
            ({k: v for k, v in good.items() if k != bucket},
             f"no series for {bucket} (no such histogram in the window"),
            ({**good, bucket: (401, "Unauthorized")}, "answered 401 to sum by (le) "),
    ):
        with FakePrometheus(answers) as prom:
            assert main(["buckets", "plan", "--from", prom.url, "--model", "m"]) == 2
        assert message in capsys.readouterr().err
    with FakePrometheus(good) as prom:
        for window in ("7 d", "1w2d", "0h", "d", "7D"):
            assert main(["buckets", "plan", "--from", prom.url, "--window", window]) == 2
            assert f"--window {window!r} is not a duration like 7d" in capsys.readouterr().err
        assert prom.queries == []
    port = free_port()
    assert main(["buckets", "plan", "--from", f"prometheus+http://127.0.0.1:{port}"]) == 2
    assert f"cannot reach Prometheus at http://127.0.0.1:{port}" in capsys.readouterr().err
    f = tmp_path / "metrics.txt"
    f.write_text(text)
    assert main(["buckets", "plan", "--from", str(f), "--window", "7d"]) == 2
    assert "--window is the range of a Prometheus server's query" in capsys.readouterr().err
