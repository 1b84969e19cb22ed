"""The Neuron backend: transformers-neuronx's ``LlamaForSampling`` with continuous batching.

The only module that imports Neuron packages, and only inside :func:`_import_neuron`.
Written from aws-neuron/transformers-neuronx at commit 1ade6d74224a89fb6366ded52153e2f32781e20d
(version 0.13.x):

- ``llama/model.py`` ``LlamaForSampling.__init__(config, *, n_positions, batch_size, amp,
  tp_degree, context_length_estimate, neuron_config)``; ``forward(input_ids, cache_ids,
  start_ids)`` returns float32 logits ``[batch, vocab]``;
- ``module.py`` ``from_pretrained(path, **kwargs)`` asserts ``batch_size ==
  batch_size_for_shared_caches`` under continuous batching, and that a BSH *cache* layout is
  single-bucket (so we keep the default SBH cache layout);
- ``config.py`` ``NeuronConfig(continuous_batching=ContinuousBatchingConfig(
  batch_size_for_shared_caches=N), attention_layout, collectives_layout, fuse_qkv, padding_side,
  cast_logits_dtype)``; continuous batching forces right padding and 2-D cache ids;
- ``bucket.py`` ``token_sizes`` / ``context_sizes`` take our lists only when they are ``list``
  (a tuple falls through to other rules), so lists are passed;
- ``base.py`` ``save(directory)`` after ``to_neuron()`` writes the compiled NEFFs;
  ``load(directory)`` before ``to_neuron()`` makes it load them instead of compiling;
  ``_prepare_for_continuous_batching`` (context encoding when ``n_tokens > 1`` and the first cache
  id is 0, one row per context graph; token generation scatters rows by ``seq_ids`` into the full
  ``batch_size_for_shared_caches`` batch, filling the rest with token 0 at position 0).

and from vLLM's former in-tree path: ``vllm/model_executor/model_loader/neuron.py`` (commit
04d6361acb2bc9bac95802bacbfbff0d95238a16: the keyword arguments and default NeuronConfig) and
``vllm/worker/neuron_model_runner.py`` (commit 01688d507b83a7a1f26302aa7175da16be6d9ce2:
``model(input_ids, cache_ids=positions, start_ids=input_block_ids)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from bucketing import BucketConfig

log = logging.getLogger(__name__)

NEURON_PACKAGES = ("transformers-neuronx", "neuronx-cc", "torch-neuronx")
CACHE_FORMAT = 1  # bump when the cache layout or the meaning of a field changes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
AMP = {
    "bfloat16": "bf16", "bf16": "bf16",
    "float16": "f16", "fp16": "f16", "half": "f16",
    "float32": "f32", "fp32": "f32", "float": "f32",
}
DTYPE_NAMES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}

ProgressCallback = Callable[[str, float], None]


class NeuronUnavailableError(RuntimeError):
    """transformers-neuronx (and the rest of the Neuron SDK) cannot be imported here."""


# -- configuration translation (pure) ----------------------------------------------------------


@dataclass(frozen=True)
class NeuronSettings:
    """Everything a compiled graph set depends on, besides the model itself."""

    batch_size: int  # max_num_seqs: KV-cache slots (batch_size_for_shared_caches)
    tp_degree: int
    amp: str  # 'bf16' | 'f16' | 'f32'
    max_model_len: int
    context_encoding_buckets: tuple[int, ...]
    token_generation_buckets: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return DTYPE_NAMES[self.amp]

    @classmethod
    def create(cls, buckets: BucketConfig, *, tp_degree: int, dtype: str,
               hf_config: dict[str, Any], kv_cache_dtype: str = "auto") -> NeuronSettings:
        if tp_degree < 1:
            raise ValueError(f"--tensor-parallel-size must be >= 1, got {tp_degree}")
        if buckets.context_encoding_buckets[0] < 2:
            raise ValueError("context_encoding_buckets must be >= 2 (a 1-token graph is decode)")
        amp = resolve_amp(dtype, hf_config)
        if kv_cache_dtype != "auto" and AMP.get(kv_cache_dtype) != amp:
            raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} is not supported on Neuron: "
                             f"transformers-neuronx keeps the KV cache in the model dtype "
                             f"({DTYPE_NAMES[amp]}); use --kv-cache-dtype auto")
        return cls(buckets.max_num_seqs, tp_degree, amp, buckets.max_model_len,
                   tuple(buckets.context_encoding_buckets),
                   tuple(buckets.token_generation_buckets))


def resolve_amp(dtype: str, hf_config: dict[str, Any]) -> str:
    """``--dtype`` as transformers-neuronx's ``amp``; ``auto`` takes the checkpoint's
    ``torch_dtype`` (bfloat16 for Llama 3), else bf16 (Neuron's native matmul type)."""
    if dtype == "auto":
        return AMP.get(str(hf_config.get("torch_dtype", "bfloat16")), "bf16")
    if dtype not in AMP:
        raise ValueError(f"--dtype must be auto or one of {', '.join(AMP)}, got {dtype!r}")
    return AMP[dtype]


def neuron_config_fields(s: NeuronSettings) -> dict[str, Any]:
    """``NeuronConfig`` keyword arguments as plain data (``continuous_batching`` holds the
    ``ContinuousBatchingConfig`` keyword arguments). vLLM's defaults: BSH attention and
    collectives layouts, fused QKV; the cache layout stays SBH, the only one that supports more
    than one bucket."""
    return {
        "continuous_batching": {"batch_size_for_shared_caches": s.batch_size},
        "attention_layout": "BSH",
        "collectives_layout": "BSH",
        "fuse_qkv": True,
        "padding_side": "right",
        "cast_logits_dtype": "float32",
    }


def neuron_kwargs(s: NeuronSettings) -> dict[str, Any]:
    """Keyword arguments for ``LlamaForSampling.from_pretrained(model_dir, **kwargs)``;
    ``neuron_config`` is the plain dict of :func:`neuron_config_fields`, turned into a real
    ``NeuronConfig`` only where the package is imported."""
    return {
        "batch_size": s.batch_size,
        "tp_degree": s.tp_degree,
        "amp": s.amp,
        "n_positions": list(s.token_generation_buckets),
        "context_length_estimate": list(s.context_encoding_buckets),
        "neuron_config": neuron_config_fields(s),
    }


# -- validation (before any Neuron import) ----------------------------------------------------


def detect_neuron_cores() -> int | None:
    """NeuronCores on this machine: ``neuron-ls --json-output``, else ``/dev/neuron*`` devices
    x 2 (inf2 and trn1 devices hold two NeuronCore-v2 each); None when neither answers."""
    exe = shutil.which("neuron-ls")
    if exe is not None:
        try:
            out = subprocess.run([exe, "--json-output"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout
            return sum(int(d["nc_count"]) for d in json.loads(out))
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
            log.warning("neuron-ls --json-output gave no core count; counting /dev/neuron*")
    devices = [p for p in Path("/dev").glob("neuron*") if re.fullmatch(r"neuron\d+", p.name)]
    return 2 * len(devices) if devices else None


def validate(settings: NeuronSettings, hf_config: dict[str, Any],
             cores: int | None = None) -> None:
    """Every check that can fail before compiling; raises ``NeuronConfigError`` naming the
    number and the fix. ``cores``: this instance's NeuronCores, when known."""
    from runtime import neuron_plan

    if cores is not None and settings.tp_degree > cores:
        raise neuron_plan.NeuronConfigError(
            f"--tensor-parallel-size {settings.tp_degree} needs {settings.tp_degree} "
            f"NeuronCores, but this instance has {cores}: use --tensor-parallel-size <= {cores} "
            "or a larger instance (inf2.24xlarge has 12, inf2.48xlarge 24, trn1.32xlarge 32)")
    shape = neuron_plan.ModelShape.from_config(hf_config)
    est = neuron_plan.validate(
        shape, tp_degree=settings.tp_degree, batch_size=settings.batch_size,
        max_model_len=settings.max_model_len,
        context_encoding_buckets=list(settings.context_encoding_buckets),
        token_generation_buckets=list(settings.token_generation_buckets),
        dtype=settings.dtype, instance=None,
    )
    log.info("Neuron memory estimate: %.1f GiB per NeuronCore at tp %d (of %.1f GiB HBM)",
             est.total / 2**30, settings.tp_degree, est.hbm / 2**30)


# -- the compiled-graph cache ------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    out = {}
    for name in NEURON_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def model_identity(model_dir: Path) -> dict[str, Any]:
    """The model as the cache sees it: config.json's hash and each weight file's name, size and
    modification time (hashing 16 GB of weights on every start would cost minutes)."""
    weights = []
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json")):
            st = f.stat()
            weights.append([f.name, st.st_size, st.st_mtime_ns])
    config = (model_dir / "config.json").read_bytes()
    return {"config_sha256": hashlib.sha256(config).hexdigest(), "weights": weights}


def cache_fields(settings: NeuronSettings, model_dir: Path,
                 versions: dict[str, str] | None = None) -> dict[str, Any]:
    """What a compiled graph set depends on, as JSON-ready data (stored in meta.json)."""
    return {
        "format": CACHE_FORMAT,
        "model": model_identity(model_dir),
        **{k: list(v) if isinstance(v, tuple) else v
           for k, v in dataclasses.asdict(settings).items()},
        "neuron_config": neuron_config_fields(settings),
        "versions": package_versions() if versions is None else versions,
    }


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def diff_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``name: old -> new`` for each field that differs (nested dicts by dotted name)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_fields(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a} -> {b}")
    return out


@dataclass(frozen=True)
class CacheEntry:
    directory: Path
    fields: dict[str, Any]
    hit: bool


class GraphCache:
    """``<root>/<key>/`` holds one compiled graph set and a ``meta.json`` with its fields;
    meta.json is written last, so a directory without one is an unfinished save."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def lookup(self, fields: dict[str, Any]) -> CacheEntry:
        key = cache_key(fields)
        entry = self.root / key
        meta = self._read_meta(entry)
        if meta is not None and meta.get("fields") == fields:
            log.info("Neuron graphs: loading from cache %s", entry)
            return CacheEntry(entry, fields, hit=True)
        if entry.exists():
            why = ("no readable meta.json (an unfinished save?)" if meta is None else
                   "; ".join(diff_fields(meta.get("fields", {}), fields)) or "unknown")
            self.reject(entry, f"they do not match the requested config ({why})")
        latest = self._latest()
        if latest is None:
            log.info("Neuron graphs: compiling (no cached graphs under %s)", self.root)
        else:
            changes = "; ".join(diff_fields(latest[1], fields))
            log.info("Neuron graphs: compiling, the config differs from the most recent cached "
                     "entry %s in: %s", latest[0].name, changes)
        return CacheEntry(entry, fields, hit=False)

    def save(self, entry: CacheEntry, write: Callable[[Path], None]) -> None:
        """``write(tmp_dir)`` the artifacts, add meta.json, then move into place."""
        tmp = entry.directory.with_name(f"{entry.directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        meta = {"key": entry.directory.name, "created": time.time(), "fields": entry.fields}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        shutil.rmtree(entry.directory, ignore_errors=True)
        tmp.rename(entry.directory)
        log.info("Neuron graphs saved to %s", entry.directory)

    @staticmethod
    def reject(directory: Path, why: str) -> None:
        """Move an unusable entry aside (kept for inspection) and say why."""
        rejected = directory.with_name(f"{directory.name}.rejected-{int(time.time())}")
        log.error("not using the cached Neuron graphs in %s: %s; moved to %s", directory, why,
                  rejected)
        directory.rename(rejected)

    @staticmethod
    def _read_meta(entry: Path) -> dict[str, Any] | None:
        try:
            meta = json.loads((entry / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def _latest(self) -> tuple[Path, dict[str, Any]] | None:
        if not self.root.is_dir():
            return None
        metas = [(d, m) for d in self.root.iterdir() if "." not in d.name
                 if (m := self._read_meta(d)) is not None]
        if not metas:
            return None
        d, m = max(metas, key=lambda dm: dm[1].get("created", 0))
        return d, m.get("fields", {})


# -- the backend -------------------------------------------------------------------------------


def _import_neuron() -> SimpleNamespace:
    try:
        from transformers_neuronx import ContinuousBatchingConfig, LlamaForSampling, NeuronConfig
    except ImportError as e:
        raise NeuronUnavailableError(
            "the Neuron backend needs transformers-neuronx, torch-neuronx and neuronx-cc, which "
            "ship in the AWS Neuron deep-learning container: use docker/Dockerfile.neuron (see "
            f"docs/deployment.md) ({e})") from e
    return SimpleNamespace(LlamaForSampling=LlamaForSampling, NeuronConfig=NeuronConfig,
                           ContinuousBatchingConfig=ContinuousBatchingConfig)


def require_neuron() -> None:
    """Raise :class:`NeuronUnavailableError` now rather than after loading the tokenizer."""
    _import_neuron()


class NeuronBackend:
    """The Backend protocol over a compiled ``LlamaForSampling`` (continuous batching).

    Prefill rows run one at a time, trimmed to their real length: transformers-neuronx runs
    context encoding one sequence per graph anyway (``context_batch_sizes = [1]`` under
    continuous batching), and a trimmed row lets it compute ``last_token_id`` from the cache
    ids itself. Batch-padding rows (our scratch slot, one past the last real slot, which does
    not exist in their ``batch_size_for_shared_caches`` cache) are skipped and get zero logits,
    which the runner discards. Decode rows go in as laid out (row i = slot i, free slots token 0
    at position 0: the same padding transformers-neuronx itself scatters into the slots the
    call leaves out).
    """

    def __init__(self, model: Any, buckets: BucketConfig, vocab_size: int) -> None:
        self.model = model
        self.buckets = buckets
        self.device = torch.device("cpu")  # transformers-neuronx takes and returns host tensors
        self.vocab_size = vocab_size
        self.scratch_slot = buckets.max_num_seqs
        self.pads_to_buckets = True  # one compiled graph per bucket
        self.runs_mixed = False  # prefill and decode are separate graphs
        self.reuses_prefixes = False  # context-encoding graphs start at position 0

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache_ids: torch.Tensor,
                start_ids: torch.Tensor, last_token_id: torch.Tensor) -> torch.Tensor:
        batch, n_tokens = input_ids.shape
        if n_tokens == 1:
            if batch > self.buckets.max_num_seqs or start_ids.tolist() != list(range(batch)):
                raise ValueError(f"a decode batch must be rows 0..{batch - 1} = slots "
                                 f"(max_num_seqs {self.buckets.max_num_seqs})")
            logits = self.model(input_ids.long(), cache_ids=cache_ids.long(),
                                start_ids=start_ids.long())
            return logits[:batch, : self.vocab_size].float()
        out = torch.zeros(batch, self.vocab_size)
        for i in range(batch):
            slot = int(start_ids[i])
            if slot == self.scratch_slot:
                continue
            ids, pos = prefill_row(input_ids[i], cache_ids[i], int(last_token_id[i]))
            logits = self.model(ids, cache_ids=pos, start_ids=torch.tensor([slot]))
            out[i] = logits[0, : self.vocab_size].float()
        return out

    def forward_mixed(self, input_ids: torch.Tensor, cache_ids: torch.Tensor,
                      start_ids: torch.Tensor, num_decode: int, prompt_lens: list[int],
                      prompt_starts: list[int] | None = None) -> torch.Tensor:
        raise NotImplementedError("Neuron runs prefill and decode as separate static graphs; "
                                  "the scheduler never sends it a mixed step")

    def copy_kv(self, copies: list[tuple[int, int, int]]) -> None:
        raise NotImplementedError("prefix reuse is off on Neuron: its context-encoding graphs "
                                  "start every prompt at position 0")

    def settle(self) -> None:
        """Nothing to build after load: every graph is neuronx-cc's, compiled before ready."""

    def kernel_report(self) -> None:
        return None

    def warmup(self, on_progress: ProgressCallback | None = None) -> None:
        """Run every context-encoding and token-generation graph once (first runs load each
        NEFF onto the cores), in slot 0, before any request owns it."""
        t0 = time.perf_counter()
        ce, tg = self.buckets.context_encoding_buckets, self.buckets.token_generation_buckets
        total = len(ce) + len(tg)
        zero = torch.zeros(1, dtype=torch.long)
        for i, n in enumerate(ce):
            if on_progress is not None:
                on_progress("warming up", i / total)
            ids = torch.zeros(1, n, dtype=torch.long)
            self.forward(ids, torch.arange(n).unsqueeze(0), zero, zero + n - 1)
        for i, n in enumerate(tg):
            if on_progress is not None:
                on_progress("warming up", (len(ce) + i) / total)
            ids = torch.zeros(1, 1, dtype=torch.long)
            self.forward(ids, torch.full((1, 1), n - 1), zero, zero)
        log.info("warmed up %d Neuron graphs in %.1fs", total, time.perf_counter() - t0)


def prefill_row(ids: torch.Tensor, pos: torch.Tensor,
                last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt as transformers-neuronx's context encoding takes it: ``[1, n]`` ids and 2-D
    cache ids, real tokens only. A 1-token prompt is sent as 2 tokens with cache ids ``[0, 0]``
    (a 1-token call would take the decode path, which writes position 0 of every other slot);
    ``last_token_id`` is the largest cache id, so the pad changes nothing and its KV write lands
    at position 1, which the first decode step overwrites."""
    n = last + 1
    ids, pos = ids[:n].long().unsqueeze(0), pos[:n].long().unsqueeze(0)
    if n == 1:
        ids = torch.cat([ids, torch.zeros_like(ids)], dim=1)
        pos = torch.zeros(1, 2, dtype=torch.long)
    return ids, pos


def build_backend(model_dir: Path, buckets: BucketConfig, settings: NeuronSettings, *,
                  cache_dir: Path, vocab_size: int, warmup: bool = True,
                  on_progress: ProgressCallback | None = None,
                  neuron: Any = None) -> NeuronBackend:
    """Load weights, then load the compiled graphs from the cache or compile (and cache) them.

    ``on_progress(status, fraction)`` is told each stage. neuronx-cc compiles all graphs in
    one opaque call, so during "compiling" the fraction stands still. ``neuron`` replaces the
    imported package namespace (tests).
    """
    nx = neuron if neuron is not None else _import_neuron()
    report = on_progress or (lambda status, fraction: None)
    cache = GraphCache(cache_dir / "neuron")
    entry = cache.lookup(cache_fields(settings, model_dir))

    report("loading weights", 0.05)
    t0 = time.perf_counter()
    kwargs = neuron_kwargs(settings)
    fields = kwargs["neuron_config"]
    kwargs["neuron_config"] = nx.NeuronConfig(**{
        **fields,
        "continuous_batching": nx.ContinuousBatchingConfig(**fields["continuous_batching"]),
    })
    model = nx.LlamaForSampling.from_pretrained(str(model_dir), **kwargs)
    t1 = time.perf_counter()
    if entry.hit:
        report("loading from cache", 0.2)
        model.load(str(entry.directory))
        try:
            model.to_neuron()
        except FileNotFoundError as e:  # base.py set_neff_bytes: a NEFF for some HLO is missing
            cache.reject(entry.directory, f"loading failed ({e})")
            raise RuntimeError(f"the cached Neuron graphs in {entry.directory} could not be "
                               "loaded and were moved aside: restart to compile anew") from e
    else:
        report("compiling", 0.2)
        model.to_neuron()
        report("saving compiled graphs", 0.85)
        cache.save(entry, lambda d: model.save(str(d)))
    log.info("Neuron model ready: weights %.1fs, graphs %s in %.1fs (tp %d, batch %d, %s, "
             "context buckets %s, token buckets %s)", t1 - t0,
             "loaded from cache" if entry.hit else "compiled", time.perf_counter() - t1,
             settings.tp_degree, settings.batch_size, settings.amp,
             list(settings.context_encoding_buckets), list(settings.token_generation_buckets))
    backend = NeuronBackend(model, buckets, vocab_size)
    if warmup:
        backend.warmup(lambda s, f: report(s, 0.9 + 0.1 * f))
    report("ready", 1.0)
    return backend
