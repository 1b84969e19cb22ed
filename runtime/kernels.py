"""Per-machine kernel choice for the PyTorch backend.

The fastest way to run a shape differs from CPU to CPU (BENCHMARKS.md: a packed oneDNN GEMV
reads ~1.6x faster than ``F.linear`` on one Zen 5, while on a Xeon an M=8 GEMM over the same
weight ran at a third of the GEMV's bandwidth). So nothing here is a constant tuned to one CPU:
the candidates for each shape class are timed on this machine, on the model's own weights and
the shapes the server will run, and the fastest is used. The answer is cached per (CPU, torch,
threads, device, dtypes, model shape, slots), so only the first start on a machine pays.

Shape classes and their candidates:

- ``prefill_linear`` / ``decode_linear``: every matmul of a prefill (M = prompt tokens) or a
  decode step (M = running rows): ``packed`` (weights reordered once for oneDNN) or ``plain``
  (``F.linear``). Both copies are kept only when the two phases choose differently.
- ``decode_attention``: one query per row against the cache: ``matmul`` (``k @ q^T``, float32
  softmax), ``sdpa`` (``scaled_dot_product_attention`` with a mask) or ``grouped`` (the same
  with each KV head's query heads as its query sequence: no K/V repeat).
- ``decode_step``: the whole decode forward ``eager`` or ``compiled`` (``torch.compile``
  with dynamic shapes: one graph for every batch size from 2 up and every context length, one
  more for batch 1; fused elementwise ops, the chosen linear kept as an opaque op). It compiles
  before the engine reports ready, with inductor's cache under the project's cache dir, and is
  used only if it measures faster (a cached choice of eager skips the compile).

``--kernels`` (``RAGSERVE_KERNELS``) is ``auto`` or ``key=value`` items that pin some choices and
leave the rest to timing: ``linear=plain`` (both phases), ``attention=sdpa``, ``step=compiled``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

LINEAR = ("packed", "plain")
ATTENTION = ("matmul", "sdpa", "grouped")
STEP = ("eager", "compiled")
CHOICES: dict[str, tuple[str, ...]] = {
    "prefill_linear": LINEAR,
    "decode_linear": LINEAR,
    "decode_attention": ATTENTION,
    "decode_step": STEP,
}
ALIASES: dict[str, tuple[str, ...]] = {
    "linear": ("prefill_linear", "decode_linear"),
    "attention": ("decode_attention",),
    "step": ("decode_step",),
}
CACHE_VERSION = 1


@dataclass(frozen=True)
class Kernels:
    """The implementation used for each shape class."""

    prefill_linear: str = "plain"
    decode_linear: str = "plain"
    decode_attention: str = "matmul"
    decode_step: str = "eager"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value not in CHOICES[f.name]:
                raise ValueError(f"{f.name} must be one of {', '.join(CHOICES[f.name])}, "
                                 f"got {value!r}")

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


def parse_kernels(spec: str) -> dict[str, str]:
    """The choices ``spec`` pins: ``auto`` (or empty) pins none.

    >>> parse_kernels("auto")
    {}
    >>> parse_kernels("linear=plain, step=compiled")
    {'prefill_linear': 'plain', 'decode_linear': 'plain', 'decode_step': 'compiled'}
    >>> parse_kernels("attention=fast")
    Traceback (most recent call last):
    ...
    ValueError: --kernels: attention must be one of matmul, sdpa, grouped, got 'fast'
    """
    spec = spec.strip()
    if spec in ("", "auto"):
        return {}
    pinned: dict[str, str] = {}
    for item in spec.split(","):
        key, sep, value = (s.strip() for s in item.partition("="))
        names = ALIASES.get(key, (key,) if key in CHOICES else ())
        if not sep or not names:
            known = ", ".join([*ALIASES, *CHOICES])
            raise ValueError(f"--kernels takes 'auto' or KEY=VALUE items separated by commas "
                             f"(keys: {known}), got {item.strip()!r}")
        allowed = CHOICES[names[0]]
        if value not in allowed:
            raise ValueError(f"--kernels: {key} must be one of {', '.join(allowed)}, "
                             f"got {value!r}")
        pinned.update(dict.fromkeys(names, value))
    return pinned


def available(device: torch.device, dtype: torch.dtype = torch.float32
              ) -> dict[str, tuple[str, ...]]:
    """The candidates this device can run on weights of ``dtype``."""
    from runtime.model import onednn_packing_available

    packs = device.type == "cpu" and onednn_packing_available(dtype)
    linear = LINEAR if packs else ("plain",)
    step = STEP if device.type in ("cpu", "cuda") else ("eager",)
    return {"prefill_linear": linear, "decode_linear": linear,
            "decode_attention": ATTENTION, "decode_step": step}


def check_pinned(pinned: dict[str, str], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
    """Refuse a pinned choice this device cannot run (rather than silently ignoring it)."""
    can = available(device, dtype)
    for key, value in pinned.items():
        if value not in can[key]:
            raise ValueError(f"--kernels {key}={value} is not available on device "
                             f"{device.type} in {dtype} (available: {', '.join(can[key])})")


# -- timing --------------------------------------------------------------------------------


def time_calls(candidates: dict[str, Callable[[], Any]], reps: int = 7) -> dict[str, float]:
    """Median seconds per call of each candidate, calls interleaved round-robin so a noisy
    neighbour slows every candidate alike; one untimed call each first."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(reps):
        for key, fn in candidates.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def time_summed(rounds: list[dict[str, Callable[[], Any]]], reps: int = 5) -> dict[str, float]:
    """:func:`time_calls` over several shapes (one dict of candidates each), summed per
    candidate with every shape weighted equally: each shape's times are scaled so that its
    fastest candidate takes the mean of the shapes' fastest times. (A plain sum lets the
    largest shape decide alone: at 1, 16 and 64 rows, the 64-row timing would.) A candidate
    fastest on every shape scores its plain sum."""
    times = [time_calls(candidates, reps) for candidates in rounds]
    best = [min(t.values()) for t in times]
    mean_best = sum(best) / len(best)
    total: dict[str, float] = {}
    for t, b in zip(times, best):
        for key, seconds in t.items():
            total[key] = total.get(key, 0.0) + seconds * mean_best / b
    return total


def fastest(times: dict[str, float]) -> str:
    return min(times, key=times.__getitem__)


# -- the cache -----------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cache_key(model: torch.nn.Module, *, device: torch.device, kv_dtype: torch.dtype,
              max_num_seqs: int, max_model_len: int) -> dict[str, Any]:
    """Everything a timing depends on."""
    from runtime.loader import cpu_has_native_bf16

    a = model.args
    return {
        "version": CACHE_VERSION,
        "candidates": {k: list(v) for k, v in CHOICES.items()},  # a new candidate: time again
        "cpu": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "native_bf16": cpu_has_native_bf16(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device.type,
        "dtype": str(model.tok_embeddings.weight.dtype),
        "kv_dtype": str(kv_dtype),
        "shape": [a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim,
                  a.intermediate_size, a.vocab_size],
        "max_num_seqs": max_num_seqs,
        "max_model_len": max_model_len,
    }


def cache_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / "kernels" / f"{digest}.json"


def load_cached(path: Path, key: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """The cached choices and timings for ``key`` (empty when absent or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, {}
    if data.get("key") != key:
        return {}, {}
    choices = {k: v for k, v in data.get("choices", {}).items()
               if k in CHOICES and v in CHOICES[k]}
    return choices, data.get("timings", {})


def save_cached(path: Path, key: dict[str, Any], choices: dict[str, str],
                timings: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "choices": choices, "timings": timings},
                                  indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:  # a read-only cache costs a re-tune next start, nothing else
        log.warning("could not save the kernel choice to %s: %s", path, e)


# -- the compiled step's opaque linear -----------------------------------------------------

_LINEARS: list[Any] = []
_registered = False


def register_linear(module: Any) -> int:
    """An id for ``module`` inside compiled graphs (weights stay out of the graph). Held
    weakly: a model that goes away is not kept alive by its graphs' registry."""
    _LINEARS.append(weakref.ref(module))
    return len(_LINEARS) - 1


def register_ops() -> None:
    """``ragserve::linear``: a Linear called from a compiled graph. Inductor fuses everything
    around it and calls it as is, so the compiled step uses the same (timed) GEMM as eager,
    packed weights included, and its FX graph stays cacheable across processes (no frozen
    constants)."""
    global _registered
    if _registered:
        return

    @torch.library.custom_op("ragserve::linear", mutates_args=())
    def linear(x: torch.Tensor, wid: int, out_features: int) -> torch.Tensor:
        return _LINEARS[wid]().run(x)

    @linear.register_fake
    def _(x: torch.Tensor, wid: int, out_features: int) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    _registered = True


def inductor_cache_dir(cache_dir: Path) -> None:
    """Persist inductor's compiled kernels under the project's cache dir (unless the user
    chose a place with ``TORCHINDUCTOR_CACHE_DIR``)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))


def merge(base: Kernels, choices: dict[str, str]) -> Kernels:
    return replace(base, **{k: v for k, v in choices.items() if k in CHOICES})
