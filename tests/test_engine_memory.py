"""engine.memory: the oneDNN cache bound and the idle heap trim."""

from __future__ import annotations

import os

import pytest

from engine import memory


def test_the_onednn_cache_bound_leaves_a_users_setting_alone(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    memory.bound_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(memory.ONEDNN_CACHE_CAPACITY)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "2048")
    memory.bound_onednn_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "2048"


def test_the_engine_bounds_the_onednn_cache_when_it_builds(tiny_llama_dir, tmp_path,
                                                           monkeypatch):
    # oneDNN reads the variable at its first primitive: the engine sets it before it loads
    from engine.core import Engine, EngineConfig

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    Engine.from_config(EngineConfig(model=str(tiny_llama_dir), dtype="float32",
                                    max_model_len=64, max_num_seqs=1,
                                    context_encoding_buckets=(16, 32, 64),
                                    token_generation_buckets=(64,), kernels="linear=plain",
                                    cache_dir=tmp_path, warmup=False))
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(memory.ONEDNN_CACHE_CAPACITY)


def test_the_heap_is_trimmed_when_idle_at_most_once_per_interval():
    now = [100.0]
    trimmer = memory.HeapTrimmer(interval=10.0, clock=lambda: now[0])
    if not trimmer.available:
        pytest.skip("this C library has no malloc_trim")
    trimmer.idle()
    assert trimmer.trims == 1
    now[0] += 9.9  # work came and went within the interval
    trimmer.idle()
    assert trimmer.trims == 1
    now[0] += 0.2
    trimmer.idle()
    assert trimmer.trims == 2
