"""Model resolution and loading errors, and `ragserve generate` on a tiny model."""

import json
from pathlib import Path

import pytest
import torch

from runtime.config import ModelArgs
from runtime.loader import eos_token_ids, load_state_dict, resolve_dtype, resolve_model
from server.cli import main


def test_resolve_model_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "missing.gguf"), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="model not found"):
        resolve_model("./no/such/dir")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_state_dict(tmp_path)


def test_sharded_checkpoint_loads_every_shard(tiny_llama_dir: Path):
    index = json.loads((tiny_llama_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(load_state_dict(tiny_llama_dir)) == set(index["weight_map"])


def test_eos_ids_union(tiny_llama_dir: Path):
    assert eos_token_ids(tiny_llama_dir) == (128001, 128008, 128009)


def test_dtype_resolution(monkeypatch):
    import runtime.loader

    monkeypatch.setattr(runtime.loader, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(runtime.loader, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype must be"):
        resolve_dtype("int3", torch.device("cpu"))


def test_model_args_reject_unsupported_configs():
    base = dict(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=16)
    assert ModelArgs.from_hf_config(base).head_dim == 4
    with pytest.raises(NotImplementedError, match="model_type 'gpt2'"):
        ModelArgs.from_hf_config({**base, "model_type": "gpt2"})
    with pytest.raises(NotImplementedError, match="rope_scaling type 'yarn'"):
        ModelArgs.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2}})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelArgs.from_hf_config({**base, "num_key_value_heads": 3})


def test_model_args_read_both_rope_layouts():
    """transformers 4's ``rope_theta`` + ``rope_scaling`` and 5's ``rope_parameters``."""
    base = dict(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=16)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    v4 = ModelArgs.from_hf_config({**base, "rope_theta": 500000.0, "rope_scaling": scaling})
    v5 = ModelArgs.from_hf_config({**base, "rope_parameters": {**scaling, "rope_theta": 500000.0}})
    assert v4 == v5
    assert (v5.rope_theta, v5.rope_type, v5.rope_factor, v5.rope_original_max_position) == (
        500000.0, "llama3", 8.0, 64)
    plain = {"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    assert ModelArgs.from_hf_config({**base, **plain}).rope_theta == 100000.0
    assert ModelArgs.from_hf_config({**base, "rope_theta": 100000.0, "rope_scaling": None}) == (
        ModelArgs.from_hf_config({**base, **plain}))


def test_cli_generate_streams_text(tiny_llama_dir: Path, capsys, caplog):
    caplog.set_level("INFO")
    rc = main(["generate", "--model", str(tiny_llama_dir), "--prompt", "Hello",
               "--max-tokens", "6", "--max-model-len", "256", "--raw"])
    assert rc == 0
    assert capsys.readouterr().out.strip()
    assert "loaded tiny-llama" in caplog.text
    assert "6 tokens" in caplog.text or "finish_reason=stop" in caplog.text


def test_cli_errors_are_clear(tmp_path: Path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope.gguf"), "--prompt", "x"]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--context-encoding-buckets", "a,b"])
    assert main(["generate", "--model", "", "--prompt", "x", "--device", "neuron"]) == 2
