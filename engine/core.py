"""The engine: one loop of schedule -> execute -> update, and the offline ``generate`` API."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bucketing import BucketConfig
from engine.memory import bound_onednn_cache
from engine.output import OutputProcessor, RequestOutput
from scheduler import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    Scheduler,
    SchedulerOutput,
    StepOutput,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 2048

#: ``(status, fraction)`` reports while a model loads: "compiling", "loading from cache", ...
ProgressCallback = Callable[[str, float], None]


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the embedded default (SmolLM2-135M-Instruct)
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    device: str = "cpu"
    max_model_len: int | None = None  # None: min(model's max positions, 2048)
    max_num_seqs: int = 16
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS  # mixed steps (scheduler)
    enable_prefix_caching: bool = True  # where the backend can (not on static graphs)
    context_encoding_buckets: tuple[int, ...] | None = None
    token_generation_buckets: tuple[int, ...] | None = None
    max_prefill_batch: int = 4
    max_prefill_streak: int = 1
    compile: bool = False
    kernels: str = "auto"  # runtime.kernels: auto, or KEY=VALUE items pinning choices
    warmup: bool = True
    chat_template: str | None = None
    cache_dir: Path | None = None
    tp_degree: int = 1  # NeuronCores the model is sharded over (device neuron only)


def build_buckets(cfg: EngineConfig, model_max_positions: int) -> BucketConfig:
    max_len = cfg.max_model_len or min(model_max_positions, DEFAULT_MAX_MODEL_LEN)
    if max_len > model_max_positions:
        raise ValueError(
            f"max_model_len ({max_len}) exceeds the model's max_position_embeddings "
            f"({model_max_positions})"
        )
    return BucketConfig.default(
        max_len,
        cfg.max_num_seqs,
        context_encoding_buckets=cfg.context_encoding_buckets,
        token_generation_buckets=cfg.token_generation_buckets,
        max_prefill_batch=cfg.max_prefill_batch,
    )


class Engine:
    """Owns scheduler, model runner and output processing; ``step()`` runs one iteration.

    Not thread-safe: one thread drives it (the server's engine thread, or the caller of
    :meth:`generate`).
    """

    def __init__(self, scheduler: Scheduler, runner: Any, tokenizer: Any,
                 model_name: str = "model") -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.output = OutputProcessor(tokenizer)
        self._ids = itertools.count()
        self.last_scheduled: SchedulerOutput | None = None

    @classmethod
    def from_config(cls, cfg: EngineConfig, on_progress: ProgressCallback | None = None
                    ) -> Engine:
        """Build everything for ``cfg``; ``on_progress`` hears the stages of a long load (Neuron
        graph compilation)."""
        if cfg.device == "neuron":
            return cls._from_config_neuron(cfg, on_progress)
        if cfg.tp_degree != 1:
            raise ValueError(f"tp_degree is {cfg.tp_degree}, but only device neuron shards a "
                             f"model (device {cfg.device} runs on one device)")
        bound_onednn_cache()  # before this process's first matmul

        import torch

        from runtime.backends.torch_backend import TorchBackend
        from runtime.loader import load_model, resolve_kv_cache_dtype
        from runtime.runner import ModelRunner
        from runtime.structured import GrammarCompiler

        loaded = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device,
                            cache_dir=cfg.cache_dir, chat_template=cfg.chat_template)
        buckets = build_buckets(cfg, loaded.args.max_position_embeddings)
        kv_dtype = resolve_kv_cache_dtype(cfg.kv_cache_dtype, torch.device(cfg.device),
                                          loaded.model.tok_embeddings.weight.dtype)
        backend = TorchBackend(loaded.model, buckets, compile=cfg.compile,
                               kv_cache_dtype=kv_dtype, kernels=cfg.kernels,
                               cache_dir=cfg.cache_dir)
        if cfg.warmup:
            backend.warmup()
            if on_progress is not None and not backend.step_settled.is_set():
                on_progress("compiling the decode step (cached for later starts)", 0.5)
            backend.settle()  # before ready: nothing compiles on the serving cores later
        scheduler = Scheduler(buckets, loaded.eos_token_ids, cfg.max_prefill_streak,
                              mixed=backend.runs_mixed,
                              max_num_batched_tokens=cfg.max_num_batched_tokens,
                              prefix_caching=cfg.enable_prefix_caching
                              and backend.reuses_prefixes, step_costs=backend.step_costs)
        grammars = GrammarCompiler(loaded.tokenizer, loaded.args.vocab_size,
                                   loaded.eos_token_ids)
        if cfg.warmup:  # xgrammar's tokenizer table (0.2-0.7 s) off the first request's path
            threading.Thread(target=grammars.warm, name="grammar-warmup", daemon=True).start()
        return cls(scheduler, ModelRunner(backend, grammars=grammars), loaded.tokenizer,
                   loaded.name)

    @classmethod
    def _from_config_neuron(cls, cfg: EngineConfig,
                            on_progress: ProgressCallback | None) -> Engine:
        """Validate (no Neuron import), check the packages, load the tokenizer, then load or
        compile the graphs: every cheap failure comes before the slow part."""
        from runtime.backends import neuron
        from runtime.loader import (
            default_cache_dir,
            eos_token_ids,
            import_transformers,
            load_tokenizer,
            read_config,
            resolve_model,
        )
        from runtime.runner import ModelRunner
        from runtime.structured import GrammarCompiler

        if cfg.kernels not in ("", "auto"):
            raise ValueError("--kernels applies to the PyTorch backend (cpu, cuda); on Neuron "
                             "the compiled graphs are neuronx-cc's")
        resolved = resolve_model(cfg.model, cfg.cache_dir)
        hf = read_config(resolved.path)
        buckets = build_buckets(cfg, int(hf.get("max_position_embeddings", DEFAULT_MAX_MODEL_LEN)))
        settings = neuron.NeuronSettings.create(buckets, tp_degree=cfg.tp_degree,
                                                dtype=cfg.dtype, hf_config=hf,
                                                kv_cache_dtype=cfg.kv_cache_dtype)
        neuron.validate(settings, hf, cores=neuron.detect_neuron_cores())
        neuron.require_neuron()
        import_transformers()
        tokenizer = load_tokenizer(resolved.path, cfg.chat_template)
        backend = neuron.build_backend(
            resolved.path, buckets, settings, cache_dir=cfg.cache_dir or default_cache_dir(),
            vocab_size=int(hf["vocab_size"]), warmup=cfg.warmup, on_progress=on_progress)
        eos = eos_token_ids(resolved.path, tokenizer)
        scheduler = Scheduler(buckets, eos, cfg.max_prefill_streak)
        grammars = GrammarCompiler(tokenizer, int(hf["vocab_size"]), eos)
        return cls(scheduler, ModelRunner(backend, grammars=grammars), tokenizer, resolved.name)

    # -- requests ------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[int] | list[dict[str, str]],
                      chat: bool = False) -> list[int]:
        """Token ids for a raw string, a list of ids, or (``chat``) a message list."""
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            return list(self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False))
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams,
                    request_id: str | None = None, chat: bool = False,
                    arrival_time: float | None = None) -> str:
        """Queue a request; raises ValueError (naming the limit) if it cannot fit."""
        rid = request_id or f"req-{next(self._ids)}"
        ids = self.encode_prompt(prompt, chat)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self.runner.prepare(rid, params)
        self.scheduler.add_request(GenerationRequest(rid, tuple(ids), params, arrival))
        self.output.add(rid, ids, params)
        return rid

    def settle_kernels(self) -> None:
        """Let the backend build and time what may replace its warm path (the PyTorch
        backend's compiled decode step, runtime.kernels) now; ``from_config`` does this when it
        warms up."""
        self.runner.backend.settle()
        self.scheduler.step_costs = getattr(self.runner.backend, "step_costs", None)

    def kernel_report(self) -> tuple[dict[str, str], bool] | None:
        """The backend's implementation per shape class, and whether one is still pending."""
        return self.runner.backend.kernel_report()

    def abort(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id)
        self.output.abort([request_id])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.last_scheduled = out
        try:
            result = self.runner.execute(out)
        except Exception:
            steps = self._fail(out)
        else:
            steps = self.scheduler.update(out, result)
        outputs, stopped = self.output.process(steps)
        self.scheduler.finish_requests(stopped, FinishReason.STOP)
        return outputs

    def _fail(self, out: SchedulerOutput) -> list[StepOutput]:
        """The runner raised on ``out``: fail its requests. In a mixed step only the prompts
        fail; the running requests retry in a decode step of their own."""
        if not out.decode_rows:
            log.exception("engine step failed (%s); failing its %d requests",
                          out.bucket, len(out.rows))
            return self.scheduler.fail_step(out)
        log.exception("mixed step failed (%s); failing its %d prompts, retrying its %d "
                      "running requests alone", out.bucket, len(out.rows), len(out.decode_rows))
        steps, retry = self.scheduler.fail_mixed_step(out)
        if retry is None:
            return steps
        try:
            result = self.runner.execute(retry)
        except Exception:
            log.exception("the retried decode step failed too; failing its %d requests",
                          len(retry.rows))
            return steps + self.scheduler.fail_step(retry)
        return steps + self.scheduler.update(retry, result)

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams],
                 chat: bool = False) -> list[RequestOutput]:
        """Run prompts to completion; final outputs in prompt order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [self.add_request(p, sp, chat=chat) for p, sp in zip(prompts, params)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
        return [final[i] for i in ids]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams,
               chat: bool = False) -> Iterator[RequestOutput]:
        """One request's outputs as they are produced (other queued requests run too)."""
        rid = self.add_request(prompt, params, chat=chat)
        while self.has_unfinished():
            for o in self.step():
                if o.request_id == rid:
                    yield o
                    if o.finished:
                        return
