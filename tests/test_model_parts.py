"""Model building blocks against their reference definitions, and the torch.compile path."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from runtime.model import Linear, decode_attention, onednn_packing_available
from scheduler import SamplingParams
from server.engine import Engine, EngineConfig


@pytest.mark.skipif(not onednn_packing_available(), reason="needs oneDNN (CPU build of torch)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_packed_linear_matches_f_linear(dtype, rows):
    torch.manual_seed(0)
    lin = Linear(96, 160).to(dtype)
    torch.nn.init.normal_(lin.weight)
    x = torch.randn(2, rows, 96, dtype=dtype)
    ref = F.linear(x.float(), lin.weight.float())
    lin.pack()
    assert lin.weight is None and lin.packed is not None
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(lin(x).float(), ref, atol=tol * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_sdpa(dtype):
    torch.manual_seed(0)
    B, H, Hkv, L, hd = 3, 8, 2, 40, 16
    q = torch.randn(B, H, 1, hd, dtype=dtype)
    k, v = torch.randn(B, Hkv, L, hd, dtype=dtype), torch.randn(B, Hkv, L, hd, dtype=dtype)
    pos = torch.tensor([[5], [39], [0]])
    mask = (torch.arange(L) <= pos[..., None]).unsqueeze(1)  # [B, 1, 1, L]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                         enable_gqa=True)
    got = decode_attention(q, k, v, mask).float()
    torch.testing.assert_close(got, ref, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)


@pytest.mark.slow
def test_torch_compile_per_bucket_matches_eager(tiny_llama_dir: Path):
    def run(compile_: bool) -> list[tuple[int, ...]]:
        engine = Engine.from_config(EngineConfig(
            model=str(tiny_llama_dir), dtype="float32", max_model_len=64, max_num_seqs=2,
            context_encoding_buckets=(32,), token_generation_buckets=(64,),
            max_prefill_batch=1, compile=compile_, kernels="auto" if compile_ else "step=eager"))
        assert len(engine.runner.backend.graphs) == (3 if compile_ else 0)
        outs = engine.generate(["hello there", "a b c d"],
                               SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        return [o.token_ids for o in outs]

    assert run(True) == run(False)
