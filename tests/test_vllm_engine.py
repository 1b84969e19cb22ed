"""``--engine vllm`` below the engine interface: engine arguments, platform detection, output
and logprob conversion, errors, abort, and the whole HTTP server on it.

Most tests drive :class:`server.vllm_engine.VLLMEngine` through a fake of the few vLLM parts it
uses (``import_vllm``'s ``_VLLM``), so they run in ``make test`` without vLLM; the tests marked
``vllm`` check the real vLLM installed by ``make test-vllm``. The server tests against a real
vLLM engine are tests/test_server.py, test_rag_server.py and test_server_lifecycle.py, run with
RAGSERVE_TEST_ENGINES=vllm.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from serverutil import ThreadServer, wait_ready

from engine.client import EngineDead, EngineRequestError, EngineState
from scheduler import FinishReason, SamplingParams, StructuredKind, StructuredOutput
from server.config import ConfigError, ServerConfig
from server.vllm_engine import (
    _VLLM,
    OutputAccumulator,
    VLLMEngine,
    engine_kwargs,
    platform_device,
    structured_kwargs,
    token_logprobs,
)

FIELDS = {"model", "served_model_name", "max_model_len", "max_num_seqs", "tensor_parallel_size",
          "dtype", "kv_cache_dtype", "disable_log_stats", "enable_prefix_caching",
          "additional_config", "pipeline_parallel_size", "distributed_executor_backend"}


def cfg(**kw: Any) -> ServerConfig:
    return ServerConfig(engine="vllm", **kw)


# -- engine arguments ---------------------------------------------------------------------------


def test_engine_kwargs_map_our_flags():
    kw = engine_kwargs(cfg(max_num_seqs=8, dtype="float32", tensor_parallel_size=2,
                           device="cuda"), "/m", "served", FIELDS)
    assert kw == dict(model="/m", served_model_name=["served"], max_num_seqs=8,
                      tensor_parallel_size=2, dtype="float32", kv_cache_dtype="auto",
                      disable_log_stats=False)  # no max_model_len: vLLM's default (the model's)
    assert engine_kwargs(cfg(max_model_len=512), "/m", "s", FIELDS)["max_model_len"] == 512
    assert engine_kwargs(cfg(max_num_batched_tokens=4096), "/m", "s",
                         FIELDS)["max_num_batched_tokens"] == 4096
    # releases that still take a device get ours
    assert engine_kwargs(cfg(), "/m", "s", FIELDS | {"device"})["device"] == "cpu"


def test_vllm_args_pass_through_and_unknown_keys_are_refused():
    kw = engine_kwargs(cfg(vllm_args=(("enable_prefix_caching", True),
                                      ("distributed_executor_backend", "ray"),
                                      ("pipeline_parallel_size", 2))), "/m", "s", FIELDS)
    assert (kw["enable_prefix_caching"], kw["distributed_executor_backend"],
            kw["pipeline_parallel_size"]) == (True, "ray", 2)
    with pytest.raises(ConfigError, match=r"enable_prefix_cache: not an engine argument of the "
                                          r"installed vLLM \(did you mean enable_prefix_caching"):
        engine_kwargs(cfg(vllm_args=(("enable_prefix_cache", True),)), "/m", "s", FIELDS)
    with pytest.raises(ConfigError, match="max_model_len: set by ragserve's own flag "
                                          "--max-model-len"):
        engine_kwargs(cfg(vllm_args=(("max_model_len", 9),)), "/m", "s", FIELDS)
    assert engine_kwargs(cfg(enable_prefix_caching=False), "/m", "s",
                         FIELDS)["enable_prefix_caching"] is False
    with pytest.raises(ConfigError, match="set by --enable-prefix-caching too"):
        engine_kwargs(cfg(enable_prefix_caching=True,
                          vllm_args=(("enable_prefix_caching", True),)), "/m", "s", FIELDS)


def test_override_neuron_config_goes_where_the_installed_vllm_reads_it():
    onc = {"skip_warmup": True}
    args = (("override_neuron_config", onc), ("additional_config", {"other": 1}))
    # vLLM >= 0.10 has no such engine arg: NxD Inference reads additional_config's
    kw = engine_kwargs(cfg(vllm_args=args, device="neuron"), "/m", "s", FIELDS)
    assert kw["additional_config"] == {"other": 1, "override_neuron_config": onc}
    assert "override_neuron_config" not in kw
    # older releases: the engine arg itself
    kw = engine_kwargs(cfg(vllm_args=args[:1]), "/m", "s", FIELDS | {"override_neuron_config"})
    assert kw["override_neuron_config"] == onc and "additional_config" not in kw


def test_bucket_flags_become_nxd_inference_buckets_on_neuron():
    kw = engine_kwargs(cfg(device="neuron", context_encoding_buckets=(128, 512),
                           token_generation_buckets=(512, 1024),
                           vllm_args=(("override_neuron_config", {"skip_warmup": True}),)),
                       "/m", "s", FIELDS)
    assert kw["additional_config"]["override_neuron_config"] == {
        "skip_warmup": True, "enable_bucketing": True, "context_encoding_buckets": [128, 512],
        "token_generation_buckets": [512, 1024]}
    with pytest.raises(ConfigError, match="means nothing to vLLM on --device cpu"):
        cfg(context_encoding_buckets=(128,))


def test_neuron_bucket_flags_need_nxd_inference(monkeypatch, tokenizer):
    import server.vllm_engine as ve

    config = cfg(device="neuron", context_encoding_buckets=(128, 512))
    monkeypatch.setattr(ve, "neuron_integration", lambda: "vllm-neuron")  # the Trn2/Trn3 plugin
    with pytest.raises(ConfigError, match="num_batched_tokens_buckets"):
        VLLMEngine(config, vllm=fake_vllm(tokenizer, NeuronPlatform()))
    monkeypatch.setattr(ve, "neuron_integration", lambda: "nxdi")
    VLLMEngine(config, vllm=fake_vllm(tokenizer, NeuronPlatform()))


def test_each_compiled_configuration_gets_its_own_directory(tmp_path: Path):
    from server.vllm_engine import compiled_artifacts_dir

    kw = engine_kwargs(cfg(device="neuron", max_model_len=4096), "/m/llama", "Llama 3/8B",
                       FIELDS)
    a = compiled_artifacts_dir(tmp_path, "Llama 3/8B", kw, "0.16.0")
    assert a == compiled_artifacts_dir(tmp_path, "Llama 3/8B", dict(kw), "0.16.0")
    assert a.parent == tmp_path / "neuron-compiled-artifacts"
    assert a.name.startswith("Llama-3-8B-")
    assert a != compiled_artifacts_dir(tmp_path, "Llama 3/8B", {**kw, "max_num_seqs": 4},
                                       "0.16.0")
    assert a != compiled_artifacts_dir(tmp_path, "Llama 3/8B", kw, "0.13.0")


class NeuronPlatform:  # vllm_neuron/platform.py: reports device_type "cpu"
    device_type = "cpu"
    device_control_env_var = "NEURON_RT_VISIBLE_CORES"

    def is_cuda_alike(self) -> bool:
        return False


class CudaPlatform:
    device_type = "cuda"
    device_control_env_var = "CUDA_VISIBLE_DEVICES"

    def is_cuda_alike(self) -> bool:
        return True


class CpuPlatform:
    device_type = "cpu"
    device_control_env_var = "CPU_VISIBLE_MEMORY_NODES"

    def is_cuda_alike(self) -> bool:
        return False


def test_platform_device():
    assert platform_device(NeuronPlatform()) == "neuron"
    assert platform_device(CudaPlatform()) == "cuda"
    assert platform_device(CpuPlatform()) == "cpu"


# -- outputs ----------------------------------------------------------------------------------


def lp(logprob: float, rank: int) -> SimpleNamespace:
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=None)


def test_token_logprobs_sampled_token_and_top_alternatives():
    # the sampled token (7) is rank 3: vLLM adds it to the top-2; ours keeps it apart
    pos = {5: lp(-0.1, 1), 6: lp(-1.0, 2), 7: lp(-2.0, 3)}
    (out,) = token_logprobs([7], [pos], top_n=2)
    assert (out.token_id, out.logprob, out.rank) == (7, -2.0, 3)
    assert out.top == ((5, -0.1), (6, -1.0))
    (out,) = token_logprobs([5], [{5: lp(-0.1, 1)}], top_n=0)
    assert out.top == () and out.rank == 1


def vout(text: str, ids: list[int], finish: str | None = None, stop_reason: Any = None,
         logprobs: Any = None) -> SimpleNamespace:
    comp = SimpleNamespace(text=text, token_ids=ids, finish_reason=finish,
                           stop_reason=stop_reason, logprobs=logprobs)
    return SimpleNamespace(outputs=[comp], finished=finish is not None)


def test_output_accumulator_turns_deltas_into_snapshots():
    acc = OutputAccumulator("r", [1, 2], SamplingParams(max_tokens=4, logprobs=1))
    a = acc.feed(vout("Hel", [10], logprobs=[{10: lp(-0.5, 1)}]))
    b = acc.feed(vout("lo", [11], finish="stop", stop_reason="\n",
                      logprobs=[{11: lp(-0.2, 1)}]))
    assert (a.text, a.delta, a.token_ids, a.finished) == ("Hel", "Hel", (10,), False)
    assert (b.text, b.delta, b.token_ids, b.new_token_ids) == ("Hello", "lo", (10, 11), (11,))
    assert b.finish_reason == FinishReason.STOP and b.stop_reason == "\n"
    assert [x.token_id for x in b.logprobs] == [10, 11] and len(b.new_logprobs) == 1
    acc = OutputAccumulator("r", [1], SamplingParams())
    assert acc.feed(vout("", [], finish="length")).finish_reason == FinishReason.LENGTH
    assert acc.feed(vout("", [], finish="weird")).finish_reason == FinishReason.ERROR


# -- the engine, on a fake vLLM --------------------------------------------------------------


@dataclasses.dataclass
class FakeArgs:
    model: str = ""
    served_model_name: Any = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    disable_log_stats: bool = False
    enable_prefix_caching: bool | None = None
    additional_config: dict | None = None


class DeadError(Exception):
    pass


class FakeLLM:
    """``AsyncLLM``: each request gets the words of ``script`` one by one, then ``stop``."""

    def __init__(self, args: FakeArgs, tokenizer: Any) -> None:
        self.args = args
        self.tokenizer = tokenizer
        self.vllm_config = SimpleNamespace(model_config=SimpleNamespace(
            max_model_len=args.max_model_len or 128))
        self.script = ["Hello", " there", "!"]
        self.fail: BaseException | None = None
        self.errored = False
        self.dead_error = DeadError("dead")
        self.aborted: list[str] = []
        self.closed: list[str] = []
        self.requests: list[tuple[Any, Any, str]] = []
        self.shut = False
        self.hold: threading.Event | None = None  # set: the first output may come

    async def generate(self, prompt: Any, params: Any, request_id: str
                       ) -> AsyncIterator[SimpleNamespace]:
        self.requests.append((prompt, params, request_id))
        try:
            if self.fail is not None:
                if isinstance(self.fail, DeadError):
                    self.errored = True
                raise self.fail
            while self.hold is not None and not self.hold.is_set():  # "prefill"
                await asyncio.sleep(0.01)
            for i, word in enumerate(self.script):
                last = i == len(self.script) - 1
                yield vout(word, [100 + i], finish="stop" if last else None)
        except GeneratorExit:  # what vLLM does when its stream is closed early
            self.closed.append(request_id)
            raise

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.shut = True


@dataclasses.dataclass
class FakeStructuredOutputsParams:  # vLLM 0.11+'s fields
    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


@dataclasses.dataclass
class FakeGuidedDecodingParams:  # older: no per-request whitespace switch
    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def test_structured_outputs_map_to_the_installed_vllms_parameters():
    new = structured_kwargs(FakeStructuredOutputsParams, "structured_outputs")
    schema = {"type": "object"}
    assert new(StructuredOutput(StructuredKind.JSON, json.dumps(schema))) == {
        "structured_outputs": FakeStructuredOutputsParams(json=schema,
                                                          disable_any_whitespace=True)}
    assert new(StructuredOutput(StructuredKind.CHOICE, '["a", "b"]'))[
        "structured_outputs"].choice == ["a", "b"]
    assert new(StructuredOutput(StructuredKind.JSON_OBJECT))["structured_outputs"].json_object
    old = structured_kwargs(FakeGuidedDecodingParams, "guided_decoding")
    assert old(StructuredOutput(StructuredKind.REGEX, "a+")) == {
        "guided_decoding": FakeGuidedDecodingParams(regex="a+")}
    assert old(StructuredOutput(StructuredKind.GRAMMAR, "root ::= \"x\""))[
        "guided_decoding"].grammar == 'root ::= "x"'


def fake_vllm(tokenizer: Any = None, platform: Any = None) -> _VLLM:
    def from_engine_args(args: FakeArgs, usage_context: Any = None) -> FakeLLM:
        return FakeLLM(args, tokenizer)

    return _VLLM(version="0.99.fake", AsyncEngineArgs=FakeArgs,
                 AsyncLLM=SimpleNamespace(from_engine_args=from_engine_args),
                 SamplingParams=lambda **kw: SimpleNamespace(**kw), DELTA="DELTA",
                 usage_context="OPENAI_API_SERVER",
                 make_prompt=lambda ids: {"type": "token", "prompt_token_ids": ids},
                 client_errors=(ValueError,), dead_error=DeadError,
                 platform=platform or CpuPlatform(), registry=None,
                 structured=structured_kwargs(FakeStructuredOutputsParams, "structured_outputs"),
                 structured_config=None)


@pytest.fixture
def tokenizer(llama3_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))


def loaded(config: ServerConfig, tokenizer: Any, failures: list | None = None) -> VLLMEngine:
    engine = VLLMEngine(config, on_failure=(failures.append if failures is not None else None),
                        vllm=fake_vllm(tokenizer))
    engine._resolve_model = lambda: ("/models/tiny", "tiny")  # type: ignore[method-assign]
    engine.start()
    engine._thread.join(10)
    return engine


def collect(engine: VLLMEngine, params: SamplingParams | None = None, n: int | None = None
            ) -> list[Any]:
    async def run() -> list[Any]:
        out = []
        stream = engine.generate("r1", [1, 2, 3], params or SamplingParams(max_tokens=8))
        async for o in stream:
            out.append(o)
            if n is not None and len(out) == n:
                await stream.aclose()
                break
        return out

    return asyncio.run(run())


def test_loads_and_streams_snapshots(tokenizer):
    engine = loaded(cfg(max_model_len=64, served_model_name="svc",
                        vllm_args=(("enable_prefix_caching", True),)), tokenizer)
    assert engine.state == EngineState.READY and engine.name == "vllm"
    info = engine.info
    assert (info.name, info.max_model_len, info.max_prompt_len) == ("tiny", 64, 64)
    assert info.context_encoding_buckets == () and info.tokenizer is tokenizer
    assert engine.llm.args.served_model_name == ["svc"]
    assert engine.llm.args.enable_prefix_caching is True
    outs = collect(engine, SamplingParams(max_tokens=8, temperature=0, stop=("x",), seed=3))
    assert [o.delta for o in outs] == ["Hello", " there", "!"]
    assert outs[-1].text == "Hello there!" and outs[-1].finish_reason == FinishReason.STOP
    assert outs[-1].token_ids == (100, 101, 102) and outs[-1].prompt_token_ids == (1, 2, 3)
    prompt, params, rid = engine.llm.requests[0]
    assert prompt == {"type": "token", "prompt_token_ids": [1, 2, 3]} and rid == "r1"
    assert (params.output_kind, params.max_tokens, params.stop, params.seed, params.n) == (
        "DELTA", 8, ["x"], 3, 1)
    assert engine.projected_waiting(0) == 0
    engine.stop()
    assert engine.llm.shut and engine.state == EngineState.STOPPED


def test_closing_the_stream_early_aborts_in_vllm(tokenizer):
    engine = loaded(cfg(), tokenizer)
    outs = collect(engine, n=1)
    assert len(outs) == 1 and engine.llm.closed == ["r1"]  # vLLM's stream closed: it aborts
    assert engine._inflight == 0


def test_engine_death_fails_the_server_and_the_request(tokenizer):
    failures: list[BaseException] = []
    engine = loaded(cfg(), tokenizer, failures)
    engine.llm.fail = DeadError("core died")
    with pytest.raises(EngineDead, match="core died"):
        collect(engine)
    assert engine.state == EngineState.FAILED and len(failures) == 1
    assert "core died" in engine.error


def test_request_errors_and_failures_inside_the_engine(tokenizer):
    engine = loaded(cfg(), tokenizer)
    engine.llm.fail = ValueError("prompt too long for this engine")
    with pytest.raises(EngineRequestError, match="prompt too long") as e:
        collect(engine)
    assert e.value.status == 400
    engine.llm.fail = RuntimeError("kernel failed")  # vLLM: EngineGenerateError, engine alive
    (out,) = collect(engine)
    assert out.finish_reason == FinishReason.ERROR and engine.state == EngineState.READY


def test_load_failure_and_device_mismatch(tokenizer):
    failures: list[BaseException] = []
    engine = VLLMEngine(cfg(), on_failure=failures.append, vllm=fake_vllm(tokenizer))

    def missing() -> tuple[str, str]:
        raise FileNotFoundError("model not found: 'nope'")

    engine._resolve_model = missing  # type: ignore[method-assign]
    engine.start()
    engine._thread.join(10)
    assert engine.state == EngineState.FAILED and "model not found" in engine.error
    assert len(failures) == 1
    with pytest.raises(ConfigError, match=r"--device cuda, but vLLM 0\.99\.fake runs on cpu"):
        VLLMEngine(cfg(device="cuda"), vllm=fake_vllm(tokenizer))
    VLLMEngine(cfg(device="neuron"), vllm=fake_vllm(tokenizer, NeuronPlatform()))
    with pytest.raises(ConfigError, match="not an engine argument"):
        VLLMEngine(cfg(vllm_args=(("no_such_arg", 1),)), vllm=fake_vllm(tokenizer))


def test_the_server_is_the_same_code_on_either_engine(tokenizer):
    """The HTTP server on the vLLM engine front (fake vLLM below it): chat,
    /tokenize, /ready, errors, the response counter."""
    from server.app import build_app

    config = cfg(served_model_name="tiny")
    engine = loaded(config, tokenizer)
    engine.start = lambda: None  # type: ignore[method-assign]  (already loaded)
    engine.metrics_text = lambda: b""  # type: ignore[method-assign]
    with ThreadServer(build_app(config, engine=engine)) as srv:
        wait_ready(srv.url, timeout=30)
        ready = httpx.get(f"{srv.url}/ready").json()
        assert ready["engine"] == "vllm" and "context_encoding_buckets" not in ready
        msgs = [{"role": "user", "content": "hi"}]
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30,
                       json={"model": "tiny", "messages": msgs, "max_tokens": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == "Hello there!"
        n_prompt = httpx.post(f"{srv.url}/tokenize", json={"messages": msgs}).json()["count"]
        assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 3,
                                 "total_tokens": n_prompt + 3,
                                 "prompt_tokens_details": {"cached_tokens": 0}}
        r = httpx.post(f"{srv.url}/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "x", "max_tokens": 500})
        assert r.status_code == 400 and "exceeds max_model_len (128)" in r.text
        engine.llm.fail = ValueError("bad sampling for vLLM")
        r = httpx.post(f"{srv.url}/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 400 and "bad sampling for vLLM" in r.json()["error"]["message"]
        engine.llm.fail = None
        # the stream's first event (the role chunk) goes out with the first token, not before
        engine.llm.hold = threading.Event()
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", timeout=30, json={
                "model": "tiny", "messages": msgs, "stream": True}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            first: list[str] = []
            reader = threading.Thread(target=lambda: first.append(next(lines)), daemon=True)
            reader.start()
            reader.join(0.5)
            assert first == []  # nothing while the engine has produced nothing
            engine.llm.hold.set()
            reader.join(10)
            event = json.loads(first[0][len("data: "):])
            assert event["choices"][0]["delta"]["role"] == "assistant"
            rest = "".join(lines)
        assert '"content": "Hello"' in rest and rest.endswith("data: [DONE]")
        engine.llm.hold = None
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'ragserve_http_requests_total{model_name="tiny",route="/v1/completions",' \
               'status="400"} 2.0' in metrics


# -- the installed vLLM (make test-vllm) -------------------------------------------------------


@pytest.mark.vllm
def test_the_installed_vllm_has_what_the_engine_uses(tiny_llama_dir: Path):
    from server.vllm_engine import engine_arg_fields, import_vllm

    v = import_vllm()
    fields = engine_arg_fields(v.AsyncEngineArgs)
    assert {"model", "served_model_name", "max_model_len", "max_num_seqs",
            "tensor_parallel_size", "dtype", "kv_cache_dtype", "disable_log_stats",
            "additional_config", "enable_prefix_caching"} <= fields
    kw = engine_kwargs(cfg(max_model_len=256, vllm_args=(("enforce_eager", True),)),
                       str(tiny_llama_dir), "tiny", fields)
    args = v.AsyncEngineArgs(**kw)
    assert args.enforce_eager is True and args.max_model_len == 256
    assert v.make_prompt([1, 2])["prompt_token_ids"] == [1, 2]
    assert platform_device(v.platform) == "cpu"
    params = VLLMEngine.sampling_params(SimpleNamespace(v=v), SamplingParams(
        max_tokens=5, temperature=0.5, top_k=3, stop=("a",), logprobs=2, seed=1))
    assert (params.max_tokens, params.top_k, params.stop, params.logprobs) == (5, 3, ["a"], 2)
    assert params.output_kind == v.DELTA
