"""Prefill cost per bucket: ``t = c + a*L + b*L^2`` for a prompt run in a graph of ``L`` tokens
(fixed work, weights linear in the tokens, attention quadratic), and what a bucket list costs on
a sample of prompt lengths.

Padding alone undercounts a long bucket: with attention quadratic, a padded token costs more the
longer the graph. :func:`relative_cost` compares two lists under a cost model; the model comes
from :func:`fit_cost` over measured (length, seconds) points (``benchmarks/bucketing.py``, or a
server's own prefill steps: :class:`PrefillTimes`), else :func:`default_cost` for the device.

A length above the largest bucket raises, as in :func:`bucketing.padding_ratio`: the server
rejects such a prompt (it never chunks or truncates), so it has no prefill cost to count.

>>> cost = PrefillCost(*fit_cost([(128, 1.0), (256, 1.5), (512, 3.0)]), source="example")
>>> round(cost(1024), 3)
8.0
>>> relative_cost(TOKENS, [100, 200], [128, 256], [256])
0.75
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

#: the devices ragserve runs on (``--device``); :func:`default_cost` knows a fit for cpu. Here,
#: the lowest layer, so that ``ragserve buckets plan`` (planning/) takes the server's device
#: names without importing the server or the runtime
DEVICES = ("cpu", "cuda", "neuron")


@dataclass(frozen=True)
class PrefillCost:
    """``t = c + a*L + b*L^2``: the cost of one prefill in a graph of ``L`` tokens. Units are
    the fit's (seconds for timings; tokens for :data:`TOKENS`); only ratios are reported."""

    c: float
    a: float
    b: float
    source: str  # where the coefficients came from, said to the operator

    def __call__(self, length: float) -> float:
        return self.c + self.a * length + self.b * length * length

    def positive_up_to(self, max_len: int) -> bool:
        """Whether the cost is > 0 for every length 1..``max_len`` (a noisy fit may not be).

        >>> PrefillCost(1.0, -1.0, 0.1, "x").positive_up_to(4), TOKENS.positive_up_to(8)
        (False, True)
        """
        ends = [1.0, float(max_len)]
        if self.b > 0 and 1 < -self.a / (2 * self.b) < max_len:  # the parabola's minimum
            ends.append(-self.a / (2 * self.b))
        return all(self(x) > 0 for x in ends)

    @property
    def is_tokens(self) -> bool:
        """The padded-token proxy (cost proportional to the tokens a graph computes)."""
        return (self.c, self.a, self.b) == (0.0, 1.0, 0.0)


#: cost proportional to padded tokens (``--cost-model tokens``; :func:`default_cost` gives the
#: same coefficients, labelled, for a device with no recorded fit)
TOKENS = PrefillCost(0.0, 1.0, 0.0, "padded tokens (cost proportional to the tokens computed)")

#: BENCHMARKS.md, "Bucketing": benchmarks/bucketing.py's fit (prefill_cost_fit_ms) of
#: SmolLM2-135M-Instruct, bfloat16, on the 2-core AMD EPYC dev VM: 135 ms + 0.21 ms/token * L +
#: 0.00047 ms/token^2 * L^2 (attention is 78% of a 2048-token prefill there).
CPU_COST = PrefillCost(0.135, 0.21e-3, 0.47e-6,
                       "cpu default: benchmarks/bucketing.py's fit in BENCHMARKS.md, "
                       "SmolLM2-135M-Instruct on a 2-core EPYC")


def default_cost(device: str | None) -> PrefillCost:
    """The documented cost shape for ``device`` when no timings of the server are at hand:
    the benchmark's fit on CPU; the padded-token proxy, labelled so, elsewhere (no prefill fit
    of Neuron or CUDA is recorded).

    >>> default_cost("cpu") is CPU_COST, default_cost("neuron").source
    (True, 'padded tokens (prefill cost on neuron unknown)')
    """
    if device == "cpu":
        return CPU_COST
    where = f"on {device}" if device else "of this device"
    return PrefillCost(0.0, 1.0, 0.0, f"padded tokens (prefill cost {where} unknown)")


def fit_cost(points: Iterable[tuple[float, float]]) -> tuple[float, float, float]:
    """``(c, a, b)``: least squares ``t = c + a*L + b*L^2`` through ``(L, t)`` points; needs
    three distinct lengths. Pure Python (normal equations on lengths scaled to at most 1).

    >>> [round(x, 6) for x in fit_cost([(1, 3), (2, 7), (3, 13), (4, 21)])]
    [1.0, 1.0, 1.0]
    """
    pts = [(float(n), float(t)) for n, t in points]
    if len({n for n, _ in pts}) < 3:
        raise ValueError(f"fitting c + a*L + b*L^2 needs 3 distinct lengths, got "
                         f"{len({n for n, _ in pts})}")
    scale = max(abs(n) for n, _ in pts)
    rows = [((1.0, n / scale, (n / scale) ** 2), t) for n, t in pts]
    # [A^T A | A^T t], solved by Gaussian elimination with partial pivoting
    m = [[sum(r[i] * r[j] for r, _ in rows) for j in range(3)] + [sum(r[i] * t for r, t in rows)]
         for i in range(3)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda i: abs(m[i][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for i in range(col + 1, 3):
            f = m[i][col] / m[col][col]
            m[i] = [x - f * y for x, y in zip(m[i], m[col])]
    x = [0.0] * 3
    for i in (2, 1, 0):
        x[i] = (m[i][3] - sum(m[i][j] * x[j] for j in range(i + 1, 3))) / m[i][i]
    return x[0], x[1] / scale, x[2] / scale**2


def mean_cost(cost: PrefillCost, lengths: Iterable[int], buckets: Sequence[int],
              counts: Iterable[int] | None = None) -> float:
    """The mean cost of the bucket each length runs in (the smallest that holds it; ``buckets``
    sorted), each length occurring ``counts[i]`` times (default: once each). A length above the
    largest bucket raises, as in :func:`bucketing.padding_ratio`.

    >>> mean_cost(TOKENS, [100, 200], [128, 256])
    192.0
    >>> mean_cost(TOKENS, [100, 200], [128, 256], counts=[3, 1])
    160.0
    """
    total, count = 0.0, 0
    for n, c in zip(lengths, repeat(1) if counts is None else counts, strict=counts is not None):
        i = bisect.bisect_left(buckets, n)
        if i == len(buckets):
            raise ValueError(f"length {n} exceeds the largest bucket ({buckets[-1]})")
        total += cost(buckets[i]) * c
        count += c
    if count == 0:
        raise ValueError("no lengths given")
    return total / count


def relative_cost(cost: PrefillCost, lengths: Sequence[int], buckets: Sequence[int],
                  baseline: Sequence[int], counts: Sequence[int] | None = None) -> float:
    """Mean prefill cost of ``lengths`` (each ``counts[i]`` times, default once) with
    ``buckets`` / with ``baseline`` (1.0: the same; below 1: cheaper). With :data:`TOKENS` it
    is the ratio of the two padding ratios.

    >>> relative_cost(TOKENS, [100, 200], [128, 256], [128, 256])
    1.0
    """
    return (mean_cost(cost, lengths, buckets, counts)
            / mean_cost(cost, lengths, baseline, counts))


class PrefillTimes:
    """The time of the server's one-prompt prefill steps, per prefill bucket: a step count and
    the sums of computed tokens and seconds. One entry per bucket length, updated in place, so
    memory stays bounded by the bucket list however long the server runs. Thread-safe: the
    engine side records while a route reads.

    ``tokens`` is what the step computed: the bucket length in a static graph, the prompt
    length where prefill runs exact shapes, so a fit over (mean tokens, mean seconds) holds for
    both.

    >>> t = PrefillTimes()
    >>> t.observe(128, 128, 0.25)
    >>> t.observe(128, 128, 0.35)
    >>> t.to_json()
    {'128': {'count': 2, 'mean_tokens': 128.0, 'mean_s': 0.3}}
    >>> PrefillTimes.from_json(t.to_json()).points()
    [(128.0, 0.3)]
    """

    def __init__(self) -> None:
        self._sums: dict[int, list[float]] = {}  # bucket -> [steps, tokens, seconds]
        self._lock = threading.Lock()

    def observe(self, bucket: int, tokens: int, seconds: float) -> None:
        """One prefill step of one prompt in ``bucket``: ``tokens`` computed in ``seconds``."""
        with self._lock:
            s = self._sums.get(bucket)
            if s is None:
                s = self._sums[bucket] = [0, 0, 0.0]
            s[0] += 1
            s[1] += tokens
            s[2] += seconds

    def __len__(self) -> int:
        with self._lock:
            return len(self._sums)

    @property
    def buckets(self) -> list[int]:
        """The bucket lengths timed, ascending."""
        with self._lock:
            return sorted(self._sums)

    @property
    def steps(self) -> int:
        """How many steps were recorded, over every bucket."""
        with self._lock:
            return int(sum(s[0] for s in self._sums.values()))

    def points(self) -> list[tuple[float, float]]:
        """``(mean tokens, mean seconds)`` per bucket, by bucket length (what :func:`fit_cost`
        takes)."""
        with self._lock:
            return [(s[1] / s[0], s[2] / s[0]) for _, s in sorted(self._sums.items())]

    def to_json(self) -> dict[str, dict[str, Any]]:
        """``{"128": {"count": n, "mean_tokens": x, "mean_s": y}, ...}`` by bucket length."""
        with self._lock:
            return {str(b): {"count": int(s[0]), "mean_tokens": round(s[1] / s[0], 1),
                             "mean_s": round(s[2] / s[0], 6)}
                    for b, s in sorted(self._sums.items())}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> PrefillTimes:
        """Back from :meth:`to_json`'s object (a ``GET /v1/buckets`` body's
        ``prefill_seconds_by_bucket``); ValueError says what is wrong.

        >>> PrefillTimes.from_json({"64": {"count": 0, "mean_tokens": 64, "mean_s": 1}})
        Traceback (most recent call last):
        ...
        ValueError: prefill_seconds_by_bucket["64"]: count must be an integer >= 1
        """
        if not isinstance(obj, Mapping):
            raise ValueError("prefill_seconds_by_bucket must be an object")
        t = cls()
        for key, v in obj.items():
            where = f'prefill_seconds_by_bucket["{key}"]'
            if not str(key).isdigit() or int(key) < 1:
                raise ValueError(f"{where}: the key must be a bucket length >= 1")
            if not isinstance(v, Mapping):
                raise ValueError(f"{where}: expected an object")
            n, tokens, seconds = v.get("count"), v.get("mean_tokens"), v.get("mean_s")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"{where}: count must be an integer >= 1")
            for name, x in (("mean_tokens", tokens), ("mean_s", seconds)):
                if not isinstance(x, (int, float)) or isinstance(x, bool) or not x > 0:
                    raise ValueError(f"{where}: {name} must be a number > 0")
            t._sums[int(key)] = [n, tokens * n, seconds * n]
        return t
