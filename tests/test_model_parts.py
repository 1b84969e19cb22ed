"""Model building blocks against their reference definitions, and the torch.compile path."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.core import Engine, EngineConfig
from runtime.model import DECODE_ATTENTION, Linear, RMSNorm, onednn_packing_available
from scheduler import SamplingParams


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
def test_rms_norm_rounds_as_hugging_face_does(dtype):
    """HF normalizes in float32, rounds to the input's dtype, then multiplies by the weight. Float32
    sums may differ in their last bit between the two (and from CPU to CPU), which can move a
    bf16 rounding by one step: hence "almost all equal, none further than one step"."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ref = LlamaRMSNorm(576, eps=1e-5)
    ours = RMSNorm(576, eps=1e-5)
    with torch.no_grad():
        ref.weight.normal_(1.0, 0.5)
        ours.weight.copy_(ref.weight)
    ref, ours = ref.to(dtype), ours.to(dtype)
    x = torch.randn(4, 37, 576, dtype=dtype) * 3
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.dtype == want.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        return
    assert (got == want).float().mean().item() > 0.999
    torch.testing.assert_close(got, want, atol=0, rtol=2**-7)  # one bf16 step


@pytest.mark.parametrize("name", sorted(DECODE_ATTENTION))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_sdpa(dtype, name):
    torch.manual_seed(0)
    B, H, Hkv, L, hd = 3, 8, 2, 40, 16
    q = torch.randn(B, H, 1, hd, dtype=dtype)
    k, v = torch.randn(B, Hkv, L, hd, dtype=dtype), torch.randn(B, Hkv, L, hd, dtype=dtype)
    pos = torch.tensor([[5], [39], [0]])
    mask = (torch.arange(L) <= pos[..., None]).unsqueeze(1)  # [B, 1, 1, L]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                         enable_gqa=True)
    got = DECODE_ATTENTION[name](q, k, v, mask).float()
    torch.testing.assert_close(got, ref, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)


@pytest.mark.slow
def test_torch_compile_per_bucket_matches_eager(tiny_llama_dir: Path):
    def run(compile_: bool) -> list[tuple[int, ...]]:
        engine = Engine.from_config(EngineConfig(
            # float32 always: in bf16, inductor's fused ops round differently from eager, and
            # the random model's bf16 logits tie at some steps (helpers.BF16_TIE)
            model=str(tiny_llama_dir), dtype="float32", max_model_len=64, max_num_seqs=2,
            context_encoding_buckets=(32,), token_generation_buckets=(64,),
            max_prefill_batch=1, compile=compile_, kernels="auto" if compile_ else "step=eager"))
        assert len(engine.runner.backend.graphs) == (3 if compile_ else 0)
        outs = engine.generate(["hello there", "a b c d"],
                               SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        return [o.token_ids for o in outs]

    assert run(True) == run(False)


def tiny_llama(dtype: torch.dtype, slots: int = 4, max_len: int = 64):
    from runtime.config import ModelArgs
    from runtime.model import Llama

    torch.manual_seed(0)
    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                     intermediate_size=48)
    model = Llama(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model = model.to(dtype).eval().requires_grad_(False)
    model.setup_caches(slots, max_len)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_step_matches_separate_prefill_and_decode(dtype):
    """One ragged call (decode rows with a hole, two prompts, one of them entering the hole's
    slot) gives the logits and KV cache that separate prefill and decode calls give."""
    prompts = {0: [3, 4, 5, 6, 7], 2: [8, 9, 10], 1: [11, 12, 13, 14, 15, 16], 3: [17, 18]}
    refs = []
    for mixed in (False, True):
        model = tiny_llama(dtype)
        with torch.inference_mode():
            for slot in (0, 2):  # running before the step: slots 0 and 2 (slot 1 is free)
                ids = torch.tensor([prompts[slot]])
                model(ids, torch.arange(ids.shape[1])[None], torch.tensor([slot]),
                      torch.tensor([ids.shape[1] - 1]))
            dec_ids = [20, 0, 21]  # row 1: no request in slot 1
            if mixed:
                ids = dec_ids + prompts[1] + prompts[3]
                pos = [5, model.spare_position, 3, *range(6), *range(2)]
                slots = [0, 1, 2] + [1] * 6 + [3] * 2
                logits = model.forward_mixed(torch.tensor(ids), torch.tensor(pos),
                                             torch.tensor(slots), 3, 6, [6, 2])
                logits = logits[[0, 2, 3, 4]]
            else:
                dec = model(torch.tensor([[20], [0], [21]]), torch.tensor([[5], [0], [3]]),
                            torch.arange(3), torch.zeros(3, dtype=torch.long), ctx_len=6)
                pre = [model(torch.tensor([prompts[s]]), torch.arange(len(prompts[s]))[None],
                             torch.tensor([s]), torch.tensor([len(prompts[s]) - 1]))
                       for s in (1, 3)]
                logits = torch.cat([dec[[0, 2]], *pre])
            cache = model.layers[-1].attention.cache
            refs.append((logits, cache.k[:, :, :8].clone(), cache.v[:, :, :8].clone()))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    for got, want in zip(refs[1], refs[0]):
        torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_after_a_held_prefix_matches_the_whole_prompt(dtype):
    """A prompt's suffix run after its prefix's KV (copied from another slot) gives the logits
    and cache the whole prompt gives, next to a decode row and a prompt from position 0."""
    prompt = [3, 4, 5, 6, 7, 8, 9, 10]
    refs = []
    for reuse in (False, True):
        model = tiny_llama(dtype)
        with torch.inference_mode():
            ids = torch.tensor([[30, 31, 32]])  # slot 0 runs: a decode row in the step
            model(ids, torch.arange(3)[None], torch.tensor([0]), torch.tensor([2]))
            if reuse:  # slot 3 holds the first 5 prompt tokens; the prompt goes to slot 1
                ids = torch.tensor([prompt[:5]])
                model(ids, torch.arange(5)[None], torch.tensor([3]), torch.tensor([4]))
                for layer in model.layers:
                    c = layer.attention.cache
                    c.k[1, :, :5], c.v[1, :, :5] = c.k[3, :, :5], c.v[3, :, :5]
                ids, pos, start = prompt[5:], list(range(5, 8)), [5, 0]
            else:
                ids, pos, start = prompt, list(range(8)), [0, 0]
            logits = model.forward_mixed(
                torch.tensor([40, *ids, 11, 12]), torch.tensor([3, *pos, 0, 1]),
                torch.tensor([0] + [1] * len(ids) + [2, 2]), 1, 4, [len(ids), 2], start)
            cache = model.layers[-1].attention.cache
            refs.append((logits, cache.k[:3, :, :8].clone(), cache.v[:3, :, :8].clone()))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    for got, want in zip(refs[1], refs[0]):
        torch.testing.assert_close(got.float(), want.float(), **tol)
