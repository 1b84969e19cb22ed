"""A Llama-family decoder (Llama 2/3/3.1, SmolLM2) with a static per-slot KV cache.

Shapes are fixed per call by the bucket the scheduler chose, and nothing is allocated inside
``forward`` that outlives it: the KV cache ``[slots, kv_heads, max_len, head_dim]`` per layer and
the rotary tables are allocated once by :meth:`Llama.setup_caches`.

Two call shapes, as in transformers-neuronx continuous batching (:meth:`Llama.forward`):

- prefill: ``B`` prompts padded to ``T`` tokens, each written into its own slot
  (``slots[b]``); attention uses the prompt's own keys (prompts start at position 0);
- decode: one token per row and **row i is slot i** (the batch is padded to cover the highest
  running slot), so attention reads ``cache[:B, :, :ctx_len]`` as a view, with no gather.

and one ragged shape for backends without static graphs (:meth:`Llama.forward_mixed`): decode
rows and whole prompts flattened into one token sequence, so every matmul reads its weights once
for both (vLLM's mixed prefill/decode batch); only attention is split per part.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import ModelArgs


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]``, with Llama 3.1 / linear scaling applied."""
    hd = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if args.rope_type == "linear":
        return inv / args.rope_factor
    if args.rope_type != "llama3":
        return inv
    factor, old_len = args.rope_factor, args.rope_original_max_position
    low_wavelen = old_len / args.rope_low_freq_factor
    high_wavelen = old_len / args.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - args.rope_low_freq_factor) / (
        args.rope_high_freq_factor - args.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(args: ModelArgs, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[max_len, head_dim]`` in float32 (the half-split layout of HF checkpoints)."""
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(args))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, T, H, hd]; cos, sin: [B, T, 1, hd]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """One query token per row against the cache, queries grouped per KV head (GQA).

    q: [B, H, 1, hd]; k, v: [B, Hkv, L, hd]; mask: [B, 1, 1, L] -> [B, H, 1, hd]. Two small
    matmuls and a float32 softmax (HF's eager attention): on CPU this is 2-5x faster than
    scaled_dot_product_attention's flash kernel for bf16 decode. Scores are ``k @ q^T``, which
    reads the cache row by row (faster in bf16 than ``q @ k^T``; BENCHMARKS.md).
    """
    B, H, _, hd = q.shape
    n_kv = k.shape[1]
    scores = k @ q.reshape(B, n_kv, H // n_kv, hd).transpose(-1, -2)  # [B, Hkv, L, G]
    scores = scores.mul_(hd**-0.5).masked_fill_(~mask.transpose(-1, -2), float("-inf"))
    probs = torch.softmax(scores, dim=-2, dtype=torch.float32).to(v.dtype)  # over L
    return (probs.transpose(-1, -2) @ v).reshape(B, H, 1, hd)


def decode_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """The same as :func:`decode_attention` through ``scaled_dot_product_attention`` (one of
    the candidates runtime.kernels times; slower on the CPUs measured so far, not on all)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])


def decode_attention_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention`` with each KV head's group of query heads as its query
    sequence: GQA without repeating K and V, and CPU's flash kernel instead of the math path
    that a mask with ``enable_gqa`` takes (4-5x faster than :func:`decode_attention_sdpa` in
    bf16 on the dev VM's AMD EPYC; BENCHMARKS.md)."""
    B, H, _, hd = q.shape
    n_kv = k.shape[1]
    y = F.scaled_dot_product_attention(q.reshape(B, n_kv, H // n_kv, hd), k, v, attn_mask=mask)
    return y.reshape(B, H, 1, hd)


DECODE_ATTENTION = {"matmul": decode_attention, "sdpa": decode_attention_sdpa,
                    "grouped": decode_attention_grouped}


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` reordered once into oneDNN's blocked layout (for :func:`packed_linear`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` with W from :func:`pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def onednn_packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN can pack and run weights of ``dtype`` here: bf16 and fp16 need CPU
    support (AVX512 or AVX-NE-CONVERT for bf16) that a CPU build of torch may lack."""
    if not (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return True


class Linear(nn.Module):
    """``y = x @ W.T`` (no bias), with the implementation chosen per phase (runtime.kernels).

    On CPU, :meth:`set_kernels` can reorder W once, at load time, into oneDNN's blocked layout
    (``packed``), which read memory at ~85% of peak bandwidth in batch-1 decode on one Zen 5
    where ``F.linear`` reached ~50% (BENCHMARKS.md); which one wins differs by CPU and by M, so
    the choice is timed. A decode call is ``[B, 1, D]`` (or ``[B, D]``, the LM head); anything
    longer is a prefill.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.packed: torch.Tensor | None = None
        self.packed_prefill = False
        self.packed_decode = False
        self.wid: int | None = None  # id inside compiled graphs (runtime.kernels)

    def pack(self) -> None:
        """Use the packed weight for both phases; the plain one is released (a tied embedding
        keeps its own reference)."""
        self.set_kernels("packed", "packed")

    def set_kernels(self, prefill: str, decode: str) -> None:
        """``packed`` or ``plain`` for each phase; keeps only the copies some phase uses."""
        want = {prefill, decode}
        if "packed" in want and self.packed is None:
            if self.weight is None:
                raise RuntimeError("the plain weight was released; cannot pack again")
            self.packed = pack_weight(self.weight)
        if "plain" in want and self.weight is None:
            raise RuntimeError("the plain weight was released; cannot switch back to plain")
        if "packed" not in want:
            self.packed = None
        if "plain" not in want:
            self.weight = None
        self.packed_prefill = prefill == "packed"
        self.packed_decode = decode == "packed"

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The eager implementation chosen for ``x``'s phase."""
        decode = x.dim() == 2 or x.shape[-2] == 1
        if self.packed_decode if decode else self.packed_prefill:
            return packed_linear(x, self.packed)
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wid is not None and torch.compiler.is_compiling():
            return torch.ops.ragserve.linear(x, self.wid, self.out_features)
        return self.run(x)


class RMSNorm(nn.Module):
    """HF's ``LlamaRMSNorm``: normalized in float32, rounded to x's dtype, then times the
    weight in x's dtype.

    ``F.rms_norm`` given the weight rounds once, after it: in bf16 that differs from HF in the
    last bit of many elements, which moved SmolLM2's first-token logprobs by up to 0.2 and
    flipped a greedy near-tie against HF's bf16 answer. Without the weight ``F.rms_norm`` still
    computes in float32 and rounds once, so this is bit-identical to HF at the same cost.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, None, self.eps) * self.weight


class KVCache(nn.Module):
    """One layer's static cache: ``[num_slots, n_kv_heads, max_len, head_dim]`` for K and V."""

    def __init__(self, num_slots: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (num_slots, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, slots: torch.Tensor, positions: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        # slots: [B]; positions: [B, T]; k, v: [B, T, Hkv, hd]
        idx = (slots[:, None], slice(None), positions)
        self.k[idx] = k.to(self.k.dtype)
        self.v[idx] = v.to(self.v.dtype)

    def write_tokens(self, slots: torch.Tensor, positions: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor) -> None:
        # slots, positions: [N] (one per token); k, v: [N, Hkv, hd]
        self.k[slots, :, positions] = k.to(self.k.dtype)
        self.v[slots, :, positions] = v.to(self.v.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        qkv = (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
        self.wqkv = Linear(args.dim, qkv)  # q, k, v fused at load time
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)
        self.cache: KVCache | None = None
        self.decode_attention = decode_attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, slots: torch.Tensor, positions: torch.Tensor,
                ctx_len: int | None) -> torch.Tensor:
        # x: [B, T, D]; ctx_len None = prefill (causal over its own keys, mask unused);
        # otherwise decode (T == 1) over cache[:B, :, :ctx_len] with mask [B, 1, 1, ctx_len]
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self._qkv(x, cos, sin)
        self.cache.write(slots, positions, k, v)
        if ctx_len is None:  # positions are 0..T-1: plain causal attention
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True,
                                               enable_gqa=Hkv != H)  # [B, H, T, hd]
        else:  # the cache may hold a wider dtype than the weights (float32 on CPU)
            cache = self.cache
            y = self.decode_attention(q.transpose(1, 2).to(cache.k.dtype), cache.k[:B, :, :ctx_len],
                                 cache.v[:B, :, :ctx_len], mask).to(x.dtype)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * hd))

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, T, H, hd]``, rotated k and v ``[B, T, Hkv, hd]`` for x ``[B, T, D]``."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qk, v = self.wqkv(x).split([(H + Hkv) * hd, Hkv * hd], dim=-1)
        qk = apply_rope(qk.view(B, T, H + Hkv, hd), cos, sin)  # q and k rotated together
        q, k = qk.split([H, Hkv], dim=2)
        return q, k, v.view(B, T, Hkv, hd)

    def forward_mixed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      mask: torch.Tensor | None, slots: torch.Tensor, positions: torch.Tensor,
                      num_decode: int, ctx_len: int, prompts: list[tuple[int, int, int]]
                      ) -> torch.Tensor:
        # x: [1, N, D]: num_decode decode rows (row i is slot i), then each prompt's tokens;
        # slots, positions: [N]; mask: [num_decode, 1, 1, ctx_len]; prompts: (tokens, start,
        # slot) each
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = (t[0] for t in self._qkv(x, cos, sin))  # [N, H or Hkv, hd]
        cache = self.cache
        cache.write_tokens(slots, positions, k, v)
        ys = []
        if num_decode:  # the decode rows read the cache, as in forward
            B = num_decode
            y = self.decode_attention(q[:B].unsqueeze(2).to(cache.k.dtype),
                                      cache.k[:B, :, :ctx_len], cache.v[:B, :, :ctx_len], mask)
            ys.append(y.to(x.dtype).reshape(B, H * hd))
        at = num_decode
        for n, start, slot in prompts:
            part = slice(at, at + n)
            qp = q[part].transpose(0, 1)[None]  # [1, H, n, hd]
            if start == 0:  # causal over its own keys
                y = F.scaled_dot_product_attention(
                    qp, k[part].transpose(0, 1)[None], v[part].transpose(0, 1)[None],
                    is_causal=True, enable_gqa=Hkv != H)
            else:  # after a held prefix: its slot's keys up to each token's own position
                end = start + n
                keep = (torch.arange(end, device=x.device)
                        <= torch.arange(start, end, device=x.device)[:, None])  # [n, end]
                y = F.scaled_dot_product_attention(
                    qp.to(cache.k.dtype), cache.k[slot, :, :end][None],
                    cache.v[slot, :, :end][None], attn_mask=keep,
                    enable_gqa=Hkv != H).to(x.dtype)
            ys.append(y[0].transpose(0, 1).reshape(n, H * hd))
            at += n
        return self.wo(torch.cat(ys)[None])


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.hidden = args.intermediate_size
        self.w13 = Linear(args.dim, 2 * args.intermediate_size)  # gate, up fused
        self.w2 = Linear(args.intermediate_size, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, slots: torch.Tensor, positions: torch.Tensor,
                ctx_len: int | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, slots, positions, ctx_len)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_mixed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      mask: torch.Tensor | None, slots: torch.Tensor, positions: torch.Tensor,
                      num_decode: int, ctx_len: int, prompts: list[tuple[int, int, int]]
                      ) -> torch.Tensor:
        h = x + self.attention.forward_mixed(self.attention_norm(x), cos, sin, mask, slots,
                                             positions, num_decode, ctx_len, prompts)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        self.num_slots = 0
        self.max_len = 0

    def pack_weights(self) -> None:
        """Pack every matmul weight for oneDNN (CPU only; a no-op elsewhere)."""
        w = self.tok_embeddings.weight
        if w.device.type != "cpu" or not onednn_packing_available(w.dtype):
            return
        for m in self.modules():
            if isinstance(m, Linear) and m.packed is None:
                m.pack()

    def linears(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]

    def set_kernels(self, prefill_linear: str, decode_linear: str,
                    decode_attention: str) -> None:
        """Apply a kernel choice (runtime.kernels.Kernels)."""
        for m in self.linears():
            m.set_kernels(prefill_linear, decode_linear)
        for layer in self.layers:
            layer.attention.decode_attention = DECODE_ATTENTION[decode_attention]

    def setup_caches(self, num_slots: int, max_len: int,
                     kv_dtype: torch.dtype | None = None) -> None:
        """Allocate the KV cache (``kv_dtype``, default the weights') and rotary tables once.

        Positions run to ``max_len`` inclusive: position ``max_len`` (:attr:`spare_position`)
        is one no sequence reaches, so a warm-up call on another thread may write there while
        requests run (every sequence masks keys past its own position)."""
        w = self.tok_embeddings.weight
        a = self.args
        for layer in self.layers:
            layer.attention.cache = KVCache(num_slots, a.n_kv_heads, max_len + 1, a.head_dim,
                                            kv_dtype or w.dtype, w.device)
        cos, sin = rope_tables(a, max_len + 1)
        self.register_buffer("rope_cos", cos.to(w.device, w.dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(w.device, w.dtype), persistent=False)
        self.register_buffer("key_pos", torch.arange(max_len + 1, device=w.device),
                             persistent=False)
        self.num_slots, self.max_len = num_slots, max_len

    @property
    def spare_position(self) -> int:
        return self.max_len

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                last_idx: torch.Tensor, ctx_len: int | None = None) -> torch.Tensor:
        """Logits ``[B, vocab]`` (float32) of each row's token at ``last_idx``.

        input_ids, positions: ``[B, T]``; slots, last_idx: ``[B]``. ``ctx_len`` None runs a
        prefill (positions start at 0); an int runs a decode reading that much of the cache.
        """
        x = self.tok_embeddings(input_ids)  # [B, T, D]
        cos = self.rope_cos[positions].unsqueeze(2)  # [B, T, 1, hd]
        sin = self.rope_sin[positions].unsqueeze(2)
        mask = None
        if ctx_len is not None:
            mask = (self.key_pos[:ctx_len] <= positions[..., None]).unsqueeze(1)  # [B, 1, 1, L]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, slots, positions, ctx_len)
        x = x.gather(1, last_idx.view(-1, 1, 1).expand(-1, 1, x.shape[-1])).squeeze(1)  # [B, D]
        return self.output(self.norm(x)).float()

    def forward_mixed(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      slots: torch.Tensor, num_decode: int, ctx_len: int,
                      prompt_lens: list[int], prompt_starts: list[int] | None = None
                      ) -> torch.Tensor:
        """Logits ``[num_decode + len(prompt_lens), vocab]`` (float32) of a ragged step: one
        token for each of ``num_decode`` decode rows (row i is slot i, reading ``ctx_len``
        positions of the cache: the longest of them), then the last token of each prompt.

        input_ids, positions, slots: ``[N]``, the decode rows' tokens first, then each prompt's
        (positions from its ``prompt_starts`` entry, default 0, all in the prompt's slot). A
        prompt starting above 0 attends to the keys its slot holds below its start (a reused
        prefix). A decode row with no request in its slot is written at
        :attr:`spare_position`. Every matmul runs once over all ``N`` tokens.
        """
        if num_decode + sum(prompt_lens) != input_ids.shape[0]:
            raise ValueError(f"{input_ids.shape[0]} tokens for {num_decode} decode rows and "
                             f"prompts of {prompt_lens} tokens")
        x = self.tok_embeddings(input_ids)[None]  # [1, N, D]
        cos = self.rope_cos[positions][None, :, None]  # [1, N, 1, hd]
        sin = self.rope_sin[positions][None, :, None]
        mask = None
        if num_decode:
            dec = positions[:num_decode, None]
            mask = (self.key_pos[:ctx_len] <= dec).view(num_decode, 1, 1, ctx_len)
        starts = prompt_starts or [0] * len(prompt_lens)
        held = [0] * len(prompt_lens)  # the slot of each prompt after a held prefix
        if any(starts):
            lens = torch.tensor(prompt_lens)
            held = slots[(lens.cumsum(0) - lens + num_decode).to(slots.device)].tolist()
        prompts = list(zip(prompt_lens, starts, held))
        for layer in self.layers:
            x = layer.forward_mixed(x, cos, sin, mask, slots, positions, num_decode, ctx_len,
                                    prompts)
        ends = torch.tensor(prompt_lens, device=x.device).cumsum(0) + num_decode - 1
        last = torch.cat([torch.arange(num_decode, device=x.device), ends])
        return self.output(self.norm(x[0, last])).float()

    @classmethod
    def from_hf_state_dict(cls, args: ModelArgs, state: dict[str, torch.Tensor],
                           dtype: torch.dtype, device: torch.device | str) -> Llama:
        """Build from Hugging Face Llama weights, fusing q/k/v and gate/up once, here."""
        with torch.device("meta"):
            model = cls(args)
        model.load_state_dict(convert_hf_state_dict(args, state), assign=True, strict=True)
        if args.tie_word_embeddings:
            model.output.weight = model.tok_embeddings.weight
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def convert_hf_state_dict(args: ModelArgs, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` names -> ours; consumes ``hf`` (tensors are popped)."""
    out = {"tok_embeddings.weight": hf.pop("model.embed_tokens.weight"),
           "norm.weight": hf.pop("model.norm.weight")}
    head = hf.pop("lm_head.weight", None)
    if head is None and not args.tie_word_embeddings:
        raise ValueError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
    out["output.weight"] = out["tok_embeddings.weight"] if args.tie_word_embeddings else head
    for i in range(args.n_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        out[q + "attention.wqkv.weight"] = torch.cat(
            [hf.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
        )
        out[q + "attention.wo.weight"] = hf.pop(p + "self_attn.o_proj.weight")
        out[q + "feed_forward.w13.weight"] = torch.cat(
            [hf.pop(p + "mlp.gate_proj.weight"), hf.pop(p + "mlp.up_proj.weight")]
        )
        out[q + "feed_forward.w2.weight"] = hf.pop(p + "mlp.down_proj.weight")
        out[q + "attention_norm.weight"] = hf.pop(p + "input_layernorm.weight")
        out[q + "ffn_norm.weight"] = hf.pop(p + "post_attention_layernorm.weight")
    leftover = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"unexpected weights in checkpoint: {leftover[:5]}")
    return out
