"""The PyTorch backend (CPU, and CUDA when present).

Two ways to run, chosen by ``compile``:

- ``compile=False`` (the default): calls run at their exact shapes. A decode reads the cache up
  to the longest live sequence, a prefill pads only to the longest prompt in its batch: bucket
  padding buys nothing without static graphs. Each shape class runs the implementation timed
  fastest on this machine (runtime.kernels), and the decode step may be a ``torch.compile``
  graph with dynamic shapes, compiled and timed against eager before the engine reports ready
  (:meth:`TorchBackend.settle`; inductor's cache makes later starts on the machine cheaper).
- ``compile=True``: one static-shape ``torch.compile`` graph per bucket, every call padded to
  its bucket: the CPU/CUDA analogue of one neuronx-cc graph per bucket (for checking that
  path, and for devices where static graphs pay).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from bucketing import DECODE, PREFILL, Bucket, BucketConfig, select
from runtime import kernels as K
from runtime.model import Llama, pack_weight, packed_linear
from scheduler import StepCosts

log = logging.getLogger(__name__)


class TorchBackend:
    def __init__(self, model: Llama, buckets: BucketConfig, *, compile: bool = False,
                 kv_cache_dtype: torch.dtype | None = None, kernels: str = "auto",
                 cache_dir: Path | None = None) -> None:
        if buckets.context_encoding_buckets[0] < 2:
            raise ValueError("context_encoding_buckets must be >= 2 (a 1-token graph is decode)")
        self.model = model
        self.buckets = buckets
        self.compile = compile
        self.pads_to_buckets = compile
        self.runs_mixed = not compile  # forward_mixed: decode rows and prompts in one call
        self.reuses_prefixes = not compile  # prompts may start after a held prefix
        self.device = model.tok_embeddings.weight.device
        self.vocab_size = model.args.vocab_size
        self.scratch_slot = buckets.max_num_seqs  # one slot past the real ones
        self.cache_dir = cache_dir
        self.pinned = K.parse_kernels(kernels)
        K.check_pinned(self.pinned, self.device, model.tok_embeddings.weight.dtype)
        model.setup_caches(buckets.max_num_seqs + 1, buckets.max_model_len, kv_cache_dtype)
        self.timings: dict[str, dict[str, float]] = {}
        self._decode_compiled: Callable[..., torch.Tensor] | None = None
        self.compiled_decode: Callable[..., torch.Tensor] | None = None  # built, maybe unused
        self._cache_key: dict = {}
        self._cache_file: Path | None = None
        self._step_cached = False  # the cache already says which decode step is faster
        self.step_pending = False  # a compiled decode step is still to be built and timed
        self.step_settled = threading.Event()  # the decode step's choice is final
        self.step_costs: StepCosts | None = None  # measured by settle() (mixed steps only)
        if compile:
            if self.pinned.get("decode_step") == "compiled" or "packed" in self.pinned.values():
                raise ValueError("--compile builds static per-bucket graphs of plain linears; "
                                 "--kernels step=compiled and linear=packed apply without it")
            # inductor packs weights itself (and cannot trace opaque ones)
            self.kernels = K.merge(K.Kernels(), self.pinned)
        else:
            self.kernels = self._choose_kernels()
        model.set_kernels(self.kernels.prefill_linear, self.kernels.decode_linear,
                          self.kernels.decode_attention)
        if not self.step_pending:
            self.step_settled.set()
        self.graphs: dict[Bucket, Callable[..., torch.Tensor]] = (
            {b: self._prepare(b) for b in buckets.all_buckets()} if compile else {})
        log.info("kernels: %s%s", self.kernels,
                 " (static per-bucket graphs)" if compile else
                 " (a compiled decode step is still to be built and timed)"
                 if self.step_pending else "")

    # -- kernel choice -------------------------------------------------------------------

    def _kv_dtype(self) -> torch.dtype:
        return self.model.layers[0].attention.cache.k.dtype

    def _choose_kernels(self) -> K.Kernels:
        """Pinned choices, else cached ones, else timed here: linear and attention now, the
        decode step once its graph is compiled (until then it is ``eager`` with
        :attr:`step_pending` set; :meth:`settle` settles it)."""
        from runtime.loader import default_cache_dir

        can = K.available(self.device, self.model.tok_embeddings.weight.dtype)
        b = self.buckets
        self._cache_key = K.cache_key(self.model, device=self.device, kv_dtype=self._kv_dtype(),
                                      max_num_seqs=b.max_num_seqs, max_model_len=b.max_model_len)
        self._cache_file = K.cache_path(self.cache_dir or default_cache_dir(), self._cache_key)
        cached, timings = K.load_cached(self._cache_file, self._cache_key)
        self._step_cached = "decode_step" in cached
        self.timings = dict(timings)
        choices = {k: v[0] for k, v in can.items()}
        choices.update({k: v for k, v in cached.items() if v in can[k]})
        todo = [k for k in ("prefill_linear", "decode_linear", "decode_attention")
                if k not in self.pinned and k not in cached and len(can[k]) > 1]
        if todo:
            t = time.perf_counter()
            if "decode_linear" in todo or "prefill_linear" in todo:
                for phase in ("prefill", "decode"):
                    self.timings[f"{phase}_linear"] = self._time_linear(phase)
                    choices[f"{phase}_linear"] = K.fastest(self.timings[f"{phase}_linear"])
            if "decode_attention" in todo:
                self.timings["decode_attention"] = self._time_attention()
                choices["decode_attention"] = K.fastest(self.timings["decode_attention"])
            log.info("timed kernels in %.1fs: %s", time.perf_counter() - t,
                     {k: {c: round(s * 1e3, 3) for c, s in v.items()}
                      for k, v in self.timings.items()})
        choices.update(self.pinned)
        undecided = "decode_step" not in self.pinned and "decode_step" not in cached
        self.step_pending = choices["decode_step"] == "compiled" or (
            undecided and "compiled" in can["decode_step"])
        choices["decode_step"] = "eager"  # until the compiled one is built (and wins)
        if todo:
            self._save({k: v for k, v in choices.items() if k != "decode_step"})
        return K.merge(K.Kernels(), choices)

    def _save(self, choices: dict[str, str]) -> None:
        K.save_cached(self._cache_file, self._cache_key, choices, self.timings)

    def _tuning_linears(self, budget_bytes: int) -> list:
        """The first layers' linears up to ``budget_bytes`` of weights (past the CPU caches, so
        a GEMV streams from memory as in serving), at least one layer's."""
        chosen, total = [], 0
        for layer in self.model.layers:
            mods = [layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13,
                    layer.feed_forward.w2]
            chosen += mods
            total += sum(m.weight.numel() * m.weight.element_size() for m in mods)
            if total >= budget_bytes:
                break
        return chosen

    def _time_linear(self, phase: str) -> dict[str, float]:
        """Seconds per pass over the tuning linears, summed over the phase's row counts."""
        b = self.buckets
        if phase == "decode":  # [M, 1, in]: decode calls, weights streamed from memory
            mods = self._tuning_linears(128 * 2**20)
            shapes = [(m, 1) for m in sorted({1, b.max_num_seqs})]
        else:  # one prompt of a mid-sized bucket, one layer (compute-bound)
            mods = self._tuning_linears(1)
            shapes = [(1, select(b.context_encoding_buckets,
                                 min(256, b.context_encoding_buckets[-1])))]
        w = [m.weight.detach() for m in mods]
        packed = [pack_weight(x) for x in w]
        rounds = []
        for shape in shapes:
            xs = [torch.randn(*shape, x.shape[1], dtype=x.dtype, device=self.device) for x in w]
            rounds.append({"packed": functools.partial(_linears, packed_linear, xs, packed),
                           "plain": functools.partial(_linears, F.linear, xs, w)})
        with torch.inference_mode():
            return K.time_summed(rounds)

    def _time_attention(self) -> dict[str, float]:
        """Seconds for every layer's decode attention at 1, a quarter of ``max_num_seqs`` and
        ``max_num_seqs`` rows over a mid-sized context."""
        from runtime.model import DECODE_ATTENTION

        a, b = self.model.args, self.buckets
        ctx = min(b.max_model_len, 512)
        caches = [layer.attention.cache for layer in self.model.layers]
        rounds = []
        for rows in sorted({1, max(1, b.max_num_seqs // 4), b.max_num_seqs}):
            q = torch.randn(rows, a.n_heads, 1, a.head_dim, dtype=self._kv_dtype(),
                            device=self.device)
            mask = torch.ones(rows, 1, 1, ctx, dtype=torch.bool, device=self.device)
            kv = [(c.k[:rows, :, :ctx], c.v[:rows, :, :ctx]) for c in caches]
            rounds.append({name: functools.partial(_attention, fn, q, kv, mask)
                           for name, fn in DECODE_ATTENTION.items()})
        with torch.inference_mode():
            return K.time_summed(rounds)

    # -- the compiled decode step --------------------------------------------------------

    def _spare_decode(self, fn: Callable[..., torch.Tensor], rows: int, ctx: int) -> None:
        """A decode call that writes only at the spare cache position (safe while requests
        run on another thread). Its inputs are normal tensors, as the runner's are (inference
        tensors would give the compiled graph guards that the served calls fail)."""
        dev = self.device
        with torch.inference_mode(False):
            ids = torch.zeros(rows, 1, dtype=torch.long, device=dev)
            pos = torch.full((rows, 1), self.model.spare_position, device=dev)
            slots = torch.arange(rows, device=dev)
            last = torch.zeros(rows, dtype=torch.long, device=dev)
        fn(ids, pos, slots, last, ctx_len=ctx)

    def _compile_decode(self) -> Callable[..., torch.Tensor]:
        """The decode forward under ``torch.compile(dynamic=True)``, warmed for batch 1 and for
        batch >= 2 (size 1 is specialized)."""
        from runtime.loader import default_cache_dir

        K.inductor_cache_dir(self.cache_dir or default_cache_dir())
        K.register_ops()
        for m in self.model.linears():
            if m.wid is None:
                m.wid = K.register_linear(m)
        fn = torch.compile(self.model, dynamic=True)
        t = time.perf_counter()
        ctx = min(self.buckets.max_model_len, 256)
        with torch.inference_mode():
            seqs = self.buckets.max_num_seqs  # a decode has at most this many rows
            for rows in dict.fromkeys(min(r, seqs) for r in (2, 1, 3)):
                self._spare_decode(fn, rows, ctx)
                self._spare_decode(fn, rows, ctx + 1)
        log.info("compiled the decode step (dynamic shapes) in %.1fs", time.perf_counter() - t)
        return fn

    def _time_step(self, compiled: Callable[..., torch.Tensor]) -> dict[str, float]:
        ctx = min(self.buckets.max_model_len, 512)
        served = self._stance(compiled)
        with torch.inference_mode():
            return K.time_summed([
                {"eager": functools.partial(self._spare_decode, self.model, rows, ctx),
                 "compiled": functools.partial(self._spare_decode, served, rows, ctx)}
                for rows in sorted({1, self.buckets.max_num_seqs})])

    @staticmethod
    def _stance(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``fn`` running only graphs compiled already: a shape they do not cover runs
        eagerly, never with a compile stall while serving. (``torch._dynamo.run``;
        ``set_stance("eager_on_recompile")`` per call costs ~8 ms.)"""
        return torch._dynamo.run(fn)

    def _settle_step(self) -> None:
        """Compile the decode step, time it against eager unless pinned or cached, use the
        faster; any failure leaves eager in place (logged)."""
        try:
            compiled = self._compile_decode()
            if "decode_step" in self.pinned or self._step_cached:
                self.kernels = K.merge(self.kernels, {"decode_step": "compiled"})
            else:
                self.timings["decode_step"] = self._time_step(compiled)
                choice = K.fastest(self.timings["decode_step"])
                self.kernels = K.merge(self.kernels, {"decode_step": choice})
                self._save({k: getattr(self.kernels, k) for k in K.CHOICES})
                log.info("decode step: eager %.1f ms, compiled %.1f ms -> %s",
                         self.timings["decode_step"]["eager"] * 1e3,
                         self.timings["decode_step"]["compiled"] * 1e3, choice)
            self.compiled_decode = compiled
            if self.kernels.decode_step == "compiled":
                self._decode_compiled = self._stance(compiled)
        except Exception as e:  # a missing C++ compiler must not stop serving
            if self.pinned.get("decode_step") == "compiled":
                raise
            log.warning("the compiled decode step is unavailable (%s: %s); decode stays eager",
                        type(e).__name__, e)
            self.kernels = K.merge(self.kernels, {"decode_step": "eager"})
        finally:
            self.step_pending = False
            self.step_settled.set()
        log.info("kernels: %s", self.kernels)

    def kernel_report(self) -> tuple[dict[str, str], bool]:
        return dataclasses.asdict(self.kernels), self.step_pending

    def settle(self) -> None:
        """Build and time the compiled decode step, then time the step shapes the scheduler
        chooses between (:class:`scheduler.StepCosts`), now, on this thread (cached per machine;
        a no-op once done). The engine does this before it reports ready: compiling on the
        serving cores while requests run slowed them for as long as it took (BENCHMARKS.md,
        "Ready is full speed")."""
        if not self.step_settled.is_set():
            self._settle_step()
        if self.runs_mixed and self.step_costs is None:
            cached = self.timings.get("step_costs")
            try:
                self.step_costs = StepCosts.from_json(cached) if cached else None
            except (KeyError, TypeError, ValueError):
                self.step_costs = None
            if self.step_costs is None:
                t = time.perf_counter()
                self.step_costs = self._time_steps()
                self.timings["step_costs"] = self.step_costs.to_json()
                if self._cache_file is not None:
                    self._save({k: getattr(self.kernels, k) for k in K.CHOICES})
                log.info("timed step shapes in %.1fs", time.perf_counter() - t)
            log.info("a prompt joins the decode step where that saves time (saving per step: "
                     "%s)", self.step_costs.summary())

    def _time_steps(self) -> StepCosts:
        """Seconds of a decode step (as decode steps run: compiled when it won), of prompts
        alone and of both in one mixed step, at 1 and ``max_num_seqs`` decode rows and 32 and
        256 prompt tokens. Decode rows write only the spare position and prompts only the
        scratch slot, so nothing a request holds is touched."""
        b, dev, model = self.buckets, self.device, self.model
        rows = sorted({1, b.max_num_seqs})
        tokens = sorted({max(2, min(n, b.max_model_len - 1)) for n in (32, 256)})
        ctx = min(b.max_model_len, 256)
        step = self._decode_compiled if self._decode_compiled is not None else model

        def mixed(r: int, n: int) -> None:
            with torch.inference_mode():
                pos = [model.spare_position] * r + list(range(n))
                slots = list(range(r)) + [self.scratch_slot] * n
                model.forward_mixed(torch.zeros(r + n, dtype=torch.long, device=dev),
                                    torch.tensor(pos, device=dev),
                                    torch.tensor(slots, device=dev), r, ctx, [n])

        alone = K.time_calls({n: functools.partial(mixed, 0, n) for n in tokens}, reps=2)
        decode, joined = [], []
        for r in rows:
            t = K.time_calls({"decode": functools.partial(self._spare_decode_timed, step, r, ctx),
                              **{n: functools.partial(mixed, r, n) for n in tokens}}, reps=2)
            decode.append(t.pop("decode"))
            joined.append(tuple(t[n] for n in tokens))
        return StepCosts(tuple(rows), tuple(tokens), tuple(decode),
                         tuple(alone[n] for n in tokens), tuple(joined))

    def _spare_decode_timed(self, fn: Callable[..., torch.Tensor], rows: int, ctx: int) -> None:
        with torch.inference_mode():
            self._spare_decode(fn, rows, ctx)

    # -- running -------------------------------------------------------------------------

    def _prepare(self, bucket: Bucket) -> Callable[..., torch.Tensor]:
        ctx_len = None if bucket.phase == PREFILL else bucket.seq_len
        return torch.compile(functools.partial(self.model, ctx_len=ctx_len), dynamic=False,
                             fullgraph=True)

    def bucket_for(self, input_ids: torch.Tensor, cache_ids: torch.Tensor) -> Bucket:
        """The graph these padded tensors run in (as transformers-neuronx picks it)."""
        batch, n_tokens = input_ids.shape
        if n_tokens > 1:
            return Bucket(PREFILL, batch, n_tokens)
        ctx = select(self.buckets.token_generation_buckets, int(cache_ids.max()) + 1,
                     "context length")
        return Bucket(DECODE, batch, ctx)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache_ids: torch.Tensor,
        start_ids: torch.Tensor,
        last_token_id: torch.Tensor,
    ) -> torch.Tensor:
        dev = self.device
        args = (input_ids.to(dev), cache_ids.to(dev), start_ids.to(dev), last_token_id.to(dev))
        if self.compile:
            bucket = self.bucket_for(input_ids, cache_ids)
            graph = self.graphs.get(bucket)
            if graph is None:
                raise ValueError(f"no graph was prepared for bucket {bucket}")
            return graph(*args)
        if input_ids.shape[1] > 1:
            return self.model(*args)
        if self.step_pending and self.pinned.get("decode_step") == "compiled":
            self._settle_step()  # pinned but not warmed up: compile now, once
        ctx = int(cache_ids.max()) + 1  # the live context, not a bucket
        if ctx > self.buckets.max_model_len:
            raise ValueError(f"context length {ctx} exceeds max_model_len "
                             f"({self.buckets.max_model_len})")
        if int(cache_ids.min()) < 0:  # rows of free slots: at the spare position
            pos = cache_ids.masked_fill(cache_ids < 0, self.model.spare_position).to(dev)
            args = (args[0], pos, *args[2:])
        step = self._decode_compiled or self.model
        return step(*args, ctx_len=ctx)

    @torch.inference_mode()
    def copy_kv(self, copies: list[tuple[int, int, int]]) -> None:
        for src, dst, n in copies:
            for layer in self.model.layers:
                cache = layer.attention.cache
                cache.k[dst, :, :n] = cache.k[src, :, :n]
                cache.v[dst, :, :n] = cache.v[src, :, :n]

    @torch.inference_mode()
    def forward_mixed(self, input_ids: torch.Tensor, cache_ids: torch.Tensor,
                      start_ids: torch.Tensor, num_decode: int, prompt_lens: list[int],
                      prompt_starts: list[int] | None = None) -> torch.Tensor:
        if not self.runs_mixed:
            raise NotImplementedError("static per-bucket graphs (--compile) run prefill and "
                                      "decode as separate calls")
        dev = self.device
        ctx = int(cache_ids[:num_decode].max()) + 1 if num_decode else 0
        if ctx > self.buckets.max_model_len:
            raise ValueError(f"context length {ctx} exceeds max_model_len "
                             f"({self.buckets.max_model_len})")
        pos = cache_ids.to(dev)
        pos = pos.masked_fill(pos < 0, self.model.spare_position)  # decode rows of free slots
        return self.model.forward_mixed(input_ids.to(dev), pos, start_ids.to(dev), num_decode,
                                        ctx, prompt_lens, prompt_starts)

    def warmup(self) -> None:
        """Make sure no request meets a compile stall. Static graphs: run every bucket once
        (compiling it). Exact shapes: one small prefill and decode (library start-up), and the
        compiled decode step when it is pinned (otherwise :meth:`settle` builds and times it)."""
        t0 = time.perf_counter()
        buckets = self.buckets.all_buckets() if self.compile else [
            Bucket(PREFILL, 1, self.buckets.context_encoding_buckets[0]),
            Bucket(DECODE, 1, self.buckets.token_generation_buckets[0])]
        for b in tqdm(buckets, desc="warming up bucket graphs", unit="graph", leave=False,
                      disable=not self.compile):
            rows = torch.zeros(b.batch_size, dtype=torch.long)
            if b.phase == PREFILL:
                ids = torch.zeros(b.batch_size, b.seq_len, dtype=torch.long)
                pos = torch.arange(b.seq_len).expand(b.batch_size, -1)
                slots = rows + self.scratch_slot
            else:
                ids = torch.zeros(b.batch_size, 1, dtype=torch.long)
                pos = torch.zeros(b.batch_size, 1, dtype=torch.long)
                pos[0, 0] = b.seq_len - 1  # select this context bucket
                slots = torch.arange(b.batch_size)
            self.forward(ids, pos, slots, rows)
        if self.step_pending and self.pinned.get("decode_step") == "compiled":
            self._settle_step()
        log.info("warmed up %d graphs in %.1fs%s", len(buckets), time.perf_counter() - t0,
                 " (torch.compile, one per bucket)" if self.compile else "")


def _linears(fn: Callable[..., torch.Tensor], xs: list[torch.Tensor],
             weights: list[torch.Tensor]) -> None:
    for x, w in zip(xs, weights):
        fn(x, w)


def _attention(fn: Callable[..., torch.Tensor], q: torch.Tensor,
               kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
    for k, v in kv:
        fn(q, k, v, mask)
