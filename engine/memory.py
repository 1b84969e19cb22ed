"""Keeping the engine's memory flat over a long run.

Under a soak (``benchmarks/soak.py``: 500 clients, prompts of every length) the engine process
grew after its warm-up; what grew was oneDNN's cache, and the heap is trimmed as well
(BENCHMARKS.md, "What grew"):

- oneDNN's primitive cache. Every distinct matmul shape (a decode step's row count, a mixed
  step's token count, a prompt's length) gets a primitive with its JIT-compiled kernel, kept up
  to oneDNN's default capacity of 1,024. :func:`bound_onednn_cache` lowers that to
  :data:`ONEDNN_CACHE_CAPACITY`. That still holds every decode shape (5 weight shapes times at
  most ``max_num_seqs`` row counts) and the token counts that mixed steps keep meeting; 256 did
  not (prefix-heavy traffic, where every mixed step has its own count, ran 13% slower), 512
  runs as fast as 1,024.
- glibc's heaps. Activations of varying sizes are freed into malloc's arenas, which keep the
  pages. :class:`HeapTrimmer` hands the free pages back (``malloc_trim``) when the engine
  has nothing to run, at most every :data:`TRIM_INTERVAL_S`. With oneDNN's cache at its default
  the trim alone left the soak's growth at 5.03%; its own share was not separated.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: oneDNN primitives kept (its default: 1,024)
ONEDNN_CACHE_CAPACITY = 512
#: the least time between two trims of the heap
TRIM_INTERVAL_S = 10.0


def bound_onednn_cache(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Cap oneDNN's primitive cache, unless ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` is set already.
    oneDNN reads the variable when it creates its first primitive, so this must run before the
    process's first matmul (the engine calls it before it loads the model)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc only (not musl, not macOS)
    except (AttributeError, OSError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


class HeapTrimmer:
    """Returns the heap's free pages to the OS when the engine goes idle (:meth:`idle`), at
    most every ``interval`` seconds; a no-op where the C library has no ``malloc_trim``."""

    def __init__(self, interval: float = TRIM_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._trim = _malloc_trim()
        self._interval = interval
        self._clock = clock
        self._last = float("-inf")
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def idle(self) -> None:
        """The engine has just run out of work: trim unless it trimmed within the interval."""
        now = self._clock()
        if self._trim is None or now - self._last < self._interval:
            return
        self._last = now
        t = time.perf_counter()
        self._trim(0)
        self.trims += 1
        log.debug("returned the heap's free pages to the OS in %.1f ms",
                  (time.perf_counter() - t) * 1e3)
