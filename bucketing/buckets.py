"""Bucket lists and "smallest bucket >= n" selection for static-shape graphs.

Neuron graphs have fixed shapes, so the runtime compiles one graph per bucket and every batch
is padded up to one of them. Three lists describe the graphs:

- ``context_encoding_buckets``: padded prompt lengths for prefill graphs;
- ``token_generation_buckets``: how much of the KV cache a decode graph reads;
- batch buckets: how many rows a prefill or decode graph takes.

Edge cases are chosen on purpose: an input exactly equal to a bucket uses that bucket, and an
input past the largest bucket raises :class:`BucketError` naming the limit (transformers-neuronx
silently clamps, NxD Inference moves an exact fit up one bucket; we do neither).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

PREFILL = "prefill"
DECODE = "decode"
PHASES = (PREFILL, DECODE)

#: the smallest bucket of the default lists (:meth:`BucketConfig.default`)
DEFAULT_MIN_BUCKET = 128

#: the flags that set the two lists (``ragserve serve``, ``generate``, ``run-batch``) and their
#: ``RAGSERVE_*`` variables (``server.config.env_name`` of the flags). Here, below both, so that
#: the server declares them and ``ragserve buckets plan`` prints them without importing it.
CONTEXT_ENCODING_FLAG = "--context-encoding-buckets"
TOKEN_GENERATION_FLAG = "--token-generation-buckets"
CONTEXT_ENCODING_ENV = "RAGSERVE_CONTEXT_ENCODING_BUCKETS"
TOKEN_GENERATION_ENV = "RAGSERVE_TOKEN_GENERATION_BUCKETS"


class BucketError(ValueError):
    """A length or batch size past the largest bucket; the message names the limit."""

    def __init__(self, what: str, n: int, largest: int) -> None:
        super().__init__(f"{what} {n} exceeds the largest bucket ({largest})")
        self.what = what
        self.n = n
        self.largest = largest


@dataclass(frozen=True, order=True)
class Bucket:
    """One static graph shape: ``batch_size`` rows of ``seq_len``.

    For prefill ``seq_len`` is the padded prompt length; for decode it is the KV context length
    the graph attends over (each row feeds one token).
    """

    phase: str
    batch_size: int
    seq_len: int

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"bucket sizes must be >= 1, got {self.batch_size}x{self.seq_len}")

    @property
    def input_tokens(self) -> int:
        """Tokens the graph processes in one call (padding included)."""
        return self.batch_size * (self.seq_len if self.phase == PREFILL else 1)

    def __str__(self) -> str:
        return f"{self.phase}[{self.batch_size}x{self.seq_len}]"


def generate_buckets(min_len: int, max_len: int) -> list[int]:
    """``min_len`` doubled until it comes within a factor sqrt(2) of ``max_len``, then ``max_len``.

    ``max_len`` is always the last bucket and replaces the power of two nearest to it, so no
    bucket sits right under the maximum (the spacing NxD Inference's ``generate_buckets`` uses).

    >>> generate_buckets(128, 513)
    [128, 256, 513]
    >>> generate_buckets(128, 512)
    [128, 256, 512]
    >>> generate_buckets(128, 700)
    [128, 256, 700]
    >>> generate_buckets(128, 800)
    [128, 256, 512, 800]
    >>> generate_buckets(1, 12)
    [1, 2, 4, 8, 12]
    >>> generate_buckets(128, 100)
    [100]
    """
    _check_positive("min_len", min_len)
    _check_positive("max_len", max_len)
    out = []
    size = min_len
    while size * size * 2 <= max_len * max_len:  # size <= max_len / sqrt(2), in integers
        out.append(size)
        size *= 2
    out.append(max_len)
    return out


def generate_dense_buckets(min_len: int, max_len: int, per_octave: int = 3) -> list[int]:
    """``per_octave`` geometrically spaced buckets per doubling, rounded to a multiple of
    ``min_len // 4``; ``max_len`` is the last and replaces the nearest point (as in
    :func:`generate_buckets`).

    Prefill cost grows faster than the length (attention is quadratic), so padding a prompt up
    to a bucket costs more than its padded-token count suggests. On a uniform 50..2000 trace,
    powers of two pad ~1.35x, three per octave ~1.12x, for 13 graphs up to 2048 instead of 5
    (BENCHMARKS.md, bucketing).

    >>> generate_dense_buckets(128, 2048)
    [128, 160, 192, 256, 320, 416, 512, 640, 800, 1024, 1280, 1632, 2048]
    >>> generate_dense_buckets(128, 2048, per_octave=1) == generate_buckets(128, 2048)
    True
    >>> generate_dense_buckets(128, 1000)
    [128, 160, 192, 256, 320, 416, 512, 640, 800, 1000]
    >>> generate_dense_buckets(128, 128)
    [128]
    """
    _check_positive("min_len", min_len)
    _check_positive("max_len", max_len)
    _check_positive("per_octave", per_octave)
    align = max(1, min_len // 4)
    out = []
    i = 0
    # a point enters only if it sits below max_len by at least half a step (geometrically)
    while (x := min_len * 2 ** (i / per_octave)) * 2 ** (0.5 / per_octave) <= max_len:
        out.append(max(min_len, round(x / align) * align))
        i += 1
    return sorted(set(out) - {max_len} | {max_len})


def select(buckets: Sequence[int], n: int, what: str = "length") -> int:
    """The smallest bucket >= ``n``; exactly equal uses that bucket.

    >>> select([128, 256, 512], 128)
    128
    >>> select([128, 256, 512], 129)
    256
    >>> select([128, 256, 512], 1)
    128
    >>> select([128, 256, 512], 513)
    Traceback (most recent call last):
    ...
    bucketing.buckets.BucketError: length 513 exceeds the largest bucket (512)
    """
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise BucketError(what, n, buckets[-1])
    return buckets[i]


def validate_buckets(name: str, buckets: Sequence[int]) -> tuple[int, ...]:
    """``buckets`` as a tuple, checked non-empty, positive and strictly increasing."""
    if not buckets:
        raise ValueError(f"{name} must not be empty")
    for b in buckets:
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ValueError(f"{name} must hold positive integers, got {b!r}")
    if any(a >= b for a, b in itertools.pairwise(buckets)):
        raise ValueError(f"{name} must be strictly increasing, got {list(buckets)}")
    return tuple(buckets)


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class BucketConfig:
    """Every static graph shape the runtime prepares, and selection among them.

    ``token_generation_buckets[-1]`` must equal ``max_model_len`` (a sequence may grow to that
    length and its decode must still find a graph); prefill buckets must not exceed it.
    """

    max_model_len: int
    max_num_seqs: int
    context_encoding_buckets: tuple[int, ...]
    token_generation_buckets: tuple[int, ...]
    decode_batch_buckets: tuple[int, ...]
    prefill_batch_buckets: tuple[int, ...] = (1,)
    max_prefill_tokens: int = field(default=0)

    def __post_init__(self) -> None:
        _check_positive("max_model_len", self.max_model_len)
        _check_positive("max_num_seqs", self.max_num_seqs)
        for name in (
            "context_encoding_buckets",
            "token_generation_buckets",
            "decode_batch_buckets",
            "prefill_batch_buckets",
        ):
            object.__setattr__(self, name, validate_buckets(name, getattr(self, name)))
        if self.context_encoding_buckets[-1] > self.max_model_len:
            raise ValueError(
                f"largest context_encoding_bucket ({self.context_encoding_buckets[-1]}) "
                f"exceeds max_model_len ({self.max_model_len})"
            )
        if self.token_generation_buckets[-1] != self.max_model_len:
            raise ValueError(
                f"largest token_generation_bucket ({self.token_generation_buckets[-1]}) "
                f"must equal max_model_len ({self.max_model_len})"
            )
        if self.decode_batch_buckets[-1] != self.max_num_seqs:
            raise ValueError(
                f"largest decode batch bucket ({self.decode_batch_buckets[-1]}) "
                f"must equal max_num_seqs ({self.max_num_seqs})"
            )
        if self.prefill_batch_buckets[-1] > self.max_num_seqs:
            raise ValueError(
                f"largest prefill batch bucket ({self.prefill_batch_buckets[-1]}) "
                f"exceeds max_num_seqs ({self.max_num_seqs})"
            )
        if self.max_prefill_tokens == 0:
            largest = self.context_encoding_buckets[-1]
            object.__setattr__(self, "max_prefill_tokens", largest)
        if self.max_prefill_tokens < self.context_encoding_buckets[-1]:
            raise ValueError(
                f"max_prefill_tokens ({self.max_prefill_tokens}) must be >= the largest "
                f"context_encoding_bucket ({self.context_encoding_buckets[-1]})"
            )

    @classmethod
    def default(
        cls,
        max_model_len: int,
        max_num_seqs: int,
        *,
        min_bucket: int = DEFAULT_MIN_BUCKET,
        context_encoding_buckets: Sequence[int] | None = None,
        token_generation_buckets: Sequence[int] | None = None,
        max_prefill_batch: int = 4,
        max_prefill_tokens: int = 0,
    ) -> BucketConfig:
        """Dense prefill buckets, power-of-two decode buckets, power-of-two batch buckets.

        Prefill padding is paid in compute on every prompt, so its list is dense (three per
        octave); decode padding only lengthens the KV read, so powers of two are enough there.
        """
        ce = context_encoding_buckets or generate_dense_buckets(
            min(min_bucket, max_model_len), max_model_len
        )
        tg = token_generation_buckets or generate_buckets(
            min(min_bucket, max_model_len), max_model_len
        )
        return cls(
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            context_encoding_buckets=tuple(ce),
            token_generation_buckets=tuple(tg),
            decode_batch_buckets=tuple(generate_buckets(1, max_num_seqs)),
            prefill_batch_buckets=tuple(generate_buckets(1, min(max_prefill_batch, max_num_seqs))),
            max_prefill_tokens=max_prefill_tokens,
        )

    @property
    def max_prompt_len(self) -> int:
        """The longest prompt a prefill graph takes."""
        return self.context_encoding_buckets[-1]

    def prefill(self, prompt_len: int, num_seqs: int = 1) -> Bucket:
        """The prefill graph for ``num_seqs`` prompts whose longest is ``prompt_len`` tokens."""
        return Bucket(
            PREFILL,
            select(self.prefill_batch_buckets, num_seqs, "prefill batch size"),
            select(self.context_encoding_buckets, prompt_len, "prompt length"),
        )

    def decode(self, context_len: int, num_seqs: int) -> Bucket:
        """The decode graph for ``num_seqs`` rows whose longest context is ``context_len``."""
        return Bucket(
            DECODE,
            select(self.decode_batch_buckets, num_seqs, "decode batch size"),
            select(self.token_generation_buckets, context_len, "context length"),
        )

    def all_buckets(self) -> list[Bucket]:
        """Every graph shape, prefill first: what warm-up (or Neuron compilation) prepares."""
        pre = [
            Bucket(PREFILL, b, s)
            for b in self.prefill_batch_buckets
            for s in self.context_encoding_buckets
            if b == 1 or b * s <= self.max_prefill_tokens
        ]
        dec = [
            Bucket(DECODE, b, s)
            for b in self.decode_batch_buckets
            for s in self.token_generation_buckets
        ]
        return pre + dec
