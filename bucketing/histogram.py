"""Length histograms with fine, fixed bins, for planning bucket lists from Prometheus.

The server exports the two length streams of :mod:`bucketing.sample` (prompt lengths, and
prompt plus generated tokens of a finished request) as histograms whose bins are fine enough
for the planner (:func:`length_bounds`). Unlike the in-memory sample, Prometheus keeps them
summed over every replica; ``ragserve buckets plan --from`` reads them back
(:class:`BinnedLengths`).

A bin ``(lo, hi]`` stands for its upper bound ``hi``. That is exact for a bucket list whose
lengths are all multiples of the bin width: every length in the bin then needs the same
bucket (the smallest one >= ``hi``). The real tokens come from the histogram's exact sum, so
a padding ratio (padded / real tokens) does not take ``hi`` for the real length.

>>> h = LengthHistogram(length_bounds(100))
>>> for n in (5, 40, 64, 100, 101):
...     h.observe(n)
>>> b = h.snapshot()
>>> b.bounds, b.counts, b.above, b.total
((32, 64, 96, 100), (1, 2, 0, 1), 1, 310)
>>> b.cumulative()
[1, 3, 3, 4, 5]
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

#: (up to this length, bins this wide): 32 tokens to 2,048, 64 to 8,192, 256 to 32,768
FINE_BINS = ((2048, 32), (8192, 64), (32768, 256))
#: past the last FINE_BINS limit, bins per doubling of the length (the width doubles with it)
BINS_PER_DOUBLING = 32


def bin_width(start: int) -> int:
    """The width of the bin that starts at ``start`` (see :func:`length_bounds`).

    >>> [bin_width(n) for n in (0, 2016, 2048, 8192, 32768, 64512, 65536)]
    [32, 32, 64, 256, 1024, 1024, 2048]
    """
    for limit, width in FINE_BINS:
        if start < limit:
            return width
    return (1 << (start.bit_length() - 1)) // BINS_PER_DOUBLING


def length_bounds(max_model_len: int) -> list[int]:
    """The bins' upper bounds (inclusive) for a server of ``max_model_len``: every 32 tokens up
    to 2,048, every 64 up to 8,192, every 256 up to 32,768, then 32 bins per doubling (1,024
    wide up to 65,536, 2,048 up to 131,072, ...); the last bound is ``max_model_len`` itself,
    so only a length past it lands in ``+Inf``. That is 64 bounds at 2,048, 160 at 8,192,
    256 at 32,768, 320 at 131,072 and 416 at 1,048,576.

    >>> length_bounds(100)
    [32, 64, 96, 100]
    >>> b = length_bounds(8192)
    >>> len(b), b[62:66], b[-1]
    (160, [2016, 2048, 2112, 2176], 8192)
    >>> [len(length_bounds(n)) for n in (2048, 32768, 131072, 1 << 20)]
    [64, 256, 320, 416]
    """
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or \
            max_model_len < 1:
        raise ValueError(f"max_model_len must be an integer >= 1, got {max_model_len!r}")
    bounds, b = [], 0
    while b < max_model_len:
        b = min(b + bin_width(b), max_model_len)
        bounds.append(b)
    return bounds


@dataclass(frozen=True)
class BinnedLengths:
    """Lengths known by bin: ``counts[i]`` lengths in ``(bounds[i-1], bounds[i]]`` (from 0 for
    the first), ``above`` past the last bound, and ``total`` their exact sum (a Prometheus
    histogram's ``_sum``; None when unknown)."""

    bounds: tuple[int, ...]
    counts: tuple[int, ...]
    above: int = 0
    total: float | None = None

    @property
    def count(self) -> int:
        """How many lengths, in every bin and above."""
        return sum(self.counts) + self.above

    def cumulative(self) -> list[int]:
        """The lengths at or below each bound, then the count (a histogram's ``+Inf``)."""
        out, n = [], 0
        for c in (*self.counts, self.above):
            n += c
            out.append(n)
        return out

    def widths(self) -> list[int]:
        """Each bin's width.

        >>> BinnedLengths((32, 64, 100), (0, 0, 0)).widths()
        [32, 32, 36]
        """
        return [hi - lo for lo, hi in zip((0, *self.bounds), self.bounds)]

    @classmethod
    def from_cumulative(cls, buckets: Iterable[tuple[int, float]], count: float,
                        total: float | None = None) -> BinnedLengths:
        """From a Prometheus histogram: ``(upper bound, cumulative count)`` pairs (any order),
        the count of everything (``+Inf``) and the sum. ValueError if the counts are not
        cumulative.

        >>> BinnedLengths.from_cumulative([(64, 3), (32, 1)], 4, 150.0)
        BinnedLengths(bounds=(32, 64), counts=(1, 2), above=1, total=150.0)
        """
        pairs = sorted(buckets)
        bounds, counts, last = [], [], 0
        for bound, cum in (*pairs, (None, count)):
            n = round(cum)
            if n < last:
                raise ValueError("the bucket counts are not cumulative (a count decreases "
                                 f"at le={'+Inf' if bound is None else bound})")
            if bound is not None:
                if bounds and bound == bounds[-1]:
                    raise ValueError(f"le={bound} appears twice")
                bounds.append(bound)
                counts.append(n - last)
            last = n
        return cls(tuple(bounds), tuple(counts), last - sum(counts), total)

    @classmethod
    def merge(cls, parts: Sequence[BinnedLengths]) -> BinnedLengths:
        """Several histograms (replicas) as one: counts added per upper bound, ``above`` and
        the sums added (the sum is unknown if one part's is).

        >>> a = BinnedLengths((32, 64), (1, 2), 0, 100)
        >>> BinnedLengths.merge([a, BinnedLengths((32, 64, 96), (0, 1, 1), 1, 300)])
        BinnedLengths(bounds=(32, 64, 96), counts=(1, 3, 1), above=1, total=400)
        """
        by_bound: dict[int, int] = {}
        for p in parts:
            for b, c in zip(p.bounds, p.counts):
                by_bound[b] = by_bound.get(b, 0) + c
        totals = [p.total for p in parts]
        total = None if None in totals else sum(t for t in totals if t is not None)
        bounds = tuple(sorted(by_bound))
        return cls(bounds, tuple(by_bound[b] for b in bounds), sum(p.above for p in parts),
                   total)


class LengthHistogram:
    """Counts of integer lengths per bin of ``bounds`` and past the last, and their exact sum.
    O(log bins) per observation; thread-safe (the server observes while /metrics reads)."""

    def __init__(self, bounds: Sequence[int]) -> None:
        if not bounds or any(b >= c for b, c in pairwise(bounds)):
            raise ValueError("bounds must be a non-empty, strictly increasing list")
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)  # the last: past every bound
        self._total = 0
        self._lock = threading.Lock()

    def observe(self, n: int) -> None:
        """One length (an integer >= 1)."""
        i = bisect.bisect_left(self.bounds, n)
        with self._lock:
            self._counts[i] += 1
            self._total += n

    def snapshot(self) -> BinnedLengths:
        """The counts so far."""
        with self._lock:
            return BinnedLengths(self.bounds, tuple(self._counts[:-1]), self._counts[-1],
                                 self._total)


@dataclass(frozen=True)
class Lengths:
    """The lengths one bucket list is planned for: ``values[i]`` seen ``counts[i]`` times
    (None: once each). From a histogram (:meth:`from_bins`) the values are its bins' upper
    bounds, ``widths`` the bins' widths, ``real`` the true token total (its sum), and ``above``
    lengths lie past its last bound ``top``, in no bin.

    >>> raw = Lengths((100, 900, 300))
    >>> len(raw), raw.within(512)
    (3, Lengths(values=(100, 300), counts=None, real=None, widths=None, above=0, top=0))
    >>> binned = Lengths.from_bins(BinnedLengths((32, 64, 96), (2, 0, 1), 0, 120))
    >>> binned
    Lengths(values=(32, 96), counts=(2, 1), real=120, widths=(32, 32), above=0, top=96)
    >>> len(binned), binned.split(96, align=32, buckets=[96]), binned.split(96, 16, [96])
    (3, 0, 3)
    """

    values: tuple[int, ...]
    counts: tuple[int, ...] | None = None
    real: float | None = None
    widths: tuple[int, ...] | None = None
    above: int = 0
    top: int = 0

    @classmethod
    def from_bins(cls, bins: BinnedLengths | None) -> Lengths:
        """A histogram's lengths (none for None): each non-empty bin at its upper bound."""
        if bins is None:
            return cls((), (), None, ())
        kept = [(b, c, w) for b, c, w in zip(bins.bounds, bins.counts, bins.widths()) if c]
        return cls(tuple(b for b, _, _ in kept), tuple(c for _, c, _ in kept), bins.total,
                   tuple(w for _, _, w in kept), bins.above,
                   bins.bounds[-1] if bins.bounds else 0)

    def __len__(self) -> int:
        return (len(self.values) if self.counts is None else sum(self.counts)) + self.above

    @property
    def longest(self) -> int:
        """The longest length (for a histogram, the largest bound with a count), 0 if none."""
        return max(self.values, default=0)

    def within(self, max_len: int) -> Lengths:
        """The lengths up to ``max_len``. From a histogram, their real tokens are the sum's
        share in proportion to count x upper bound (exact when none is dropped), kept within
        what the bins allow.

        >>> Lengths((64, 128), (1, 1), 180, (64, 64), 0, 128).within(64).real
        60.0
        >>> Lengths((64, 128), (1, 1), 250, (64, 64), 0, 128).within(64).real
        64
        """
        keep = [i for i, n in enumerate(self.values) if n <= max_len]
        if len(keep) == len(self.values) and not self.above:
            return self
        values = tuple(self.values[i] for i in keep)
        if self.counts is None:
            return Lengths(values)
        counts = tuple(self.counts[i] for i in keep)
        widths = tuple(self.widths[i] for i in keep) if self.widths is not None else None
        real = self.real
        if real is not None:
            at_bounds = sum(n * c for n, c in zip(values, counts))
            every = sum(n * c for n, c in zip(self.values, self.counts)) + \
                self.above * (self.top + 1)
            low = sum((n - w + 1) * c for n, c, w in zip(values, counts, widths or values))
            real = min(at_bounds, max(low, real * at_bounds / every)) if every else 0
        return Lengths(values, counts, real, widths, 0, self.top)

    def split(self, max_len: int, align: int, buckets: Sequence[int]) -> int:
        """How many lengths lie in a bin whose lengths would not all run in one bucket: a
        multiple of ``align`` (a planned length) or one of ``buckets`` (the baseline) falls
        inside it. Those count at the bin's upper bound, up to a bin width too long; the rest
        are exact. 0 for lengths that are not binned."""
        if self.widths is None or self.counts is None:
            return 0

        def aligned(n: int) -> int:
            return min(max_len, -(-n // align) * align)

        out = 0
        for hi, c, w in zip(self.values, self.counts, self.widths):
            lo = hi - w
            if aligned(lo + 1) != aligned(hi) or any(lo < b < hi for b in buckets):
                out += c
        return out
