"""Neuron sizing: parameter counts, per-core HBM estimates, validation errors, plans and the
`ragserve neuron plan` command. Pure arithmetic on config.json files: no weights, no device."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_layering import non_stdlib_imports

from runtime.neuron_plan import (
    INSTANCES,
    GiB,
    ModelShape,
    NeuronConfigError,
    estimate,
    format_plan,
    heads_ok,
    qkv_heads,
    recommend,
    validate,
)
from server.cli import main

ROOT = Path(__file__).resolve().parent.parent

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 8, "num_hidden_layers": 32, "intermediate_size": 14336,
    "vocab_size": 128256, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "num_attention_heads": 64,
              "num_hidden_layers": 80, "intermediate_size": 28672}
TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256,
        "max_position_embeddings": 512, "tie_word_embeddings": True}


def shape(config: dict, name: str) -> ModelShape:
    return ModelShape.from_config(config, name=name)


@pytest.fixture
def s8() -> ModelShape:
    return shape(LLAMA3_8B, "Llama-3-8B")


@pytest.fixture
def s70() -> ModelShape:
    return shape(LLAMA3_70B, "Llama-3-70B")


def write_model(tmp_path: Path, name: str, config: dict) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


# --- shapes and parameter counts ---------------------------------------------------------------

def test_parameter_counts(s8: ModelShape, s70: ModelShape):
    assert s8.num_parameters == 8_030_261_248
    assert s70.num_parameters == 70_553_706_496
    assert s8.num_parameters == pytest.approx(8.03e9, rel=0.01)
    assert s70.num_parameters == pytest.approx(70.55e9, rel=0.01)


def test_tiny_shape_from_config():
    s = shape(TINY, "tiny")
    assert (s.head_dim, s.num_key_value_heads, s.tie_word_embeddings) == (16, 2, True)
    # embed 256*64 (tied: counted once) + 2 layers * (q,o 2*64*64 + k,v 2*64*32 + mlp 3*64*128
    # + norms 2*64) + final norm 64
    assert s.num_parameters == 256 * 64 + 2 * (8192 + 4096 + 24576 + 128) + 64


def test_from_config_defaults_and_errors():
    no_kv = {k: v for k, v in TINY.items() if k != "num_key_value_heads"}
    assert ModelShape.from_config(no_kv).num_key_value_heads == 4  # MHA
    assert ModelShape.from_config({**TINY, "num_key_value_heads": None}).num_key_value_heads == 4
    assert ModelShape.from_config({**TINY, "head_dim": 32}).head_dim == 32
    assert ModelShape.from_config({**TINY, "_name_or_path": "org/tiny"}).name == "org/tiny"
    with pytest.raises(NeuronConfigError, match=r"config\.json has no 'hidden_size'"):
        ModelShape.from_config({k: v for k, v in TINY.items() if k != "hidden_size"})
    with pytest.raises(NeuronConfigError, match="vocab_size must be an integer"):
        ModelShape.from_config({**TINY, "vocab_size": "256"})
    with pytest.raises(NeuronConfigError, match="num_attention_heads 4 is not a multiple"):
        ModelShape.from_config({**TINY, "num_key_value_heads": 3})


def test_instances_match_aws_tables():
    cores = {name: i.neuron_cores for name, i in INSTANCES.items()}
    assert cores == {"inf2.xlarge": 2, "inf2.8xlarge": 2, "inf2.24xlarge": 12,
                     "inf2.48xlarge": 24, "trn1.2xlarge": 2, "trn1.32xlarge": 32,
                     "trn1n.32xlarge": 32}
    assert {i.hbm_per_core for i in INSTANCES.values()} == {16 * GiB}
    assert INSTANCES["inf2.24xlarge"].tp_degrees == (1, 2, 4, 8)
    assert INSTANCES["inf2.48xlarge"].tp_degrees == (1, 2, 4, 8, 24)
    assert INSTANCES["trn1.32xlarge"].tp_degrees == (1, 2, 8, 16, 32)


# --- heads, padding and replication (transformers-neuronx get_qkv_padding) ---------------------

def test_qkv_heads_follow_transformers_neuronx(s8: ModelShape, s70: ModelShape):
    assert qkv_heads(s8, 2) == (32, 8)  # KV sharded over heads: 4 per core
    assert qkv_heads(s8, 32) == (32, 32)  # 8 KV heads replicated to 1 per core
    assert qkv_heads(s70, 24) == (72, 24)  # Q padded 64 -> 72, KV replicated 3x
    assert qkv_heads(s70, 16) == (64, 16)
    mha = shape({**TINY, "num_key_value_heads": 4}, "mha")
    assert qkv_heads(mha, 2) == (4, 4)


def test_heads_ok(s8: ModelShape, s70: ModelShape):
    assert heads_ok(s70, 24) and heads_ok(s8, 8) and heads_ok(s8, 24)
    mha6 = shape({**TINY, "num_attention_heads": 6, "num_key_value_heads": 6, "hidden_size": 96},
                 "mha6")
    assert [heads_ok(mha6, t) for t in (1, 2, 3, 4, 8)] == [True, True, True, False, False]


# --- estimates ---------------------------------------------------------------------------------

def test_estimate_llama3_8b_tp2(s8: ModelShape):
    e = estimate(s8, tp_degree=2, batch_size=1, max_model_len=8192, dtype="bfloat16")
    # per core: q,o 2*4096*16*128, k,v 2*4096*4*128, mlp 3*4096*7168, norms 2*4096 per layer;
    # final norm; lm_head and embedding 4096 * 128256/2 each
    layer = 2 * 4096 * 16 * 128 + 2 * 4096 * 4 * 128 + 3 * 4096 * 7168 + 2 * 4096
    assert e.weights == 2 * (32 * layer + 4096 + 2 * 4096 * 64128)
    assert e.kv_cache == 2 * 32 * 1 * 8192 * 4 * 128 * 2 == 512 * 2**20
    assert e.overhead == int(0.10 * 16 * GiB)
    assert e.total == e.weights + e.kv_cache + e.overhead and e.fits
    assert e.free == 16 * GiB - e.total
    bigger = estimate(s8, tp_degree=2, batch_size=4, max_model_len=4096)
    assert bigger.kv_cache == 2 * e.kv_cache and bigger.weights == e.weights
    fp32 = estimate(s8, tp_degree=2, batch_size=1, max_model_len=8192, dtype="float32")
    assert (fp32.weights, fp32.kv_cache) == (2 * e.weights, 2 * e.kv_cache)


def test_estimate_llama3_70b_tp24_replicates_kv(s70: ModelShape):
    e = estimate(s70, tp_degree=24, batch_size=16, max_model_len=8192)
    assert (e.q_heads, e.kv_heads_per_core) == (72, 1)
    assert e.kv_cache == 2 * 80 * 16 * 8192 * 1 * 128 * 2
    # padded and replicated heads cost more than a plain 1/24 of the checkpoint
    assert e.weights > 2 * s70.num_parameters / 24
    assert e.weights / GiB == pytest.approx(5.79, abs=0.01)


def test_estimate_rejects_bad_numbers(s8: ModelShape):
    with pytest.raises(NeuronConfigError, match="--max-num-seqs must be >= 1, got 0"):
        estimate(s8, tp_degree=2, batch_size=0, max_model_len=8192)
    with pytest.raises(NeuronConfigError, match=r"--dtype 'int4' is not supported.*bfloat16"):
        estimate(s8, tp_degree=2, batch_size=1, max_model_len=8192, dtype="int4")


# --- validation: every error names the number and the fix -------------------------------------

def test_validate_returns_the_estimate(s8: ModelShape):
    e = validate(s8, tp_degree=2, batch_size=8, max_model_len=8192,
                 context_encoding_buckets=[128, 8192], token_generation_buckets=[8192],
                 instance="inf2.xlarge")
    assert e == estimate(s8, tp_degree=2, batch_size=8, max_model_len=8192)


def test_validate_tp_more_than_the_instance_has(s8: ModelShape):
    with pytest.raises(NeuronConfigError) as e:
        validate(s8, tp_degree=8, batch_size=1, max_model_len=2048, instance="inf2.xlarge")
    assert str(e.value) == ("--tensor-parallel-size 8 exceeds the 2 NeuronCores of inf2.xlarge: "
                            "use inf2.24xlarge, or one of 1, 2")


def test_validate_tp_the_runtime_does_not_support(s8: ModelShape):
    with pytest.raises(NeuronConfigError, match=r"--tensor-parallel-size 12 is not supported by "
                       r"the Neuron runtime on inf2\.24xlarge: use one of 1, 2, 4, 8$"):
        validate(s8, tp_degree=12, batch_size=1, max_model_len=2048, instance="inf2.24xlarge")
    with pytest.raises(NeuronConfigError, match=r"size 3 .*use one of 1, 2, 4, 8, 16, 24, 32$"):
        validate(s8, tp_degree=3, batch_size=1, max_model_len=2048)


def test_validate_heads_not_divisible():
    mha6 = shape({**TINY, "num_attention_heads": 6, "num_key_value_heads": 6, "hidden_size": 96},
                 "mha6")
    with pytest.raises(NeuronConfigError) as e:
        validate(mha6, tp_degree=8, batch_size=1, max_model_len=512, instance="inf2.48xlarge")
    assert str(e.value) == ("num_attention_heads 6 (num_key_value_heads 6) of mha6 is not "
                            "divisible by --tensor-parallel-size 8: use one of 1, 2")


def test_validate_70b_needs_24_cores(s70: ModelShape):
    with pytest.raises(NeuronConfigError) as e:
        validate(s70, tp_degree=8, batch_size=1, max_model_len=4096, instance="inf2.48xlarge")
    msg = str(e.value)
    assert msg.startswith("Llama-3-70B bfloat16 needs ~18.2 GiB per NeuronCore at "
                          "--tensor-parallel-size 8 on inf2.48xlarge")
    assert "Llama-3-70B bfloat16 needs >= 24 NeuronCores: use inf2.48xlarge with " \
           "--tensor-parallel-size 24" in msg
    assert "or lower --max-num-seqs" not in msg  # not even one sequence fits at tp 8


def test_validate_batch_too_large_names_the_batch_that_fits(s8: ModelShape):
    with pytest.raises(NeuronConfigError, match=r"KV cache 16\.0 GiB for 32 x 8192 tokens.*"
                       r"or lower --max-num-seqs to 13$"):
        validate(s8, tp_degree=2, batch_size=32, max_model_len=8192, instance="inf2.xlarge")


def test_validate_buckets_and_lengths(s8: ModelShape):
    with pytest.raises(NeuronConfigError, match=r"--token-generation-buckets: the largest bucket "
                       r"8192 exceeds --max-model-len 4096: drop it or raise --max-model-len "
                       r"to 8192"):
        validate(s8, tp_degree=2, batch_size=1, max_model_len=4096,
                 context_encoding_buckets=[128, 4096], token_generation_buckets=[4096, 8192])
    with pytest.raises(NeuronConfigError, match=r"--context-encoding-buckets: the largest bucket "
                       r"5000 exceeds"):
        validate(s8, tp_degree=2, batch_size=1, max_model_len=4096,
                 context_encoding_buckets=[5000])
    with pytest.raises(NeuronConfigError, match=r"--max-model-len 16384 exceeds "
                       r"max_position_embeddings 8192 of Llama-3-8B: use --max-model-len 8192"):
        validate(s8, tp_degree=2, batch_size=1, max_model_len=16384)


def test_validate_unknown_instance(s8: ModelShape):
    with pytest.raises(NeuronConfigError, match=r"unknown instance 'inf3\.xlarge': use one of "
                       r"inf2\.xlarge, inf2\.8xlarge"):
        validate(s8, tp_degree=2, batch_size=1, max_model_len=2048, instance="inf3.xlarge")


# --- recommendations ---------------------------------------------------------------------------

@pytest.mark.parametrize("instance", ["inf2.xlarge", "inf2.8xlarge"])
def test_recommend_8b_on_one_inferentia2_chip(s8: ModelShape, instance: str):
    p = recommend(s8, instance)
    assert (p.tp_degree, p.batch_size, p.max_model_len) == (2, 8, 8192)
    assert p.context_encoding_buckets == (128, 256, 512, 1024, 2048, 4096, 8192)
    assert p.token_generation_buckets == p.context_encoding_buckets
    assert p.estimate.fits and p.estimate.batch_size == 8


def test_recommend_8b_shorter_context_allows_bigger_batch(s8: ModelShape):
    p = recommend(s8, "inf2.8xlarge", max_model_len=2048)
    assert (p.tp_degree, p.batch_size) == (2, 32)
    assert p.token_generation_buckets == (128, 256, 512, 1024, 2048)


def test_recommend_given_batch_takes_more_cores(s8: ModelShape):
    p = recommend(s8, "inf2.48xlarge", batch_size=32)
    assert (p.tp_degree, p.batch_size) == (4, 32)
    assert any("uses 4 of the 24 NeuronCores" in n for n in p.notes)


def test_recommend_70b_on_inf2_48xlarge(s70: ModelShape):
    p = recommend(s70, "inf2.48xlarge")
    assert (p.tp_degree, p.batch_size, p.max_model_len) == (24, 16, 8192)
    assert any("pads the 64 attention heads to 72" in n for n in p.notes)


def test_recommend_70b_does_not_fit_inf2_xlarge(s70: ModelShape):
    with pytest.raises(NeuronConfigError, match=r"needs >= 24 NeuronCores: use inf2\.48xlarge"):
        recommend(s70, "inf2.xlarge")


def test_recommend_caps_batch_and_default_length():
    p = recommend(shape(TINY, "tiny"), "inf2.xlarge")
    assert (p.tp_degree, p.batch_size, p.max_model_len) == (1, 64, 512)
    assert p.context_encoding_buckets == (128, 256, 512)
    long = recommend(shape({**LLAMA3_8B, "max_position_embeddings": 131072}, "3.1"),
                     "inf2.8xlarge")
    assert long.max_model_len == 8192
    assert any("using 8192 (the model allows 131072)" in n for n in long.notes)


def test_format_plan(s70: ModelShape):
    text = format_plan(recommend(s70, "inf2.48xlarge"), "/models/llama-3-70b")
    assert "Llama-3-70B: 70.55B parameters, bfloat16, on inf2.48xlarge" in text
    for row in ("weights      5.79 GiB", "KV cache     5.00 GiB  (16 x 8192 tokens)",
                "reserve      1.60 GiB", "free         3.61 GiB", "HBM         16.00 GiB"):
        assert row in text
    assert text.splitlines()[-1] == (
        "ragserve serve --model /models/llama-3-70b --device neuron --dtype bfloat16 "
        "--tensor-parallel-size 24 --max-num-seqs 16 --max-model-len 8192 "
        "--context-encoding-buckets 128,256,512,1024,2048,4096,8192 "
        "--token-generation-buckets 128,256,512,1024,2048,4096,8192")


# --- the command -------------------------------------------------------------------------------

def test_cli_plan_70b(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    model = write_model(tmp_path, "Llama-3-70B", LLAMA3_70B)
    assert main(["neuron", "plan", "--model", str(model), "--instance", "inf2.48xlarge"]) == 0
    out = capsys.readouterr().out
    assert "Llama-3-70B: 70.55B parameters" in out
    assert "--tensor-parallel-size 24 --max-num-seqs 16" in out


def test_cli_plan_json_from_config_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    model = write_model(tmp_path, "Llama-3-8B", LLAMA3_8B)
    argv = ["neuron", "plan", "--model", str(model / "config.json"), "--instance",
            "inf2.8xlarge", "--max-model-len", "4096", "--max-num-seqs", "4", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["model"], plan["tp_degree"], plan["batch_size"]) == ("Llama-3-8B", 2, 4)
    assert plan["max_model_len"] == 4096 and plan["estimate"]["free"] > 0
    assert plan["serve_args"][:6] == ["--device", "neuron", "--dtype", "bfloat16",
                                      "--tensor-parallel-size", "2"]


def test_cli_plan_buckets_from_traffic(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """--from: the same memory plan, with bucket lists planned from observed lengths (as many
    graphs as the power-of-two lists, less padding on the sample)."""
    model = write_model(tmp_path, "Llama-3-8B", LLAMA3_8B)
    rng = random.Random(0)
    lines = []
    for _ in range(2000):  # short chat prompts, 100..300 generated tokens
        prompt = rng.randint(150, 400)
        lines.append(json.dumps({"prompt_tokens": prompt,
                                 "total_tokens": prompt + rng.randint(100, 300)}))
    lines.append(json.dumps({"prompt_tokens": 5000, "total_tokens": 5100}))  # over the limit
    (tmp_path / "lengths.jsonl").write_text("\n".join(lines) + "\n")
    base = ["neuron", "plan", "--model", str(model), "--instance", "inf2.8xlarge",
            "--max-model-len", "4096", "--max-num-seqs", "4", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--from", str(tmp_path / "lengths.jsonl")]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["estimate"] == plain["estimate"] and planned["tp_degree"] == 2
    for key in ("context_encoding_buckets", "token_generation_buckets"):
        assert len(planned[key]) == len(plain[key]) and planned[key][-1] == 4096
        assert planned[key] != plain[key]
    assert any("prefill buckets planned from 2000 observed lengths" in n
               for n in planned["notes"])
    assert any("1 observed prefill lengths exceed" in n for n in planned["notes"])
    # no timings of Neuron in a lengths file: prefill cost is priced in padded tokens, said so
    assert any(n.startswith("planned prefill buckets cost 0.") and
               n.endswith("cost model: padded tokens (prefill cost on neuron unknown)")
               for n in planned["notes"])
    assert main([*base, "--from", str(tmp_path / "missing.jsonl")]) == 2
    assert "--from" in capsys.readouterr().err


def test_cli_plan_cannot_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    model = write_model(tmp_path, "Llama-3-70B", LLAMA3_70B)
    assert main(["neuron", "plan", "--model", str(model), "--instance", "inf2.xlarge"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("ragserve neuron plan: error: Llama-3-70B bfloat16 needs")
    assert "needs >= 24 NeuronCores: use inf2.48xlarge" in captured.err


def test_cli_plan_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["neuron", "plan", "--model", str(tmp_path), "--instance", "inf2.xlarge"]) == 2
    assert "no config.json at" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{not json")
    assert main(["neuron", "plan", "--model", str(tmp_path), "--instance", "inf2.xlarge"]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_plan_code_needs_no_torch():
    """planning/ loads bucketing, prometheus_client, the standard library and
    runtime.neuron_plan (pure arithmetic): no torch, nothing of server/ or engine/."""
    assert non_stdlib_imports(ROOT / "runtime" / "neuron_plan.py") == []
    code = ("import sys; before = set(sys.modules); "
            "import planning.buckets, planning.neuron, planning.prometheus; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    packages = {m.split(".")[0] for m in out} - set(sys.stdlib_module_names)
    assert packages == {"bucketing", "planning", "prometheus_client", "runtime"}, packages
    assert {m for m in out if m.startswith("runtime")} == {"runtime", "runtime.neuron_plan"}
