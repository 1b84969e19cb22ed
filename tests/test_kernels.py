"""Per-machine kernel choice (runtime.kernels): timing decides, the answer is cached, pins win,
and the exact-shape path leaves bucket padding out. Token identity with Hugging Face on every
path is checked in test_llama_vs_hf.py."""

from pathlib import Path

import pytest
import torch

from bucketing import DECODE, PREFILL, Bucket
from engine.core import Engine, EngineConfig
from runtime import kernels as K
from runtime.backends.torch_backend import TorchBackend
from runtime.runner import BucketedBatch
from scheduler import SamplingParams, ScheduledRow, SchedulerOutput
from server.config import ConfigError, config_from_args


def config(model: Path, cache: Path, kernels: str = "auto") -> EngineConfig:
    return EngineConfig(model=str(model), dtype="float32", max_model_len=128, max_num_seqs=3,
                        context_encoding_buckets=(16, 32, 64), token_generation_buckets=(64, 128),
                        kernels=kernels, cache_dir=cache, warmup=False)


def rigged(winner: dict[str, str]):
    """A time_calls that makes ``winner[candidate set]`` the fastest, without timing."""
    def time_calls(candidates, reps=7):
        for fn in candidates.values():
            fn()  # every candidate still runs once
        key = "linear" if "packed" in candidates else "attention" if "grouped" in candidates \
            else "step"
        return {c: 0.001 if c == winner[key] else 0.002 for c in candidates}
    return time_calls


@pytest.mark.skipif(K.available(torch.device("cpu"))["decode_linear"] != K.LINEAR,
                    reason="needs oneDNN packing")
@pytest.mark.parametrize("winner", [
    {"linear": "plain", "attention": "sdpa", "step": "eager"},
    {"linear": "packed", "attention": "grouped", "step": "compiled"},
])
def test_the_fastest_candidate_is_used_and_cached(tiny_llama_dir, tmp_path, monkeypatch, winner):
    monkeypatch.setattr(K, "time_calls", rigged(winner))
    engine = Engine.from_config(config(tiny_llama_dir, tmp_path))
    backend = engine.runner.backend
    k = backend.kernels
    assert (k.prefill_linear, k.decode_linear, k.decode_attention) == (
        winner["linear"], winner["linear"], winner["attention"])
    assert k.decode_step == "eager" and backend.step_pending  # warmup=False: not yet settled
    assert set(backend.timings) == {"prefill_linear", "decode_linear", "decode_attention"}

    engine.settle_kernels()
    assert backend.step_settled.is_set()
    assert backend.kernels.decode_step == winner["step"]
    assert (backend._decode_compiled is not None) == (winner["step"] == "compiled")
    [out] = engine.generate(["hello"], SamplingParams(max_tokens=8, temperature=0,
                                                      ignore_eos=True))
    assert len(out.token_ids) == 8

    # A second start on this machine reads the answer instead of timing again.
    def no_timing(*a, **kw):
        raise AssertionError("timed again despite the cache")

    monkeypatch.setattr(K, "time_calls", no_timing)
    again = Engine.from_config(config(tiny_llama_dir, tmp_path)).runner.backend
    assert again.kernels.decode_linear == winner["linear"]
    assert again.step_pending == (winner["step"] == "compiled")
    [cache_file] = (tmp_path / "kernels").glob("*.json")
    assert f'"decode_step": "{winner["step"]}"' in cache_file.read_text()
    # ... and the step costs the scheduler chooses by, measured once on the first start
    assert engine.scheduler.step_costs is backend.step_costs is not None
    assert '"step_costs"' in cache_file.read_text()
    again.settle()
    assert again.step_costs == backend.step_costs


def test_pins_win_over_timing_and_the_cache_key_separates_machines(tiny_llama_dir, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(K, "time_calls", rigged({"linear": "packed", "attention": "matmul",
                                                 "step": "compiled"}))
    backend = Engine.from_config(config(tiny_llama_dir, tmp_path, "attention=sdpa,step=eager")
                                 ).runner.backend
    assert backend.kernels.decode_attention == "sdpa" and backend.kernels.decode_step == "eager"
    assert backend.step_settled.is_set() and "decode_attention" not in backend.timings
    key = backend._cache_key
    assert key["cpu"] and key["torch"] == torch.__version__ and key["max_num_seqs"] == 3
    other = dict(key, cpu="another CPU")
    assert K.cache_path(tmp_path, other) != K.cache_path(tmp_path, key)
    assert K.load_cached(K.cache_path(tmp_path, key), other) == ({}, {})
    # a release with another candidate list times again
    assert key["candidates"]["decode_attention"] == list(K.ATTENTION)
    fewer = dict(key, candidates={**key["candidates"], "decode_attention": ["matmul", "sdpa"]})
    assert K.cache_path(tmp_path, fewer) != K.cache_path(tmp_path, key)


def test_every_timed_shape_weighs_the_same(monkeypatch):
    # shape 1 (small): a is 3x faster than b; shape 2 (large): b is 1.5x faster than a. A plain
    # sum (a 0.001 + 0.150, b 0.003 + 0.100) would pick b on the large shape alone.
    times = iter([{"a": 0.001, "b": 0.003}, {"a": 0.150, "b": 0.100}])
    monkeypatch.setattr(K, "time_calls", lambda candidates, reps: next(times))
    total = K.time_summed([{}, {}])
    assert K.fastest(total) == "a"
    mean_best = (0.001 + 0.100) / 2
    assert total["a"] == pytest.approx(mean_best * (1 + 1.5))
    assert total["b"] == pytest.approx(mean_best * (3 + 1))


def test_a_failed_compile_leaves_eager_serving(tiny_llama_dir, tmp_path, monkeypatch, caplog):
    def broken(self):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(TorchBackend, "_compile_decode", broken)
    engine = Engine.from_config(config(tiny_llama_dir, tmp_path, "linear=plain,attention=matmul"))
    engine.settle_kernels()
    assert engine.runner.backend.step_settled.is_set()
    assert engine.runner.backend.kernels.decode_step == "eager"
    assert "compiled decode step is unavailable (RuntimeError: no C++ compiler)" in caplog.text
    [out] = engine.generate(["hi"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 4

    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):  # pinned: a real error
        Engine.from_config(EngineConfig(**{**config(tiny_llama_dir, tmp_path).__dict__,
                                           "kernels": "step=compiled", "warmup": True}))


def test_kernels_flag_is_checked():
    assert config_from_args(["--kernels", "linear=plain,step=eager"]).kernels == \
        "linear=plain,step=eager"
    with pytest.raises(ConfigError, match="step must be one of eager, compiled, got 'fast'"):
        config_from_args(["--kernels", "step=fast"])
    with pytest.raises(ConfigError, match="KEY=VALUE items"):
        config_from_args(["--kernels", "turbo"])
    with pytest.raises(ConfigError, match="--kernels applies to --engine ragserve only"):
        config_from_args(["--engine", "vllm", "--kernels", "step=eager"])
    with pytest.raises(ConfigError, match="--kernels applies to the PyTorch backend"):
        config_from_args(["--device", "neuron", "--kernels", "step=eager"])
    assert config_from_args([], {"RAGSERVE_KERNELS": "attention=sdpa"}).kernels == "attention=sdpa"


def test_pinning_what_the_device_cannot_run_is_refused():
    with pytest.raises(ValueError, match="decode_step=compiled is not available on device meta"):
        K.check_pinned({"decode_step": "compiled"}, torch.device("meta"))


def rows(*specs: tuple[int, int, int]) -> tuple[ScheduledRow, ...]:
    """(slot, n_tokens, start_pos) -> rows."""
    return tuple(ScheduledRow(f"r{slot}", slot, tuple(range(1, n + 1)), pos)
                 for slot, n, pos in specs)


def test_exact_shapes_leave_the_bucket_padding_out():
    prefill = SchedulerOutput(Bucket(PREFILL, 4, 64), rows((0, 5, 0), (2, 9, 0)))
    padded = BucketedBatch.pack(prefill, scratch_slot=8)
    exact = BucketedBatch.pack(prefill, scratch_slot=8, exact=True)
    assert padded.input_ids.shape == (4, 64) and exact.input_ids.shape == (2, 9)
    assert exact.start_ids.tolist() == [0, 2] and exact.last_token_id.tolist() == [4, 8]
    assert exact.num_computed_tokens - prefill.num_tokens == 4  # only the shorter prompt pads

    one = SchedulerOutput(Bucket(PREFILL, 1, 16), rows((1, 1, 0)))
    assert BucketedBatch.pack(one, 8, exact=True).input_ids.shape == (1, 2)  # 2 marks prefill

    decode = SchedulerOutput(Bucket(DECODE, 8, 128), rows((0, 1, 40), (2, 1, 70)))
    exact = BucketedBatch.pack(decode, scratch_slot=8, exact=True)
    assert exact.input_ids.shape == (3, 1) and exact.rows == [0, 2]  # up to the highest slot
    assert exact.cache_ids[:, 0].tolist() == [40, 0, 70]


def test_no_packed_linear_where_onednn_has_no_bf16(monkeypatch: pytest.MonkeyPatch):
    """A CPU without oneDNN bf16 (AVX2 only) cannot pack bf16 weights: auto never times
    ``packed`` there, and pinning it is refused by name (not a crash at load)."""
    if K.available(torch.device("cpu"))["decode_linear"] != K.LINEAR:
        pytest.skip("this torch build has no oneDNN packing at all")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    cpu = torch.device("cpu")
    assert K.available(cpu, torch.bfloat16)["decode_linear"] == ("plain",)
    assert K.available(cpu, torch.float32)["decode_linear"] == K.LINEAR
    with pytest.raises(ValueError, match=r"linear=packed is not available on device cpu in "
                                         r"torch\.bfloat16"):
        K.check_pinned({"decode_linear": "packed"}, cpu, torch.bfloat16)
