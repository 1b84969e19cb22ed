"""Shared-prefix ("cascade") decode attention against plain attention over ragserve's slot
cache, on this CPU, with PyTorch's own kernels (not used by the engine; BENCHMARKS.md, "Prefix
reuse under vllm bench serve").

Decode rows that reused a prompt prefix each hold a copy of it in their slot, and a decode
step reads every copy. Cascade attention reads each shared prefix once per step: each group's
queries (its rows x the query heads of a KV head) attend to the prefix in one CPU
flash-attention call that also returns the log-sum-exp, every row attends to its own keys
after the prefix in another, and the two are merged by log-sum-exp. Both run over a cache of
SmolLM2-135M's shape (30 layers, 9 query heads, 3 KV heads of 64), float32, ``--rows`` rows in
``--groups`` groups, each row 50-110 positions past its group's prefix. Reported per prefix
length: ms per step for all layers (median of the rounds, the two interleaved), their ratio and
the largest difference between the outputs.

    python -m benchmarks.shared_prefix_attention [--quick] [--prefix 530 1500]
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from benchmarks.common import emit, median, parser, round_floats

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30
GROUP = HEADS // KV_HEADS


def plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
          ctx: int) -> torch.Tensor:
    """Every row over its own slot's keys up to its position (ragserve's ``grouped``)."""
    rows = q.shape[0]
    mask = (torch.arange(ctx) <= pos[:, None]).view(rows, 1, 1, ctx)
    return F.scaled_dot_product_attention(q.reshape(rows, KV_HEADS, GROUP, HEAD_DIM),
                                          k[:rows, :, :ctx], v[:rows, :, :ctx], attn_mask=mask)


def cascade(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, ctx: int,
            groups: list[tuple[int, list[int]]]) -> torch.Tensor:
    """``groups``: (n, rows) whose slots all hold the same first n positions; the first row's
    slot is read for the group. Every row belongs to a group."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    rows = q.shape[0]
    qg = q.reshape(rows, KV_HEADS, GROUP, HEAD_DIM)
    out = torch.empty_like(qg)
    order = torch.tensor([r for _, members in groups for r in members])
    start = torch.zeros(rows, dtype=torch.long)
    for n, members in groups:
        start[members] = n
    first = min(n for n, _ in groups)
    keys = torch.arange(first, ctx)
    own = (keys >= start[order, None]) & (keys <= pos[order, None])  # [rows, L]
    bias = torch.zeros(rows, 1, GROUP, ctx - first).masked_fill(~own[:, None, None], -torch.inf)
    o_own, l_own = flash(qg[order], k[order, :, first:ctx], v[order, :, first:ctx], 0.0, False,
                         attn_mask=bias)
    at = 0
    for n, members in groups:
        m = len(members)
        qq = qg[members].permute(1, 0, 2, 3).reshape(1, KV_HEADS, m * GROUP, HEAD_DIM)
        src = members[0]
        o_pre, l_pre = flash(qq, k[src:src + 1, :, :n], v[src:src + 1, :, :n], 0.0, False)
        o_pre = o_pre.reshape(KV_HEADS, m, GROUP, HEAD_DIM).permute(1, 0, 2, 3)
        l_pre = l_pre.reshape(KV_HEADS, m, GROUP).permute(1, 0, 2)
        o_o, l_o = o_own[at:at + m], l_own[at:at + m]
        lse = torch.logaddexp(l_pre, l_o)
        out[members] = (o_pre * torch.exp(l_pre - lse)[..., None]
                        + o_o * torch.exp(l_o - lse)[..., None])
        at += m
    return out


def measure(prefix: int, rows: int, n_groups: int, rounds: int,
            gen: torch.Generator) -> dict[str, float]:
    max_len = max(2048, prefix + 128)  # slots as the engine sizes them (max_model_len 2048)
    slots = rows + 1
    ks = [torch.randn(slots, KV_HEADS, max_len, HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    vs = [torch.randn(slots, KV_HEADS, max_len, HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    per = rows // n_groups
    groups = [(prefix, list(range(g * per, (g + 1) * per if g < n_groups - 1 else rows)))
              for g in range(n_groups)]
    for k, v in zip(ks, vs):  # each row holds its group's prefix, as a reuse's copy leaves it
        for _, members in groups:
            k[members, :, :prefix] = k[members[0], :, :prefix]
            v[members, :, :prefix] = v[members[0], :, :prefix]
    pos = torch.randint(prefix + 50, prefix + 110, (rows,), generator=gen)
    ctx = int(pos.max()) + 1
    q = torch.randn(rows, HEADS, 1, HEAD_DIM, generator=gen)
    runs = {"plain": lambda k, v: plain(q, k, v, pos, ctx),
            "cascade": lambda k, v: cascade(q, k, v, pos, ctx, groups)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        diff = (plain(q, ks[0], vs[0], pos, ctx)
                - cascade(q, ks[0], vs[0], pos, ctx, groups)).abs().max().item()
        for _ in range(rounds + 1):  # the first round warms up
            for name, fn in runs.items():
                t = time.perf_counter()
                for k, v in zip(ks, vs):
                    fn(k, v)
                times[name].append(time.perf_counter() - t)
    plain_ms, cascade_ms = (median(times[n][1:]) * 1e3 for n in ("plain", "cascade"))
    return {"plain_ms": plain_ms, "cascade_ms": cascade_ms,
            "cascade_over_plain": cascade_ms / plain_ms, "max_abs_diff": diff}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prefix", type=int, nargs="+", default=[530, 1000, 1500])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args()
    if not 1 <= args.groups <= args.rows:
        p.error("--groups must be in 1..--rows")
    rounds = args.rounds or (3 if args.quick else 7)
    gen = torch.Generator().manual_seed(args.seed)
    results = {}
    for n in args.prefix:
        results[str(n)] = r = measure(n, args.rows, args.groups, rounds, gen)
        print(f"prefix {n}: plain {r['plain_ms']:.1f} ms, cascade {r['cascade_ms']:.1f} ms "
              f"({r['cascade_over_plain']:.2f}x), max diff {r['max_abs_diff']:.1e}", flush=True)
    emit("shared_prefix_attention", args, round_floats({
        "rows": args.rows, "groups": args.groups, "layers": LAYERS, "dtype": "float32",
        "rounds": rounds, "by_prefix": results}))


if __name__ == "__main__":
    main()
