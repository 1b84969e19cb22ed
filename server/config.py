"""ServerConfig: every ``ragserve serve`` flag, also readable from ``RAGSERVE_*`` variables.

Flags are named as vLLM names them where the meaning is the same (``--model``,
``--max-num-seqs``, ...). Each flag ``--foo-bar`` can also be set with ``RAGSERVE_FOO_BAR``
(how ``docker run -e`` and SageMaker configure a container); a flag on the command line wins
over the environment. Under SageMaker, ``SAGEMAKER_BIND_TO_PORT`` sets the port.
Validation happens once, here, and every error names the flag (and the variable it came from).

Each flag is declared once: :func:`add_engine_args` (the model and device flags that
``serve``, ``run-batch`` and ``generate`` share) and :func:`add_serve_args` (those and the
server's own, for ``serve`` and ``run-batch``). :func:`add_env_defaults` makes the variables a
parser's defaults; :func:`config_from_namespace` turns what it parsed into a ServerConfig.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from bucketing import CONTEXT_ENCODING_FLAG, TOKEN_GENERATION_FLAG
from bucketing.cost import DEVICES
from engine.core import EngineConfig

ENV_PREFIX = "RAGSERVE_"
#: SageMaker's port for the container: --port's default, over RAGSERVE_PORT
SAGEMAKER_PORT = "SAGEMAKER_BIND_TO_PORT"
ENGINES = ("ragserve", "vllm")
GROUNDING_MODES = ("report", "strip", "off")
CITATION_POLICIES = ("auto", "model", "attribute")
#: vLLM's names for the formats server/tool_parsers.py reads (vLLM's own parsers on its engine)
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "pythonic")


class ConfigError(ValueError):
    """A bad flag or environment value; the message names it."""


def bucket_list(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


def vllm_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` for vLLM's engine: VALUE is JSON when it parses as JSON (``true``, ``8``,
    ``{"a": 1}``), else the string itself; ``-`` in KEY reads as ``_``.

    >>> vllm_arg("enable-prefix-caching=true"), vllm_arg("distributed_executor_backend=ray")
    (('enable_prefix_caching', True), ('distributed_executor_backend', 'ray'))
    """
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class ServerConfig:
    engine: str = "ragserve"
    vllm_args: tuple[tuple[str, Any], ...] = ()
    model: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_model_len: int | None = None
    max_num_seqs: int = 16
    max_num_batched_tokens: int | None = None  # None: 2048 (vLLM's CPU default); vLLM: its own
    enable_prefix_caching: bool | None = None  # None: on where the engine can (vLLM: its own)
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    device: str = "cpu"
    api_key: str | None = None
    chat_template: str | None = None  # a file path or the template itself
    context_encoding_buckets: tuple[int, ...] | None = None
    token_generation_buckets: tuple[int, ...] | None = None
    max_queue_len: int = 256
    max_queue_wait: float = 30.0
    engine_process: bool = True
    max_request_bytes: int = 4 * 2**20
    shutdown_grace_seconds: float = 30.0
    timeout_keep_alive: float = 65.0
    compile: bool = False
    kernels: str = "auto"
    cache_dir: Path | None = None
    log_level: str = "info"
    index: Path | None = None
    index_refresh_seconds: float = 10.0  # 0: never look for a newer version
    retriever_model: str | None = None
    rag_top_k: int = 5
    rag_answer_tokens: int = 256
    grounding: str = "report"
    grounding_threshold: float = 0.65
    rag_citations: str = "auto"
    attribution_threshold: float = 0.55
    max_embedding_batch: int = 2048  # OpenAI's limit on one input array (LangChain sends 1000)
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    responses_store_max_count: int = 10_000
    responses_store_max_bytes: int = 256 * 2**20
    responses_store_path: Path | None = None  # None: <cache dir>/responses.sqlite3
    responses_store_persist: bool = True
    store_dir: Path | None = None  # None: <cache dir>/store
    max_upload_bytes: int = 100 * 2**20
    max_stored_bytes: int = 10 * 2**30
    max_files: int = 10_000
    max_vector_stores: int = 100
    max_files_per_vector_store: int = 10_000
    max_batch_files: int = 2000
    max_document_chars: int = 10_000_000
    max_search_query_chars: int = 4096
    ingest_workers: int = 1
    ingest_threads: int = 1
    ingest_timeout: float = 600.0

    def __post_init__(self) -> None:
        _require(1 <= self.port <= 65535, "--port", f"must be in 1..65535, got {self.port}")
        _require(self.max_num_seqs >= 1, "--max-num-seqs", f"must be >= 1, got {self.max_num_seqs}")
        _require(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
                 "--max-num-batched-tokens", f"must be >= 1, got {self.max_num_batched_tokens}")
        _require(self.max_num_batched_tokens is None or self.engine == "vllm"
                 or not (self.compile or self.device == "neuron"), "--max-num-batched-tokens",
                 "bounds ragserve's mixed prefill/decode steps, which static bucket graphs "
                 "(--compile, --device neuron) do not run")
        _require(self.enable_prefix_caching is not True or self.engine == "vllm"
                 or not (self.compile or self.device == "neuron"), "--enable-prefix-caching",
                 "needs prompts that start after a held prefix, which static bucket graphs "
                 "(--compile, --device neuron) do not run: their prompts start at position 0")
        _require(self.max_model_len is None or self.max_model_len >= 2, "--max-model-len",
                 f"must be >= 2, got {self.max_model_len}")
        _require(self.tensor_parallel_size >= 1, "--tensor-parallel-size",
                 f"must be >= 1, got {self.tensor_parallel_size}")
        _require(self.engine in ENGINES, "--engine", f"must be one of {ENGINES}, got "
                 f"{self.engine!r}")
        _require(self.tensor_parallel_size == 1 or self.device == "neuron"
                 or self.engine == "vllm", "--tensor-parallel-size",
                 f"is {self.tensor_parallel_size}, but ragserve's engine shards a model only "
                 f"with --device neuron (--device {self.device} runs on one device; "
                 "--engine vllm shards on GPUs)")
        _require(self.device in DEVICES, "--device", f"must be one of {DEVICES}")
        self._check_engine_flags()
        try:
            from runtime.kernels import parse_kernels

            parse_kernels(self.kernels)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _require(self.kernels in ("", "auto") or self.device != "neuron", "--kernels",
                 "applies to the PyTorch backend (cpu, cuda); on Neuron the graphs are "
                 "neuronx-cc's")
        _require(self.api_key is None or self.api_key != "", "--api-key", "must not be empty")
        _require(self.max_queue_len >= 1, "--max-queue-len",
                 f"must be >= 1, got {self.max_queue_len}")
        _require(math.isfinite(self.max_queue_wait) and self.max_queue_wait > 0,
                 "--max-queue-wait", f"must be > 0 seconds, got {self.max_queue_wait}")
        _require(self.max_request_bytes >= 1024, "--max-request-bytes",
                 f"must be >= 1024, got {self.max_request_bytes}")
        _require(self.shutdown_grace_seconds >= 0, "--shutdown-grace-seconds",
                 f"must be >= 0, got {self.shutdown_grace_seconds}")
        _require(math.isfinite(self.timeout_keep_alive) and self.timeout_keep_alive > 0,
                 "--timeout-keep-alive", f"must be > 0 seconds, got {self.timeout_keep_alive}")
        _require(1 <= self.rag_top_k <= 50, "--rag-top-k",
                 f"must be in 1..50, got {self.rag_top_k}")
        _require(self.rag_answer_tokens >= 1, "--rag-answer-tokens",
                 f"must be >= 1, got {self.rag_answer_tokens}")
        _require(self.rag_citations in CITATION_POLICIES, "--rag-citations",
                 f"must be one of {CITATION_POLICIES}, got {self.rag_citations!r}")
        _require(-1.0 <= self.attribution_threshold <= 1.0, "--attribution-threshold",
                 f"must be in -1..1 (a cosine), got {self.attribution_threshold}")
        _require(self.max_embedding_batch >= 1, "--max-embedding-batch",
                 f"must be >= 1, got {self.max_embedding_batch}")
        _require(self.grounding in GROUNDING_MODES, "--grounding",
                 f"must be one of {GROUNDING_MODES}, got {self.grounding!r}")
        _require(-1.0 <= self.grounding_threshold <= 1.0, "--grounding-threshold",
                 f"must be in -1..1 (a cosine), got {self.grounding_threshold}")
        _require(math.isfinite(self.index_refresh_seconds) and self.index_refresh_seconds >= 0,
                 "--index-refresh-seconds", f"must be >= 0 seconds (0: never), got "
                 f"{self.index_refresh_seconds}")
        _require(self.index is None or self.index.is_dir(), "--index",
                 f"{self.index} is not a directory (build one with `ragserve index build`)")
        _require(self.tool_call_parser in (None, *TOOL_CALL_PARSERS), "--tool-call-parser",
                 f"must be one of {TOOL_CALL_PARSERS}, got {self.tool_call_parser!r}")
        _require(not self.enable_auto_tool_choice or self.tool_call_parser is not None,
                 "--enable-auto-tool-choice", "needs --tool-call-parser (the format the "
                 "model writes its calls in)")
        _require(self.responses_store_max_count >= 1, "--responses-store-max-count",
                 f"must be >= 1, got {self.responses_store_max_count}")
        _require(self.responses_store_max_bytes >= 1024, "--responses-store-max-bytes",
                 f"must be >= 1024, got {self.responses_store_max_bytes}")
        for flag, value, least in (
                ("--max-upload-bytes", self.max_upload_bytes, 1),
                ("--max-stored-bytes", self.max_stored_bytes, 1),
                ("--max-files", self.max_files, 1),
                ("--max-vector-stores", self.max_vector_stores, 1),
                ("--max-files-per-vector-store", self.max_files_per_vector_store, 1),
                ("--max-batch-files", self.max_batch_files, 1),
                ("--max-document-chars", self.max_document_chars, 1),
                ("--max-search-query-chars", self.max_search_query_chars, 1),
                ("--ingest-workers", self.ingest_workers, 1),
                ("--ingest-threads", self.ingest_threads, 1)):
            _require(value >= least, flag, f"must be >= {least}, got {value}")
        _require(math.isfinite(self.ingest_timeout) and self.ingest_timeout > 0,
                 "--ingest-timeout", f"must be > 0 seconds, got {self.ingest_timeout}")
        _require(self.log_level in ("critical", "error", "warning", "info", "debug"),
                 "--log-level", f"must be critical, error, warning, info or debug, got "
                 f"{self.log_level!r}")

    def _check_engine_flags(self) -> None:
        """Flags that mean something to one engine only are refused for the other, never
        ignored."""
        if self.engine != "vllm":
            _require(not self.vllm_args, "--vllm-arg", "applies to --engine vllm only")
            return
        _require(self.kernels in ("", "auto"), "--kernels",
                 "applies to --engine ragserve only (vLLM picks its own kernels)")
        _require(not self.compile, "--compile",
                 "applies to --engine ragserve only (vLLM compiles its own graphs; see "
                 "--vllm-arg compilation_config=... or enforce_eager=true)")
        for flag, value in (("--context-encoding-buckets", self.context_encoding_buckets),
                            ("--token-generation-buckets", self.token_generation_buckets)):
            _require(value is None or self.device == "neuron", flag,
                     f"means nothing to vLLM on --device {self.device} (it has no bucket "
                     "graphs); with --device neuron it sets NxD Inference's bucket list")

    def chat_template_text(self) -> str | None:
        """``--chat-template`` as vLLM takes it: a file path, or the template itself."""
        if self.chat_template is None:
            return None
        path = Path(self.chat_template)
        if len(self.chat_template) < 4096 and path.is_file():
            return path.read_text()
        if "{" not in self.chat_template:
            raise ConfigError(f"--chat-template: {self.chat_template!r} is neither a file nor "
                              "a Jinja template")
        return self.chat_template

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model, dtype=self.dtype, kv_cache_dtype=self.kv_cache_dtype,
            device=self.device, max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=(self.max_num_batched_tokens
                                    or EngineConfig.max_num_batched_tokens),
            enable_prefix_caching=self.enable_prefix_caching is not False,
            context_encoding_buckets=self.context_encoding_buckets,
            token_generation_buckets=self.token_generation_buckets,
            compile=self.compile, kernels=self.kernels,
            chat_template=self.chat_template_text(),
            cache_dir=self.cache_dir, tp_degree=self.tensor_parallel_size,
        )


def _require(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{flag} {message}")


def env_name(flag: str) -> str:
    """``--max-num-seqs`` -> ``RAGSERVE_MAX_NUM_SEQS``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model and device flags: ``serve``, ``run-batch`` and ``generate`` take them."""
    d = ServerConfig()
    g = p.add_argument_group("model and device")
    g.add_argument("--model", default=d.model,
                   help="Hugging Face directory, .gguf file or Hub repo id "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default=d.device, choices=DEVICES)
    g.add_argument("--dtype", default=d.dtype,
                   help="auto, float32, bfloat16 or float16. auto: bfloat16 on CUDA and on CPUs "
                        "with native bf16 (AVX512-BF16 or AMX), else float32; on Neuron the "
                        "checkpoint's torch_dtype (else bfloat16); --engine vllm: vLLM's rule")
    g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype,
                   help="auto (the model's dtype) or a dtype")
    g.add_argument("--max-model-len", type=int, default=d.max_model_len,
                   help="the longest sequence, prompt and generated tokens (default: the "
                        "model's max positions, at most 2048; --engine vllm: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="sequences decoded at once: KV-cache slots, the largest decode batch "
                        "(generate runs one)")
    g.add_argument(CONTEXT_ENCODING_FLAG, type=bucket_list, default=d.context_encoding_buckets,
                   help="prefill lengths, e.g. 128,256,512 (default: three per octave up to "
                        "--max-model-len)")
    g.add_argument(TOKEN_GENERATION_FLAG, type=bucket_list, default=d.token_generation_buckets,
                   help="decode context lengths (default: powers of two up to --max-model-len)")
    g.add_argument("--compile", type=_bool, nargs="?", const=True, default=d.compile,
                   metavar="BOOL",
                   help="torch.compile one static graph per bucket (as on Neuron)")
    g.add_argument("--kernels", default=d.kernels,
                   help="auto (time the candidates on this machine, cached per CPU), or "
                        "KEY=VALUE items pinning some: linear=packed|plain, "
                        "attention=matmul|sdpa|grouped, step=eager|compiled (docs/performance.md)")
    g.add_argument("--chat-template", default=d.chat_template,
                   help="a Jinja chat template, or a file holding one (default: the model's)")
    g.add_argument("--cache-dir", type=Path, default=d.cache_dir,
                   help="where converted models and compiled graphs are kept (default: "
                        "$RAGSERVE_CACHE_DIR, else $XDG_CACHE_HOME/ragserve, else "
                        "~/.cache/ragserve)")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Every ``ragserve serve`` flag (``run-batch`` takes them too)."""
    d = ServerConfig()
    e = p.add_argument_group("engine")
    e.add_argument("--engine", default=d.engine, choices=ENGINES,
                   help="ragserve: our engine (bucket graphs, continuous batching; CPU, CUDA, "
                        "transformers-neuronx); vllm: vLLM's engine in-process (GPUs, the "
                        "supported Neuron stacks, multi-node)")
    e.add_argument("--vllm-arg", dest="vllm_args", type=vllm_arg, action="append",
                   default=[], metavar="KEY=VALUE",
                   help="with --engine vllm: any other vLLM engine argument (repeatable), e.g. "
                        "enable_prefix_caching=true, pipeline_parallel_size=2, "
                        "distributed_executor_backend=ray, override_neuron_config={...}; "
                        "VALUE is JSON or a string. RAGSERVE_VLLM_ARG: a shell-quoted list")
    e.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size)
    e.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="tokens one engine step may run: the running requests' next tokens "
                        "plus the prompts admitted with them (default 2048, vLLM's on CPU; "
                        "with --engine vllm, vLLM's default)")
    e.add_argument("--enable-prefix-caching", type=_bool, nargs="?", const=True,
                   default=d.enable_prefix_caching, metavar="BOOL",
                   help="start a prompt after the longest prefix whose KV a slot still holds "
                        "(a finished request's until its slot is needed, or a running one's). "
                        "Default: on, except on static bucket graphs (--compile, --device "
                        "neuron), which start every prompt at position 0; with --engine vllm, "
                        "vLLM's default (on)")
    e.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", default=d.enable_prefix_caching,
                   help="vLLM's spelling of --enable-prefix-caching false")
    e.add_argument("--engine-process", type=_bool, nargs="?", const=True,
                   default=d.engine_process, metavar="BOOL",
                   help="run ragserve's engine loop in a process of its own, so that the HTTP "
                        "side cannot slow it (default true; false: a thread of the server)")
    add_engine_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--served-model-name", default=d.served_model_name,
                   help="the name clients send as `model` (default: from the model)")
    s.add_argument("--host", default=d.host)
    s.add_argument("--port", type=int, default=d.port,
                   help=f"default {d.port}; under SageMaker ${SAGEMAKER_PORT}")
    s.add_argument("--api-key", default=d.api_key,
                   help="require `Authorization: Bearer KEY` on every route but /health, /ping")
    s.add_argument("--max-queue-len", type=int, default=d.max_queue_len,
                   help="waiting requests beyond this get 429 with Retry-After")
    s.add_argument("--max-queue-wait", type=float, default=d.max_queue_wait,
                   help="seconds a request may wait for a sequence slot: one expected to wait "
                        "longer (from the measured service time) gets 429 with Retry-After at "
                        "once; one admitted that still waits longer ends with an error")
    s.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help="request bodies beyond this get 413")
    s.add_argument("--shutdown-grace-seconds", type=float, default=d.shutdown_grace_seconds,
                   help="on SIGTERM, how long in-flight requests may take to finish")
    s.add_argument("--timeout-keep-alive", type=float, default=d.timeout_keep_alive,
                   help="seconds an idle HTTP connection stays open; above a load balancer's "
                        "idle timeout (AWS ALB: 60) and a client's Retry-After, so that a "
                        "reused connection is not closed under a new request")
    s.add_argument("--log-level", default=d.log_level)
    t = p.add_argument_group("tool calling")
    t.add_argument("--enable-auto-tool-choice", type=_bool, nargs="?", const=True,
                   default=d.enable_auto_tool_choice, metavar="BOOL",
                   help='allow tool_choice "auto" (the default when a request has tools): the '
                        "model decides, --tool-call-parser finds its calls. \"required\" and "
                        "named functions work without it (the output is constrained)")
    t.add_argument("--tool-call-parser", default=d.tool_call_parser, choices=TOOL_CALL_PARSERS,
                   help="the format the model writes calls in, as vLLM names it: hermes "
                        "(<tool_call> JSON, ChatML models), llama3_json (Llama 3.1 JSON), "
                        "pythonic ([f(x=1)]). If the chat template ignores tools, requests with "
                        "tools use ragserve's template for the format (hermes, llama3_json)")
    o = p.add_argument_group("responses API")
    o.add_argument("--responses-store-max-count", type=int, default=d.responses_store_max_count,
                   help="stored responses (store: true) kept for GET /v1/responses/{id} and "
                        "previous_response_id; beyond it the least recently used go")
    o.add_argument("--responses-store-max-bytes", type=int, default=d.responses_store_max_bytes,
                   help="bytes of stored responses and their conversations kept (default 256 "
                        "MiB); beyond it the least recently used go")
    o.add_argument("--responses-store-path", type=Path, default=d.responses_store_path,
                   help="the SQLite file of stored responses (default: "
                        "<--cache-dir>/responses.sqlite3)")
    o.add_argument("--responses-store-persist", type=_bool, nargs="?", const=True,
                   default=d.responses_store_persist, metavar="BOOL",
                   help="keep stored responses on disk across restarts (default true; false: "
                        "in memory, gone when the server stops)")
    r = p.add_argument_group("retrieval-augmented generation")
    r.add_argument("--index", type=Path, default=d.index,
                   help="a `ragserve index build` directory: enables /v1/retrieve and `rag` in "
                        "chat requests (loaded at start; /ready waits for it)")
    r.add_argument("--index-refresh-seconds", type=float, default=d.index_refresh_seconds,
                   help="how often the server looks for index versions other writers published "
                        "(`ragserve index add` on --index, another replica's ingestion on a "
                        "--store-dir they share) and swaps them in whole; 0: never")
    r.add_argument("--retriever-model", default=d.retriever_model,
                   help="HF_ColBERT checkpoint dir or hub id (default: the encoder the index "
                        "was built with)")
    r.add_argument("--rag-top-k", type=int, default=d.rag_top_k,
                   help="passages retrieved per RAG request unless it sets rag.top_k")
    r.add_argument("--rag-answer-tokens", type=int, default=d.rag_answer_tokens,
                   help="prompt room kept for the answer when a RAG request sets no max_tokens")
    r.add_argument("--grounding", default=d.grounding, choices=GROUNDING_MODES,
                   help="report unsupported cited sentences, strip them, or skip the check")
    r.add_argument("--grounding-threshold", type=float, default=d.grounding_threshold,
                   help="support (mean best token cosine) below which a cited sentence is "
                        "unsupported; 0.65 is calibrated for the default encoder")
    r.add_argument("--rag-citations", default=d.rag_citations, choices=CITATION_POLICIES,
                   help="auto: keep the model's valid citations and cite its uncited sentences "
                        "with the passage that supports them (at least --grounding-threshold); "
                        "model: only the model's; attribute: only ragserve's")
    r.add_argument("--attribution-threshold", type=float, default=d.attribution_threshold,
                   help="support a sentence's best passage needs for ragserve to cite it "
                        "(below --grounding-threshold: cited, and reported unsupported; in "
                        "strip mode the higher of the two applies); 0.55 was chosen for the "
                        "default encoder on half of benchmarks/data's questions")
    r.add_argument("--max-embedding-batch", type=int, default=d.max_embedding_batch,
                   help="texts per /v1/embeddings request, documents per /v1/rerank, pairs per "
                        "/v1/score (all from the retriever encoder); more is a 400")
    add_document_args(p)


def add_document_args(p: argparse.ArgumentParser) -> None:
    """Files and vector stores through the API: where they live, their limits, ingestion."""
    d = ServerConfig()
    g = p.add_argument_group("documents (/v1/files, /v1/vector_stores)")
    g.add_argument("--store-dir", type=Path, default=d.store_dir,
                   help="where uploaded files, vector stores and their indexes live (default: "
                        "<cache dir>/store); kept across restarts")
    g.add_argument("--max-upload-bytes", type=int, default=d.max_upload_bytes,
                   help="largest file one POST /v1/files may upload (more is a 413)")
    g.add_argument("--max-stored-bytes", type=int, default=d.max_stored_bytes,
                   help="total bytes of all uploaded files (an upload past it is a 413)")
    g.add_argument("--max-files", type=int, default=d.max_files,
                   help="uploaded files kept at once (an upload past it is a 429)")
    g.add_argument("--max-vector-stores", type=int, default=d.max_vector_stores,
                   help="vector stores created through the API, at once")
    g.add_argument("--max-files-per-vector-store", type=int,
                   default=d.max_files_per_vector_store)
    g.add_argument("--max-batch-files", type=int, default=d.max_batch_files,
                   help="files per POST /v1/vector_stores/{id}/file_batches (OpenAI's is 2000)")
    g.add_argument("--max-document-chars", type=int, default=d.max_document_chars,
                   help="characters of text one file may yield (a PDF is read page by page and "
                        "stopped there); more fails the file with the reason")
    g.add_argument("--max-search-query-chars", type=int, default=d.max_search_query_chars,
                   help="characters of a vector store search query")
    g.add_argument("--ingest-workers", type=int, default=d.ingest_workers,
                   help="ingestion worker processes (parse, chunk, encode, write the index); "
                        "each runs at idle CPU priority so serving is not slowed")
    g.add_argument("--ingest-threads", type=int, default=d.ingest_threads,
                   help="torch threads of each ingestion worker")
    g.add_argument("--ingest-timeout", type=float, default=d.ingest_timeout,
                   help="CPU seconds one ingestion job may use before its worker is killed "
                        "and its files are retried one by one, then fail with the reason "
                        "(waiting for the CPU behind serving does not count, up to 20x)")


@dataclass(frozen=True)
class FromEnv:
    """What :func:`add_env_defaults` read: the variable each default came from (by dest), or
    the error of the first variable it could not read."""

    variables: Mapping[str, str]
    error: ConfigError | None = None


NO_ENV = FromEnv({})


def add_env_defaults(p: argparse.ArgumentParser,
                     environ: Mapping[str, str] | None = None) -> None:
    """Make the ``RAGSERVE_*`` variable of each of ``p``'s ServerConfig flags (and
    ``SAGEMAKER_BIND_TO_PORT`` for ``--port``) its default, parsed as the flag parses; a flag
    on the command line wins. A value that cannot be read is kept for
    :func:`config_from_namespace` to raise, so that it stops only the command that reads it."""
    environ = os.environ if environ is None else environ
    try:
        values, variables = _read_env(p, environ)
    except ConfigError as e:
        p.set_defaults(from_env=FromEnv({}, e))
        return
    p.set_defaults(**values, from_env=FromEnv(variables))


def _read_env(p: argparse.ArgumentParser,
              environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    known = {f.name for f in fields(ServerConfig)}
    values: dict[str, Any] = {}
    variables: dict[str, str] = {}
    for action in p._actions:
        flag = next((s for s in action.option_strings if s.startswith("--")), None)
        if (flag is None or action.dest not in known or env_name(flag) not in environ
                or isinstance(action, argparse._StoreConstAction)):  # --no-X: X's variable
            continue
        raw = environ[env_name(flag)]
        try:
            if isinstance(action, argparse._AppendAction):  # a shell-quoted list of values
                value = [(action.type or str)(item) for item in shlex.split(raw)]
            else:
                value = (action.type or str)(raw) if raw != "" or action.type is None else None
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise ConfigError(f"{env_name(flag)} (for {flag}): {e}") from None
        if action.choices and value not in action.choices:
            raise ConfigError(f"{env_name(flag)} (for {flag}) must be one of "
                              f"{list(action.choices)}, got {raw!r}")
        values[action.dest] = value
        variables[action.dest] = env_name(flag)
    if SAGEMAKER_PORT in environ and any(a.dest == "port" for a in p._actions):
        try:
            values["port"] = int(environ[SAGEMAKER_PORT])
        except ValueError:
            raise ConfigError(f"{SAGEMAKER_PORT} must be an integer") from None
        variables["port"] = SAGEMAKER_PORT
    return values, variables


def config_from_namespace(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of what a parser given :func:`add_serve_args` (or only
    :func:`add_engine_args`: the rest keep their defaults) has parsed; raises ConfigError
    naming the flag, and the variable a bad value came from."""
    from_env: FromEnv = getattr(args, "from_env", NO_ENV)
    if from_env.error is not None:
        raise from_env.error
    known = {f.name for f in fields(ServerConfig)}
    values = {k: v for k, v in vars(args).items() if k in known}
    if "vllm_args" in values:
        values["vllm_args"] = tuple(values["vllm_args"])
    try:
        return ServerConfig(**values)
    except ConfigError as e:
        raise ConfigError(_with_env_hint(str(e), from_env.variables)) from None


def config_from_args(argv: Sequence[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Parse ``serve`` flags over ``RAGSERVE_*`` defaults; raises ConfigError naming what is
    wrong."""
    p = argparse.ArgumentParser(prog="ragserve serve", exit_on_error=False)
    add_serve_args(p)
    add_env_defaults(p, environ)
    try:
        args = p.parse_args(argv)
    except argparse.ArgumentError as e:
        raise ConfigError(str(e)) from None
    return config_from_namespace(args)


def _with_env_hint(message: str, variables: Mapping[str, str]) -> str:
    flag = message.split(" ", 1)[0]
    dest = flag.lstrip("-").replace("-", "_")
    return f"{message} (from {variables[dest]})" if dest in variables else message
