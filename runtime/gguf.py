"""GGUF -> a cached Hugging Face directory (dequantized once; later starts load safetensors).

transformers (with gguf) does the reading, dequantization and llama.cpp's q/k permutation; we
keep the result under the cache directory, keyed by the file's path, size and mtime and the
transformers version, written to a temporary directory and renamed into place (a conversion
killed halfway leaves nothing behind that looks complete).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DONE_MARKER = "ragserve-gguf.json"
CONVERTER_VERSION = 2  # bump when the conversion's output changes, to redo cached ones

# GGUF metadata ids -> the tokenizer's special-token attributes.
SPECIAL_TOKEN_FIELDS = {
    "tokenizer.ggml.bos_token_id": "bos_token",
    "tokenizer.ggml.eos_token_id": "eos_token",
    "tokenizer.ggml.unknown_token_id": "unk_token",
    "tokenizer.ggml.padding_token_id": "pad_token",
}


def gguf_cache_path(gguf_path: Path, cache_dir: Path) -> Path:
    import transformers

    st = gguf_path.stat()
    key = (f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{transformers.__version__}:"
           f"{CONVERTER_VERSION}")
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir / "gguf" / f"{gguf_path.stem}-{digest}"


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """The Hugging Face directory for ``gguf_path``, converting it on first use."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out = gguf_cache_path(gguf_path, cache_dir)
    if (out / DONE_MARKER).is_file():
        log.info("GGUF already converted: %s", out)
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (first start only) -> %s", gguf_path.name, out)
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        src, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        set_special_tokens(tokenizer, gguf_path)
        tokenizer.save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32,
                                                     **_dequantize_kwargs())
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        (tmp / DONE_MARKER).write_text(json.dumps({"source": str(gguf_path.resolve())}))
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / DONE_MARKER).is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1fs", gguf_path.name, time.perf_counter() - t0)
    return out


def _dequantize_kwargs() -> dict[str, Any]:
    """transformers 5.17+ loads a GGUF through a quantizer that may keep the weights packed, and
    ``save_pretrained`` refuses such a model ("quantized with gguf and is not serializable");
    ``GgufConfig(dequantize=True)`` asks for plain dense weights. Older versions (4.x, 5.x up to
    5.16: no ``GgufConfig``) always dequantize."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def set_special_tokens(tokenizer: Any, gguf_path: Path) -> None:
    """Take bos/eos/unk/pad from the GGUF's own metadata ids.

    transformers' GGUF tokenizer conversion can mislabel them (for SmolLM2 it makes
    ``<|im_start|>`` the eos token, while the file says id 2, ``<|im_end|>``).
    """
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    for key, attr in SPECIAL_TOKEN_FIELDS.items():
        field = fields.get(key)
        if field is not None:
            token_id = int(field.parts[field.data[0]][0])
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
