"""Plan a bucket list from observed lengths: the fewest padded tokens for a given graph count.

Every extra bucket is one more compiled graph (compile time and device memory on Neuron), so the
question an operator asks is "with k graphs, which k lengths waste the least on my traffic?".
:func:`plan_buckets` answers it exactly (dynamic programming over aligned candidate lengths).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from itertools import accumulate, repeat


def padding_ratio(lengths: Iterable[int], buckets: Sequence[int],
                  counts: Iterable[int] | None = None,
                  real_tokens: float | None = None) -> float:
    """Padded tokens / real tokens when every length runs in its smallest fitting bucket.
    ``counts``: how many times each length occurs (default: once each). ``real_tokens``: the
    true token total, where ``lengths`` are histogram bins' upper bounds (default: their sum).

    >>> padding_ratio([128, 192], [128, 256])
    1.2
    >>> padding_ratio([128, 192], [128, 256], counts=[3, 1], real_tokens=560)
    1.1428571428571428
    """
    real = padded = 0
    for n, c in zip(lengths, repeat(1) if counts is None else counts, strict=counts is not None):
        i = bisect.bisect_left(buckets, n)
        if i == len(buckets):
            raise ValueError(f"length {n} exceeds the largest bucket ({buckets[-1]})")
        real += n * c
        padded += buckets[i] * c
    if real == 0:
        raise ValueError("no lengths given")
    return padded / (real if real_tokens is None else real_tokens)


def plan_buckets(
    lengths: Sequence[int], num_buckets: int, max_len: int, align: int = 64,
    counts: Sequence[int] | None = None,
) -> list[int]:
    """The ``num_buckets`` bucket lengths (multiples of ``align``, the last one ``max_len``) that
    minimise padded tokens over ``lengths``, each occurring ``counts[i]`` times (default: once
    each; the same plan as the lengths repeated, without the list).

    >>> plan_buckets([60, 60, 60, 500, 500], 2, 512)
    [64, 512]
    >>> plan_buckets([60, 500], 2, 512, counts=[3, 2])
    [64, 512]
    >>> plan_buckets([100] * 10 + [1000], 3, 1024, align=128)
    [128, 1024]
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if not lengths:
        raise ValueError("no lengths given")
    if counts is not None and (len(counts) != len(lengths) or min(counts) < 0):
        raise ValueError("counts must be one integer >= 0 per length")
    too_long = max(lengths)
    if too_long > max_len:
        raise ValueError(f"length {too_long} exceeds max_len ({max_len})")
    cands = sorted({min(max_len, -(-n // align) * align) for n in lengths} | {max_len})
    # count[j], total[j]: how many lengths fall in (cands[j-1], cands[j]] and their sum,
    # kept as prefix sums (count[:j+1] and total[:j+1] summed) so that cost() is O(1)
    count = [0] * (len(cands) + 1)
    total = [0] * (len(cands) + 1)
    for n, c in zip(lengths, counts or [1] * len(lengths), strict=True):
        j = bisect.bisect_left(cands, n)
        count[j + 1] += c
        total[j + 1] += n * c
    count = list(accumulate(count))
    total = list(accumulate(total))

    def cost(i: int, j: int) -> int:
        """Padding when lengths in (cands[i-1], cands[j]] all use bucket cands[j]."""
        return (count[j + 1] - count[i]) * cands[j] - (total[j + 1] - total[i])

    inf = float("inf")
    m = len(cands)
    k = min(num_buckets, m)
    # best[b][j]: least padding covering cands[0..j] with b buckets, the last at cands[j].
    best = [[inf] * m for _ in range(k + 1)]
    back = [[-1] * m for _ in range(k + 1)]
    for j in range(m):
        best[1][j] = cost(0, j)
    for b in range(2, k + 1):
        for j in range(m):
            for i in range(j):
                c = best[b - 1][i] + cost(i + 1, j)
                if c < best[b][j]:
                    best[b][j], back[b][j] = c, i
    b = min(range(1, k + 1), key=lambda b: (best[b][m - 1], b))
    out, j = [], m - 1
    while b >= 1 and j >= 0:
        out.append(cands[j])
        j, b = back[b][j], b - 1
    return sorted(out)
