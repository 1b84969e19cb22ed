"""Traffic-planned buckets: the length sample (bucketing.sample), GET /v1/buckets, and
``ragserve buckets plan`` (server.buckets_cli)."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import httpx
import pytest
from serverutil import ThreadServer, wait_ready

from bucketing import generate_buckets, generate_dense_buckets, padding_ratio, plan_buckets
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
    assert "RAGSERVE_TOKEN_GENERATION_BUCKETS=" in text and "padding only" in text

    assert main(["buckets", "plan", "--from", str(f), "--max-model-len", "2048", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sample_size"] == {"prompt": 2000, "context": 2000}
    assert report["cost_model"] is None
    assert [p["k"] for p in report["context_encoding"]["plans"]] == [11, 12, 13, 14, 15]
    assert report["token_generation"]["plans"][0]["env"].startswith(buckets_cli.TG_ENV + "=")


def test_cli_env_names_match_the_servers():
    from server.config import env_name

    assert env_name(buckets_cli.CE_FLAG) == buckets_cli.CE_ENV
    assert env_name(buckets_cli.TG_FLAG) == buckets_cli.TG_ENV


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

    monkeypatch.setenv("RAGSERVE_API_KEY", KEY)
    assert main(["buckets", "plan", "--from", bucket_server, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ce = report["context_encoding"]
    assert ce["baseline"] == "current" and ce["baseline_buckets"] == [16, 32, 64, 128]
    assert ce["align"] == 16 and report["max_model_len"] == 256
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
