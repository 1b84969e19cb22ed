"""Batch-1 decode speed against the memory-bandwidth roofline.

Decode at batch 1 reads every weight once per token, so its ceiling is
``bandwidth / bytes_per_token``. This measures the machine's read bandwidth (a sum over 1 GiB
of random data, far past the caches) interleaved with decode rounds, so both see the same
neighbours on a shared machine, and reports medians:

- ``decode_tok_s``: the engine's token rate for one running request (schedule, forward,
  sample, detokenize), greedy, from the second token on;
- ``forward_tok_s``: the backend's decode forward alone;
- ``roofline_tok_s``: bandwidth / (weight bytes + KV bytes read per token);
- ``fraction``: decode_tok_s / roofline_tok_s (goal >= 0.7).

    python -m benchmarks.decode_roofline [--quick] [--dtype auto|float32|bfloat16]
                                         [--kernels auto|KEY=VALUE,...]

The engine's kernels are chosen as the server chooses them (``--kernels auto``: timed on this
machine, the compiled decode step built and timed before the rounds start) and reported.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import emit, median, parser, round_floats
from engine.core import Engine, EngineConfig
from scheduler import SamplingParams

PROMPT = ("Explain, step by step and in detail, how a token-level continuous batching "
          "scheduler keeps an accelerator busy while requests of different lengths arrive.")


def read_bandwidth(buf: torch.Tensor) -> float:
    """Bytes/s of one full read of ``buf``."""
    t = time.perf_counter()
    buf.sum()
    return buf.numel() * buf.element_size() / (time.perf_counter() - t)


def bytes_per_token(model: torch.nn.Module, context: int) -> int:
    """Every matmul weight and norm (packed or not) read once, plus the KV cache read for a
    ``context``-token sequence; the embedding table contributes one row."""
    from runtime.model import Linear

    total = 0
    for m in model.modules():
        if isinstance(m, Linear):
            w = m.packed if m.packed_decode else m.weight  # what a decode reads
            total += w.numel() * w.element_size()
    a = model.args
    emb = model.tok_embeddings.weight
    total += a.dim * emb.element_size() * (2 * a.n_layers + 1)  # norms
    total += a.dim * emb.element_size()  # one embedding row
    total += 2 * a.n_layers * a.n_kv_heads * context * a.head_dim * emb.element_size()
    return total


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=None, help="decode tokens per round")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--kernels", default="auto")
    args = p.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    n_tokens = args.tokens or (48 if args.quick else 96)

    engine = Engine.from_config(EngineConfig(model=args.model, dtype=args.dtype,
                                             device=args.device, max_model_len=512,
                                             max_num_seqs=1, kernels=args.kernels))
    backend = engine.runner.backend
    model = backend.model
    buf = torch.rand(256 * 2**20)  # 1 GiB float32, random
    params = SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)
    prompt_ids = engine.encode_prompt(PROMPT, chat=True)

    bw, engine_rates, forward_rates = [], [], []
    for _ in range(rounds):
        bw += [read_bandwidth(buf) for _ in range(3)]
        stamps = [time.perf_counter() for _ in engine.stream(prompt_ids, params)]
        engine_rates.append((len(stamps) - 2) / (stamps[-1] - stamps[1]))
        ids = torch.zeros(1, 1, dtype=torch.long)
        pos = torch.full((1, 1), len(prompt_ids) + n_tokens // 2)
        slot, last = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        t = time.perf_counter()
        for _ in range(n_tokens):
            backend.forward(ids, pos, slot, last)
        forward_rates.append(n_tokens / (time.perf_counter() - t))
        bw += [read_bandwidth(buf) for _ in range(3)]

    context = len(prompt_ids) + n_tokens // 2
    nbytes = bytes_per_token(model, context)
    bandwidth = median(bw)
    roofline = bandwidth / nbytes
    decode = median(engine_rates)
    result = {
        "model": engine.model_name,
        "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
        "bytes_per_token_mb": nbytes / 1e6,
        "bandwidth_gb_s": bandwidth / 1e9,
        "decode_tok_s": decode,
        "forward_tok_s": median(forward_rates),
        "roofline_tok_s": roofline,
        "fraction": decode / roofline,
        "forward_fraction": median(forward_rates) / roofline,
        "kernels": str(backend.kernels),
        "kernel_timings_ms": {k: {c: round(s * 1e3, 3) for c, s in v.items()}
                              for k, v in backend.timings.items()},
        "rounds": rounds,
        "tokens_per_round": n_tokens,
    }
    print(f"decode {decode:.1f} tok/s, forward {median(forward_rates):.1f} tok/s, roofline "
          f"{roofline:.1f} tok/s ({bandwidth / 1e9:.1f} GB/s / {nbytes / 1e6:.0f} MB) -> "
          f"fraction {decode / roofline:.2f}")
    emit("decode_roofline", args, round_floats(result))


if __name__ == "__main__":
    main()
