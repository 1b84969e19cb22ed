"""Prometheus metrics: the API's (every engine) and ragserve's engine's.

Two registries, so no name is ever registered twice whichever engine runs:

- :class:`Metrics`, the server's own series, the same with either engine: token delivery,
  retrieval, grounding, HTTP responses, and the finished requests' prompt and decode context
  lengths in fine bins for ``ragserve buckets plan`` (``ragserve_*``;
  :mod:`planning.length_histograms`).
- :class:`EngineMetrics`, ragserve's engine's series, read from its stats dataclasses: vLLM's
  names where the meaning matches (so vLLM dashboards work), ``ragserve_*`` for what is ours
  (buckets, padding, step time). With ``--engine vllm`` vLLM exports its own ``vllm:*`` series
  instead (its ``PrometheusStatLogger``, in prometheus_client's global registry).

Every series is labelled ``model_name`` (the served model name, as vLLM labels it).
``vllm:kv_cache_usage_perc`` is the fraction of KV slots held by running sequences: a slot
reserves ``max_model_len`` positions, so that is the fraction of KV memory in use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bucketing.histogram import LengthHistogram, length_bounds
from engine.stats import FinishedRequestStats, StepStats
from planning.length_histograms import LengthCollector
from scheduler import STEP_PHASES, FinishReason, SchedulerStats

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
                5.12, 10.24)
PASSAGE_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50)
#: the ``kind`` label of ``ragserve_unsupported_citations_total``
UNSUPPORTED_CITATION_KINDS = ("invalid", "unsupported")
#: the ``origin`` label of ``ragserve_citations_total``
CITATION_ORIGINS = ("model", "attributed")
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


#: the model name the server reports while the model loads (no series are seeded for it)
LOADING_MODEL_NAME = "loading"


class _Series:
    """A registry of series labelled ``model_name``, whose value is read at observation time
    (the name is known only once the model has loaded).

    The series whose labels are known up front are exported at 0 from the first scrape that
    knows the model's name (:meth:`_seed`), not from their first observation: Prometheus's
    ``rate()`` and ``increase()`` take a series' first sample as its start, so the requests
    counted before a series' first scrape would never show in a dashboard or an HPA query."""

    def __init__(self, model_name: str | Callable[[], str]) -> None:
        self.registry = CollectorRegistry()
        self._name = model_name if callable(model_name) else (lambda: model_name)
        self._children: dict[tuple[int, str], Histogram] = {}
        self._seeded: str | None = None

    @property
    def model_name(self) -> str:
        return self._name()

    def _child(self, metric: Histogram) -> Histogram:
        """The ``model_name`` child, cached: it is hit once per token."""
        key = (id(metric), self.model_name)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.model_name)
        return child

    def render(self) -> bytes:
        name = self.model_name
        if name != self._seeded and name != LOADING_MODEL_NAME:
            self._seeded = name
            self._seed(name)
        return generate_latest(self.registry)

    def _seed(self, name: str) -> None:
        """Create the series of ``name`` whose label values are all known up front."""


class _StoreCollector:
    """Gauges read from the document store when Prometheus scrapes."""

    def __init__(self, stores: Any, name: Callable[[], str]) -> None:
        self.stores = stores
        self.name = name

    def describe(self) -> list:
        return []  # read at collect time only: nothing registered twice

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        name = self.name()
        counts = self.stores.docs.status_counts()
        files, stored = self.stores.docs.usage()
        queue = GaugeMetricFamily("ragserve_ingest_queue_depth",
                                  "Files waiting for or in ingestion.", labels=["model_name"])
        queue.add_metric([name], counts["in_progress"])
        yield queue
        by_status = GaugeMetricFamily("ragserve_vector_store_files",
                                      "Files in vector stores by status.",
                                      labels=["model_name", "status"])
        for status, n in counts.items():
            by_status.add_metric([name, status], n)
        yield by_status
        stored_bytes = GaugeMetricFamily("ragserve_stored_file_bytes",
                                         "Bytes of the files uploaded through /v1/files.",
                                         labels=["model_name"])
        stored_bytes.add_metric([name], stored)
        yield stored_bytes
        count = GaugeMetricFamily("ragserve_stored_files", "Files uploaded through /v1/files.",
                                  labels=["model_name"])
        count.add_metric([name], files)
        yield count


class Metrics(_Series):
    """The server's own series, the same whichever engine runs. ``max_model_len`` (a value or
    a function read until it gives one: it is known once the model has loaded) sets the bins
    of the two length histograms."""

    def __init__(self, model_name: str | Callable[[], str],
                 max_model_len: int | Callable[[], int | None] | None = None) -> None:
        super().__init__(model_name)
        r, m = self.registry, ("model_name",)
        self._max_model_len = max_model_len if callable(max_model_len) else (
            lambda: max_model_len)
        self._lengths: tuple[LengthHistogram, LengthHistogram] | None = None
        self._lengths_lock = threading.Lock()
        self.delivery = Histogram("ragserve_token_delivery_seconds",
                                  "Time from the engine producing a token to its SSE event being "
                                  "written to the connection.", m, buckets=ITL_BUCKETS,
                                  registry=r)
        self.retrieval_seconds = Histogram("ragserve_retrieval_seconds",
                                           "Time of one retrieval (query encoding and index "
                                           "search).", m, buckets=STEP_BUCKETS, registry=r)
        self.retrieved_passages = Histogram("ragserve_retrieved_passages",
                                            "Passages placed in the prompt per RAG request.", m,
                                            buckets=PASSAGE_BUCKETS, registry=r)
        self.unsupported_citations = Counter("ragserve_unsupported_citations",
                                             "Citations that point to no passage or whose "
                                             "sentence the cited passages do not support.",
                                             (*m, "kind"), registry=r)
        self.citations = Counter("ragserve_citations",
                                 "Citations in RAG answers, by who wrote them: the model, or "
                                 "ragserve's attribution.", (*m, "origin"), registry=r)
        self.http_requests = Counter("ragserve_http_requests",
                                     "HTTP responses by route and status code.",
                                     (*m, "route", "status"), registry=r)
        self.ingest_seconds = Histogram("ragserve_ingest_seconds",
                                        "Time of one ingestion job (parse, chunk, encode and "
                                        "save the files of one store), from dispatch to the "
                                        "version loaded.", m, buckets=LATENCY_BUCKETS,
                                        registry=r)
        self.ingested_files = Counter("ragserve_ingested_files",
                                      "Files through ingestion jobs (completed or failed).", m,
                                      registry=r)
        r.register(LengthCollector(self.length_histograms, self._name))

    def _seed(self, name: str) -> None:
        for metric in (self.delivery, self.retrieval_seconds, self.retrieved_passages,
                       self.ingest_seconds, self.ingested_files):
            metric.labels(name)
        for kind in UNSUPPORTED_CITATION_KINDS:
            self.unsupported_citations.labels(name, kind)
        for origin in CITATION_ORIGINS:
            self.citations.labels(name, origin)

    def watch_stores(self, stores: Any) -> None:
        """Export the document store's state at each scrape: the ingestion queue, files by
        status, bytes stored (``stores``: a :class:`server.stores.Stores`)."""
        self.registry.register(_StoreCollector(stores, self._name))

    def observe_ingest(self, seconds: float, files: int) -> None:
        self.ingest_seconds.labels(self.model_name).observe(seconds)
        self.ingested_files.labels(self.model_name).inc(files)

    def observe_delivery(self, seconds: float) -> None:
        self._child(self.delivery).observe(seconds)

    def observe_retrieval(self, seconds: float) -> None:
        self.retrieval_seconds.labels(self.model_name).observe(seconds)

    def observe_rag(self, passages_used: int, invalid: int, unsupported: int,
                    model_cited: int = 0, attributed: int = 0) -> None:
        """One RAG answer: passages in its prompt, citations to no passage, citations whose
        sentence is unsupported, the valid citations the model wrote and those ragserve
        attributed."""
        name = self.model_name
        self.retrieved_passages.labels(name).observe(passages_used)
        for kind, n in zip(UNSUPPORTED_CITATION_KINDS, (invalid, unsupported)):
            self.unsupported_citations.labels(name, kind).inc(n)
        for origin, n in zip(CITATION_ORIGINS, (model_cited, attributed)):
            self.citations.labels(name, origin).inc(n)

    def observe_response(self, route: str, status: int) -> None:
        self.http_requests.labels(self.model_name, route, str(status)).inc()

    def length_histograms(self) -> tuple[LengthHistogram, LengthHistogram] | None:
        """The prompt and decode context length histograms, made the first time
        ``max_model_len`` is known (None before)."""
        if self._lengths is None:
            max_len = self._max_model_len()
            if max_len is None:
                return None
            with self._lengths_lock:
                if self._lengths is None:
                    bounds = length_bounds(max_len)
                    self._lengths = (LengthHistogram(bounds), LengthHistogram(bounds))
        return self._lengths

    def observe_lengths(self, prompt_tokens: int, context_tokens: int) -> None:
        """One finished request's prompt length and decode context length (prompt plus
        generated tokens): the two lengths :class:`bucketing.sample.LengthSample` samples."""
        pair = self.length_histograms()
        if pair is not None:  # None only before the model has loaded: no request finished
            pair[0].observe(prompt_tokens)
            pair[1].observe(context_tokens)


class EngineMetrics(_Series):
    """ragserve's engine's series; implements its observer (on_scheduler, on_step,
    on_finished), called on the engine thread."""

    def __init__(self, model_name: str | Callable[[], str]) -> None:
        super().__init__(model_name)
        r, m = self.registry, ("model_name",)
        self.running = Gauge("vllm:num_requests_running",
                             "Number of requests in model execution batches.", m, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting.", m,
                             registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc",
                              "KV-cache usage: fraction of slots held (1 = 100%).", m,
                              registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                     m, registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries",
                                      "Prefix cache queries, in terms of number of queried "
                                      "tokens.", m, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits",
                                   "Prefix cache hits, in terms of number of cached tokens.", m,
                                   registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.", m, registry=r)
        self.success = Counter("vllm:request_success", "Count of finished requests.",
                               (*m, "finished_reason"), registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", m,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of end to end request latency in seconds.", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.", m,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.req_prompt = Histogram("vllm:request_prompt_tokens",
                                    "Number of prefill tokens processed.", m,
                                    buckets=TOKEN_BUCKETS, registry=r)
        self.req_generation = Histogram("vllm:request_generation_tokens",
                                        "Number of generation tokens processed.", m,
                                        buckets=TOKEN_BUCKETS, registry=r)
        self.iteration_tokens = Histogram("vllm:iteration_tokens_total",
                                          "Histogram of number of tokens per engine_step.", m,
                                          buckets=TOKEN_BUCKETS, registry=r)
        self.bucket_selected = Counter("ragserve_bucket_selected",
                                       "Engine steps per static-graph bucket.",
                                       (*m, "phase", "bucket"), registry=r)
        self.padding_tokens = Counter("ragserve_padding_tokens",
                                      "Tokens computed only to fill a bucket.", (*m, "phase"),
                                      registry=r)
        self.step_seconds = Histogram("ragserve_engine_step_seconds",
                                      "Time of one engine step (schedule, forward, sample, "
                                      "detokenize).", (*m, "phase"), buckets=STEP_BUCKETS,
                                      registry=r)
        self.kernel_info = Gauge("ragserve_kernel_info",
                                 "1 for the implementation each shape class runs "
                                 "(docs/performance.md).", (*m, "shape_class", "kernel"),
                                 registry=r)
        self.kernels_pending = Gauge("ragserve_kernels_pending",
                                     "1 while a compiled decode step is being built and timed "
                                     "(before ready: 0 whenever the engine serves).", m,
                                     registry=r)

    def _seed(self, name: str) -> None:
        for metric in (self.running, self.waiting, self.kv_usage, self.prompt_tokens,
                       self.prefix_queries, self.prefix_hits, self.generation_tokens, self.ttft,
                       self.itl, self.e2e, self.queue, self.req_prompt, self.req_generation,
                       self.iteration_tokens):
            metric.labels(name)
        for reason in FinishReason:
            self.success.labels(name, reason.value)
        for phase in STEP_PHASES:
            self.padding_tokens.labels(name, phase)
            self.step_seconds.labels(name, phase)

    def on_scheduler(self, stats: SchedulerStats) -> None:
        name = self.model_name
        self.running.labels(name).set(stats.num_running)
        self.waiting.labels(name).set(stats.num_waiting)
        self.kv_usage.labels(name).set(stats.slot_usage)

    def on_step(self, stats: StepStats) -> None:
        name, phase = self.model_name, stats.phase
        # vLLM counts a prompt's cached tokens as processed too
        self.prompt_tokens.labels(name).inc(stats.num_prompt_tokens + stats.num_cached_tokens)
        self.prefix_queries.labels(name).inc(stats.num_queried_tokens)
        self.prefix_hits.labels(name).inc(stats.num_cached_tokens)
        self.generation_tokens.labels(name).inc(stats.num_generation_tokens)
        self.iteration_tokens.labels(name).observe(
            stats.num_prompt_tokens + stats.num_generation_tokens)
        self.bucket_selected.labels(name, phase, stats.bucket).inc()
        self.padding_tokens.labels(name, phase).inc(stats.num_padding_tokens)
        self.step_seconds.labels(name, phase).observe(stats.seconds)
        itl = self._child(self.itl)
        for t in stats.inter_token_latencies:
            itl.observe(t)

    def on_kernels(self, kernels: dict[str, str], pending: bool) -> None:
        name = self.model_name
        self.kernel_info.clear()
        for shape_class, kernel in kernels.items():
            self.kernel_info.labels(name, shape_class, kernel).set(1)
        self.kernels_pending.labels(name).set(int(pending))

    def on_finished(self, stats: FinishedRequestStats) -> None:
        name = self.model_name
        self.success.labels(name, stats.finish_reason).inc()
        self.e2e.labels(name).observe(stats.e2e)
        self.queue.labels(name).observe(stats.queue)
        if stats.ttft is not None:
            self.ttft.labels(name).observe(stats.ttft)
        self.req_prompt.labels(name).observe(stats.num_prompt_tokens)
        self.req_generation.labels(name).observe(stats.num_generation_tokens)
