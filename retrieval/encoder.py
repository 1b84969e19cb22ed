"""ColBERT late-interaction encoder for checkpoints in the standard ``HF_ColBERT`` layout.

A checkpoint directory holds a BERT (``config.json``, weights whose keys start with ``bert.``), the
projection ``linear.weight: [dim, hidden]`` (no bias), its tokenizer, and usually colbert-ai's
``artifact.metadata`` (the ColBERT config it was trained with). ``colbert-ir/colbertv2.0`` is one.

Tokenization follows colbert-ai 0.2.22 (``colbert/modeling/tokenization``) exactly:
- query: ``[CLS] [Q] tokens [SEP]`` padded to ``query_maxlen`` with ``[MASK]`` (query
  augmentation); the ``[MASK]`` positions are not attended to unless ``attend_to_mask_tokens``,
  but every position, ``[MASK]`` included, is an output vector (``query_augmentation``; off,
  a query has only ``[CLS] [Q] tokens [SEP]``);
- document: ``[CLS] [D] tokens [SEP]`` truncated to ``doc_maxlen``; padding and punctuation
  (``mask_punctuation``) vectors are dropped.
``[Q]``/``[D]`` are the ``[unused0]``/``[unused1]`` vocabulary entries. Every output vector is
L2-normalized, so MaxSim scores are sums of cosines.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

COLBERT_METADATA = "artifact.metadata"
#: settings that change only how queries are encoded: not in the fingerprint (documents' vectors,
#: hence an index, do not depend on them; they were added after indexes were first built)
_QUERY_ONLY = frozenset({"query_augmentation"})


class EncoderError(ValueError):
    """The encoder checkpoint cannot be used (missing files, wrong layout)."""


@dataclass(frozen=True)
class ColBERTSettings:
    """The part of colbert-ai's ``ColBERTConfig`` that changes what the encoder outputs."""

    dim: int = 128
    query_maxlen: int = 32
    doc_maxlen: int = 180
    attend_to_mask_tokens: bool = False
    mask_punctuation: bool = True
    query_token_id: str = "[unused0]"
    doc_token_id: str = "[unused1]"
    #: ColBERT's query augmentation: pad every query to ``query_maxlen`` with ``[MASK]`` and keep
    #: those positions' vectors (a ColBERT-trained model learns to use them as soft expansion
    #: terms). Off: a query has only its own tokens' vectors. Query side only, so it is not part
    #: of the encoder's fingerprint: an index stays valid whichever way it is set.
    query_augmentation: bool = True

    @classmethod
    def from_metadata(cls, meta: dict, dim: int) -> ColBERTSettings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in meta.items() if k in known and v is not None}
        values["dim"] = dim  # the projection's shape is the truth
        return cls(**values)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    import torch

    st = path / "model.safetensors"
    if st.exists():
        from safetensors.torch import load_file

        return load_file(str(st))
    pt = path / "pytorch_model.bin"
    if pt.exists():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise EncoderError(f"{path}: no model.safetensors or pytorch_model.bin (HF_ColBERT layout)")


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id from the local hub cache (or
    downloaded, unless ``HF_HUB_OFFLINE`` is set)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).count("/") != 1:
        raise EncoderError(f"retriever model {name_or_path!r}: not a directory or a hub repo id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path)))
    except Exception as e:  # offline, unknown repo, no network: one clear message
        raise EncoderError(
            f"retriever model {name_or_path!r} is not a local directory and could not be fetched "
            f"from the Hugging Face hub ({type(e).__name__}); download it and pass its path"
        ) from e


class ColBERTEncoder:
    """Encodes queries and documents into L2-normalized token embeddings."""

    def __init__(self, path: Path, *, name: str | None = None, dtype: str = "auto") -> None:
        """``dtype``: ``auto`` is bfloat16 on CPUs with native bf16 (2.4x the float32 encoding
        rate for all-MiniLM-L6-v2 here), else float32; vectors are always returned in float32
        and the fingerprint is taken over the stored weights, whatever the dtype."""
        import torch
        from transformers import AutoTokenizer, BertConfig, BertModel

        self.path = Path(path)
        self.name = name or str(path)
        if not (self.path / "config.json").exists():
            raise EncoderError(f"{self.path}: no config.json (HF_ColBERT layout expected)")
        meta_file = self.path / COLBERT_METADATA
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        state = _weights(self.path)
        if "linear.weight" not in state:
            raise EncoderError(f"{self.path}: no 'linear.weight' projection (not an HF_ColBERT "
                               "checkpoint)")
        linear = state.pop("linear.weight")
        bert_state = {k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")}
        if not bert_state:
            raise EncoderError(f"{self.path}: no 'bert.*' weights (HF_ColBERT layout expected)")
        config = BertConfig.from_pretrained(str(self.path))
        bert = BertModel(config, add_pooling_layer=False)
        missing, _ = bert.load_state_dict(bert_state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing:
            raise EncoderError(f"{self.path}: checkpoint lacks {len(missing)} BERT weights, "
                               f"e.g. {missing[0]}")
        self._fingerprint = _fingerprint(self.settings_from(meta, linear), bert, linear)
        from runtime.loader import resolve_dtype

        self.dtype = resolve_dtype(dtype, torch.device("cpu"))
        self.bert = bert.eval().to(self.dtype)
        self.linear = linear.to(self.dtype)
        self._fast = FastBert.of(self.bert)
        self.settings = self.settings_from(meta, linear)
        self.label = str(meta.get("ragserve_label", "ColBERT"))
        # split_special_tokens: a passage that says "[MASK]" or "[SEP]" is text, not the special
        # token (a literal [MASK] would match every query's [MASK] augmentation vectors)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), use_fast=True,
                                                       split_special_tokens=True)
        tok = self.tokenizer
        self.q_marker = tok.convert_tokens_to_ids(self.settings.query_token_id)
        self.d_marker = tok.convert_tokens_to_ids(self.settings.doc_token_id)
        if tok.unk_token_id in (self.q_marker, self.d_marker):
            raise EncoderError(f"{self.path}: tokenizer has no {self.settings.query_token_id} / "
                               f"{self.settings.doc_token_id} marker tokens")
        skip = {tok.pad_token_id}
        if self.settings.mask_punctuation:
            for symbol in string.punctuation:
                skip.add(tok.convert_tokens_to_ids(symbol))
                skip.update(tok.encode(symbol, add_special_tokens=False)[:1])
        self._skip = torch.tensor(sorted(skip))

    @staticmethod
    def settings_from(meta: dict, linear: torch.Tensor) -> ColBERTSettings:
        return ColBERTSettings.from_metadata(meta, dim=linear.shape[0])

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: object) -> ColBERTEncoder:
        kwargs.setdefault("name", str(name_or_path))
        return cls(resolve_checkpoint(name_or_path), **kwargs)  # type: ignore[arg-type]

    # -- identity --------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """sha256 over the settings and every stored weight: an index built with another encoder
        (or the same name with other weights) is refused at load."""
        return self._fingerprint

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label, "fingerprint": self.fingerprint,
                "settings": asdict(self.settings)}

    # -- encoding --------------------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            if self._fast is not None:
                hidden = self._fast(ids, mask)
            else:
                hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            out = hidden @ self.linear.T  # [B, L, dim]
            return torch.nn.functional.normalize(out.float(), p=2, dim=-1)

    def query_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """colbert-ai's ``QueryTokenizer.tensorize``: ids and mask, ``[B, query_maxlen]``.
        Without ``query_augmentation``: ``[B, longest]``, padded with ``[PAD]`` (mask 0)."""
        import torch

        s = self.settings
        enc = self.tokenizer(list(texts), truncation=True, max_length=s.query_maxlen - 1,
                             padding="max_length" if s.query_augmentation else "longest",
                             return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        ones = torch.ones_like(ids[:, :1])
        ids = torch.cat([ids[:, :1], ones * self.q_marker, ids[:, 1:]], dim=1)
        mask = torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)
        if not s.query_augmentation:
            return ids, mask
        ids[ids == self.tokenizer.pad_token_id] = self.tokenizer.mask_token_id
        if s.attend_to_mask_tokens:
            mask[ids == self.tokenizer.mask_token_id] = 1
        return ids, mask

    def encode_queries(self, texts: Sequence[str]) -> torch.Tensor:
        """``[B, query_maxlen, dim]``: every position, [MASK] augmentation included. Without
        ``query_augmentation``: ``[B, longest, dim]``, a shorter query's padding positions
        zero (a zero vector adds the same 0 to every document's MaxSim)."""
        ids, mask = self.query_ids(texts)
        out = self._forward(ids, mask)
        if not self.settings.query_augmentation:
            out = out * mask.unsqueeze(-1).to(out.dtype)
        return out

    def encode_documents(self, texts: Sequence[str], *, batch_size: int = 32,
                         progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
        """One ``[n_tokens_i, dim]`` tensor per text (pads and punctuation dropped).

        Texts are batched by length so little compute goes to padding; ``progress(n)`` is called
        after each batch with the number of texts it encoded.
        """
        import torch

        s = self.settings
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[torch.Tensor | None] = [None] * len(texts)
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding="longest",
                                 truncation="longest_first", max_length=s.doc_maxlen - 1,
                                 return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
            ones = torch.ones_like(ids[:, :1])
            ids = torch.cat([ids[:, :1], ones * self.d_marker, ids[:, 1:]], dim=1)
            mask = torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)
            emb = self._forward(ids, mask)
            keep = ~torch.isin(ids, self._skip)
            for row, i in enumerate(idx):
                out[i] = emb[row][keep[row]].clone()
            if progress is not None:
                progress(len(idx))
        return out  # type: ignore[return-value]


def _fingerprint(settings: ColBERTSettings, bert: Any, linear: torch.Tensor) -> str:
    fields_ = {k: v for k, v in asdict(settings).items() if k not in _QUERY_ONLY}
    h = hashlib.sha256(json.dumps(fields_, sort_keys=True).encode())
    for k, v in sorted(bert.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    h.update(linear.float().contiguous().numpy().tobytes())
    return h.hexdigest()


class FastBert:
    """``BertModel.forward`` (eval, absolute positions, token type 0, GELU) as a dozen tensor
    calls per layer, with each layer's q/k/v fused into one matmul at load. Same math as
    transformers' BERT (``tests/test_retrieval.py`` compares them); without its per-call module
    and mask machinery, which is about a third of a short query's encoding time on a CPU. The
    weights are the model's own (fused q/k/v are copies: 3 x hidden^2 per layer)."""

    def __init__(self, bert: Any) -> None:
        import torch

        c = bert.config
        self.heads, self.eps = c.num_attention_heads, c.layer_norm_eps
        e = bert.embeddings
        self.word = e.word_embeddings.weight
        self.position = e.position_embeddings.weight
        self.token_type0 = e.token_type_embeddings.weight[0]
        self.norm = (e.LayerNorm.weight, e.LayerNorm.bias)
        self.layers = []
        for layer in bert.encoder.layer:
            a, o = layer.attention, layer.output
            qkv = (a.self.query, a.self.key, a.self.value)
            self.layers.append((
                torch.cat([m.weight for m in qkv]), torch.cat([m.bias for m in qkv]),
                a.output.dense.weight, a.output.dense.bias,
                a.output.LayerNorm.weight, a.output.LayerNorm.bias,
                layer.intermediate.dense.weight, layer.intermediate.dense.bias,
                o.dense.weight, o.dense.bias, o.LayerNorm.weight, o.LayerNorm.bias))

    @classmethod
    def of(cls, bert: Any) -> FastBert | None:
        """The fast path for a plain BERT encoder; None (use transformers) for anything else."""
        c = bert.config
        plain = (type(bert).__name__ == "BertModel" and c.hidden_act == "gelu"
                 and getattr(c, "position_embedding_type", "absolute") == "absolute"
                 and not c.is_decoder and not getattr(c, "add_cross_attention", False))
        return cls(bert) if plain else None

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        B, T = ids.shape
        x = self.word[ids] + self.position[:T] + self.token_type0  # [B, T, D]
        D = x.shape[-1]
        x = F.layer_norm(x, (D,), *self.norm, self.eps)
        # additive key mask [B, 1, 1, T]: 0 where attended, -inf at padding
        bias = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(mask == 0, float("-inf"))
        bias = bias[:, None, None, :]
        h = self.heads
        for qkv_w, qkv_b, ow, ob, n1w, n1b, iw, ib, o2w, o2b, n2w, n2b in self.layers:
            q, k, v = F.linear(x, qkv_w, qkv_b).view(B, T, 3, h, D // h).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, h, T, D/h]
            a = a.transpose(1, 2).reshape(B, T, D)
            x = F.layer_norm(F.linear(a, ow, ob) + x, (D,), n1w, n1b, self.eps)
            y = F.linear(F.gelu(F.linear(x, iw, ib)), o2w, o2b)
            x = F.layer_norm(y + x, (D,), n2w, n2b, self.eps)
        return x
