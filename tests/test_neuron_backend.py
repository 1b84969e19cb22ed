"""The Neuron backend without Neuron: config translation, the compiled-graph cache, validation
order, the missing-package error and the forward-call mapping (a fake model records calls).

Nothing here pretends Neuron runs; transformers-neuronx is never imported.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bucketing import BucketConfig
from engine.core import Engine, EngineConfig
from runtime import neuron_plan
from runtime.backends import neuron
from runtime.backends.neuron import (
    GraphCache,
    NeuronBackend,
    NeuronSettings,
    NeuronUnavailableError,
    cache_fields,
    cache_key,
    neuron_config_fields,
    neuron_kwargs,
)
from runtime.runner import BucketedBatch
from scheduler import ScheduledRow, SchedulerOutput
from server.config import config_from_args

VERSIONS = {"transformers-neuronx": "0.13.322", "neuronx-cc": "2.16.372.0",
            "torch-neuronx": "2.1.2.2.4.0"}
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 1024,
        "torch_dtype": "bfloat16"}


@pytest.fixture(autouse=True)
def no_neuron_imports():
    """Every test: transformers-neuronx must not get imported (it is not installed here, but a
    stray import would also be a bug on a machine that has it)."""
    yield
    assert not any(m.split(".")[0] in ("transformers_neuronx", "torch_neuronx", "neuronxcc")
                   for m in sys.modules)


def buckets(max_len: int = 1024, seqs: int = 8, **kw: Any) -> BucketConfig:
    return BucketConfig.default(max_len, seqs, **kw)


def settings(**kw: Any) -> NeuronSettings:
    b = buckets(kw.pop("max_model_len", 1024), kw.pop("max_num_seqs", 8),
                context_encoding_buckets=kw.pop("ce", (128, 512)),
                token_generation_buckets=kw.pop("tg", (256, 1024)))
    return NeuronSettings.create(b, tp_degree=kw.pop("tp_degree", 2),
                                 dtype=kw.pop("dtype", "auto"), hf_config=TINY, **kw)


def model_dir(tmp_path: Path, config: dict[str, Any] = TINY) -> Path:
    d = tmp_path / "model"
    if d.is_dir():  # rewriting would change the weights' mtime, and so the cache key
        return d
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


# -- config translation ------------------------------------------------------------------------


def test_kwargs_are_exactly_what_llama_for_sampling_takes():
    s = settings(max_num_seqs=8, tp_degree=2, dtype="bfloat16")
    kw = neuron_kwargs(s)
    assert kw == {
        "batch_size": 8,
        "tp_degree": 2,
        "amp": "bf16",
        "n_positions": [256, 1024],
        "context_length_estimate": [128, 512],
        "neuron_config": {
            "continuous_batching": {"batch_size_for_shared_caches": 8},
            "attention_layout": "BSH",
            "collectives_layout": "BSH",
            "fuse_qkv": True,
            "padding_side": "right",
            "cast_logits_dtype": "float32",
        },
    }
    # bucket.token_sizes / context_sizes only take a bucket list when it is a `list`
    assert type(kw["n_positions"]) is list and type(kw["context_length_estimate"]) is list
    # module.py from_pretrained asserts this equality under continuous batching
    assert kw["batch_size"] == kw["neuron_config"]["continuous_batching"][
        "batch_size_for_shared_caches"]


@pytest.mark.parametrize(("dtype", "amp"), [("auto", "bf16"), ("bfloat16", "bf16"),
                                            ("float16", "f16"), ("half", "f16"),
                                            ("float32", "f32"), ("fp32", "f32")])
def test_amp_from_dtype(dtype: str, amp: str):
    assert settings(dtype=dtype).amp == amp


def test_auto_dtype_follows_the_checkpoint():
    b = buckets()
    s = NeuronSettings.create(b, tp_degree=1, dtype="auto",
                              hf_config={**TINY, "torch_dtype": "float32"})
    assert s.amp == "f32" and s.dtype == "float32"


@pytest.mark.parametrize(("kw", "match"), [
    ({"dtype": "int8"}, "--dtype"),
    ({"kv_cache_dtype": "float32"}, "--kv-cache-dtype"),
    ({"tp_degree": 0}, "--tensor-parallel-size"),
])
def test_bad_settings_name_the_flag(kw: dict[str, Any], match: str):
    with pytest.raises(ValueError, match=match):
        settings(**kw)


def test_fields_dict_builds_a_neuron_config():
    """How build_backend turns the plain dict into NeuronConfig(ContinuousBatchingConfig(...))."""
    made: dict[str, Any] = {}
    nx = FakeNeuron(made)
    neuron_config = nx.NeuronConfig(**{
        **neuron_config_fields(settings()),
        "continuous_batching": nx.ContinuousBatchingConfig(batch_size_for_shared_caches=8)})
    assert neuron_config.kwargs["continuous_batching"].kwargs == {
        "batch_size_for_shared_caches": 8}


# -- cache keying ------------------------------------------------------------------------------


def test_same_config_same_key(tmp_path: Path):
    d = model_dir(tmp_path)
    assert cache_key(cache_fields(settings(), d, VERSIONS)) == cache_key(
        cache_fields(settings(), d, VERSIONS))


@pytest.mark.parametrize("change", [
    {"max_num_seqs": 4}, {"tp_degree": 4}, {"dtype": "float16"},
    {"ce": (128, 256, 512)}, {"tg": (512, 1024)}, {"max_model_len": 2048, "tg": (256, 2048)},
])
def test_each_setting_changes_the_key(tmp_path: Path, change: dict[str, Any]):
    d = model_dir(tmp_path)
    assert cache_key(cache_fields(settings(**change), d, VERSIONS)) != cache_key(
        cache_fields(settings(), d, VERSIONS))


@pytest.mark.parametrize("package", sorted(VERSIONS))
def test_package_versions_change_the_key(tmp_path: Path, package: str):
    d = model_dir(tmp_path)
    assert cache_key(cache_fields(settings(), d, {**VERSIONS, package: "absent"})) != cache_key(
        cache_fields(settings(), d, VERSIONS))


def test_versions_default_to_installed_or_absent(tmp_path: Path):
    fields = cache_fields(settings(), model_dir(tmp_path))
    assert fields["versions"] == dict.fromkeys(VERSIONS, "absent")


def test_model_changes_the_key(tmp_path: Path):
    d = model_dir(tmp_path)
    before = cache_key(cache_fields(settings(), d, VERSIONS))
    (d / "config.json").write_text(json.dumps({**TINY, "rope_theta": 500000.0}))
    after_config = cache_key(cache_fields(settings(), d, VERSIONS))
    (d / "model.safetensors").write_bytes(b"\0" * 65)
    after_weights = cache_key(cache_fields(settings(), d, VERSIONS))
    assert len({before, after_config, after_weights}) == 3


# -- the cache: hit, miss, mismatch ------------------------------------------------------------


class FakeModel:
    """Stands in for LlamaForSampling: records calls, returns logits whose row i is filled with
    the slot (start_ids[i]) and whose last column is the last cache id."""

    def __init__(self, log: list[tuple[str, Any]], vocab: int = 100) -> None:
        self.log = log
        self.vocab = vocab

    def __call__(self, input_ids: torch.Tensor, cache_ids: torch.Tensor,
                 start_ids: torch.Tensor) -> torch.Tensor:
        self.log.append(("forward", (input_ids.clone(), cache_ids.clone(), start_ids.clone())))
        out = start_ids.float().unsqueeze(1).expand(-1, self.vocab).clone()
        out[:, -1] = cache_ids.max(dim=1).values.float()
        return out.to(torch.bfloat16)

    def load(self, directory: str) -> None:
        self.log.append(("load", directory))

    def to_neuron(self) -> None:
        self.log.append(("to_neuron", None))

    def save(self, directory: str) -> None:
        self.log.append(("save", directory))
        (Path(directory) / "graph.neff").write_bytes(b"neff")


class FakeNeuron(SimpleNamespace):
    """The namespace _import_neuron returns, with recording constructors."""

    def __init__(self, made: dict[str, Any]) -> None:
        calls: list[tuple[str, Any]] = []

        class Cfg:
            def __init__(self, **kwargs: Any) -> None:
                self.kwargs = kwargs

        class Llama:
            @staticmethod
            def from_pretrained(path: str, **kwargs: Any) -> FakeModel:
                made["path"], made["kwargs"] = path, kwargs
                return FakeModel(calls)

        super().__init__(LlamaForSampling=Llama, NeuronConfig=Cfg, ContinuousBatchingConfig=Cfg,
                         calls=calls)


def build(tmp_path: Path, made: dict[str, Any], s: NeuronSettings | None = None,
          progress: list[tuple[str, float]] | None = None) -> FakeNeuron:
    nx = FakeNeuron(made)
    s = s or settings()
    b = buckets(context_encoding_buckets=s.context_encoding_buckets,
                token_generation_buckets=s.token_generation_buckets)
    neuron.build_backend(model_dir(tmp_path), b, s, cache_dir=tmp_path / "cache",
                         vocab_size=100, warmup=False, neuron=nx,
                         on_progress=None if progress is None else
                         lambda st, f: progress.append((st, f)))
    return nx


def test_first_start_compiles_and_saves_then_restart_loads(tmp_path: Path):
    made: dict[str, Any] = {}
    progress: list[tuple[str, float]] = []
    nx = build(tmp_path, made, progress=progress)
    assert [c[0] for c in nx.calls] == ["to_neuron", "save"]
    kw = made["kwargs"]
    assert kw["n_positions"] == [256, 1024] and kw["batch_size"] == 8
    assert kw["neuron_config"].kwargs["continuous_batching"].kwargs == {
        "batch_size_for_shared_caches": 8}
    [entry] = [d for d in (tmp_path / "cache" / "neuron").iterdir()]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["key"] == entry.name and meta["fields"]["tp_degree"] == 2
    assert (entry / "graph.neff").is_file()
    assert [p[0] for p in progress] == ["loading weights", "compiling", "saving compiled graphs",
                                        "ready"]

    nx = build(tmp_path, made)
    assert nx.calls == [("load", str(entry)), ("to_neuron", None)]  # load() before to_neuron()


def test_changed_config_compiles_anew_and_says_why(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture):
    build(tmp_path, {})
    with caplog.at_level(logging.INFO, logger="runtime.backends.neuron"):
        nx = build(tmp_path, {}, settings(tp_degree=4))
    assert [c[0] for c in nx.calls] == ["to_neuron", "save"]
    assert "tp_degree: 2 -> 4" in caplog.text
    assert len(list((tmp_path / "cache" / "neuron").iterdir())) == 2


def test_mismatched_meta_is_reported_and_never_used(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture):
    fields = cache_fields(settings(), model_dir(tmp_path))
    forged = tmp_path / "cache" / "neuron" / cache_key(fields)
    forged.mkdir(parents=True)
    (forged / "meta.json").write_text(json.dumps(
        {"key": forged.name, "created": 0, "fields": {**fields, "batch_size": 64}}))
    with caplog.at_level(logging.INFO, logger="runtime.backends.neuron"):
        nx = build(tmp_path, {})
    assert [c[0] for c in nx.calls] == ["to_neuron", "save"]  # compiled, not loaded
    assert "do not match the requested config" in caplog.text
    assert "batch_size: 64 -> 8" in caplog.text
    rejected = [d.name for d in forged.parent.iterdir() if ".rejected-" in d.name]
    assert len(rejected) == 1
    assert json.loads((forged / "meta.json").read_text())["fields"] == fields


def test_unfinished_save_is_not_used(tmp_path: Path):
    fields = cache_fields(settings(), model_dir(tmp_path))
    (tmp_path / "cache" / "neuron" / cache_key(fields)).mkdir(parents=True)  # no meta.json
    entry = GraphCache(tmp_path / "cache" / "neuron").lookup(fields)
    assert not entry.hit and not entry.directory.exists()


# -- validation, then the package check --------------------------------------------------------


def engine_config(tmp_path: Path, **kw: Any) -> EngineConfig:
    return EngineConfig(model=str(model_dir(tmp_path, kw.pop("config", TINY))), device="neuron",
                        max_model_len=1024, context_encoding_buckets=(128, 512),
                        token_generation_buckets=(256, 1024), cache_dir=tmp_path / "cache",
                        **kw)


def test_without_the_packages_the_error_says_use_the_container(tmp_path: Path):
    with pytest.raises(NeuronUnavailableError, match=r"Dockerfile\.neuron"):
        Engine.from_config(engine_config(tmp_path, tp_degree=2))


def test_server_config_path_reaches_the_same_error(tmp_path: Path):
    model_dir(tmp_path)
    cfg = config_from_args(
        ["--device", "neuron", "--model", str(tmp_path / "model"), "--max-model-len", "1024",
         "--tensor-parallel-size", "2"], environ={})
    assert cfg.engine_config().tp_degree == 2
    with pytest.raises(NeuronUnavailableError, match="transformers-neuronx"):
        Engine.from_config(cfg.engine_config())


@pytest.mark.parametrize(("kw", "match"), [
    ({"tp_degree": 3}, "--tensor-parallel-size 3"),
    ({"config": {**TINY, "hidden_size": 65536, "intermediate_size": 262144,
                 "num_hidden_layers": 200}}, "HBM"),
])
def test_validation_fails_before_any_neuron_import(tmp_path: Path, kw: dict[str, Any],
                                                   match: str,
                                                   monkeypatch: pytest.MonkeyPatch):
    def boom() -> None:
        raise AssertionError("imported Neuron before validating")

    monkeypatch.setattr(neuron, "_import_neuron", boom)
    with pytest.raises(neuron_plan.NeuronConfigError, match=match):
        Engine.from_config(engine_config(tmp_path, **kw))


def test_tp_beyond_this_instance_is_refused():
    with pytest.raises(neuron_plan.NeuronConfigError, match="this instance has 2"):
        neuron.validate(settings(tp_degree=8), TINY, cores=2)


def test_validate_gets_our_numbers(monkeypatch: pytest.MonkeyPatch):
    seen: dict[str, Any] = {}

    def fake_validate(shape: Any, **kw: Any) -> SimpleNamespace:
        seen.update(kw, shape=shape)
        return SimpleNamespace(total=2**30, hbm=16 * 2**30)

    monkeypatch.setattr(neuron_plan, "validate", fake_validate)
    neuron.validate(settings(), TINY)
    assert seen["shape"].num_key_value_heads == 2
    assert {k: v for k, v in seen.items() if k != "shape"} == {
        "tp_degree": 2, "batch_size": 8, "max_model_len": 1024,
        "context_encoding_buckets": [128, 512], "token_generation_buckets": [256, 1024],
        "dtype": "bfloat16", "instance": None}


def test_tp_on_cpu_is_refused():
    with pytest.raises(ValueError, match="only device neuron"):
        Engine.from_config(EngineConfig(device="cpu", tp_degree=2))


# -- the forward-call mapping ------------------------------------------------------------------


def backend(seqs: int = 4) -> tuple[NeuronBackend, list[tuple[str, Any]]]:
    calls: list[tuple[str, Any]] = []
    b = BucketConfig.default(64, seqs, min_bucket=8, context_encoding_buckets=(8, 16))
    return NeuronBackend(FakeModel(calls), b, vocab_size=100), calls


def test_prefill_runs_each_real_row_trimmed_in_its_slot():
    be, calls = backend()
    out = SchedulerOutput(bucket=be.buckets.prefill(5, 3),
                          rows=(ScheduledRow("a", 2, (11, 12, 13, 14, 15), 0),
                                ScheduledRow("b", 0, (21, 22, 23), 0),
                                ScheduledRow("c", 3, (31,), 0)))
    batch = BucketedBatch.pack(out, be.scratch_slot)
    assert batch.input_ids.shape == (4, 8)  # 3 rows + 1 padding row in the scratch slot
    logits = be.forward(batch.input_ids, batch.cache_ids, batch.start_ids, batch.last_token_id)

    args = [c[1] for c in calls]
    assert len(args) == 3  # the scratch-slot row is not sent
    (ids0, pos0, s0), (ids1, pos1, s1), (ids2, pos2, s2) = args
    assert ids0.tolist() == [[11, 12, 13, 14, 15]] and pos0.tolist() == [[0, 1, 2, 3, 4]]
    assert s0.tolist() == [2]
    assert ids1.tolist() == [[21, 22, 23]] and pos1.tolist() == [[0, 1, 2]] and s1.tolist() == [0]
    # one token: two tokens with cache ids [0, 0], so it stays context encoding, last id 0
    assert ids2.tolist() == [[31, 0]] and pos2.tolist() == [[0, 0]] and s2.tolist() == [3]

    assert logits.dtype == torch.float32 and logits.shape == (4, 100)
    assert logits[:3, 0].tolist() == [2.0, 0.0, 3.0]  # each row's logits from its own slot
    assert logits[:3, -1].tolist() == [4.0, 2.0, 0.0]  # ... at its own last token
    assert logits[3].abs().sum() == 0  # padding row: zeros, discarded by the runner


def test_decode_sends_the_slot_layout_as_is():
    be, calls = backend()
    out = SchedulerOutput(bucket=be.buckets.decode(40, 3),
                          rows=(ScheduledRow("a", 0, (7,), 30), ScheduledRow("c", 2, (9,), 20)))
    batch = BucketedBatch.pack(out, be.scratch_slot)
    logits = be.forward(batch.input_ids, batch.cache_ids, batch.start_ids, batch.last_token_id)
    [(_, (ids, pos, slots))] = calls
    assert ids.tolist() == [[7], [0], [9], [0]][: len(ids)]
    assert pos.tolist() == [[30], [0], [20], [0]][: len(pos)]
    assert slots.tolist() == list(range(len(slots)))
    assert logits.shape == (len(slots), 100) and logits.dtype == torch.float32


def test_decode_rows_must_be_slots():
    be, _ = backend()
    with pytest.raises(ValueError, match="slots"):
        be.forward(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long),
                   torch.tensor([1, 0]), torch.zeros(2, dtype=torch.long))


def test_warmup_touches_every_graph_in_slot_zero():
    be, calls = backend()
    be.warmup()
    shapes = [(c[1][0].shape[1], int(c[1][1].max()), c[1][2].tolist()) for c in calls]
    assert shapes == [(8, 7, [0]), (16, 15, [0])] + [
        (1, n - 1, [0]) for n in be.buckets.token_generation_buckets]


# -- /ready while compiling --------------------------------------------------------------------


def test_ready_says_compiling_with_progress(monkeypatch: pytest.MonkeyPatch):
    import threading

    import httpx
    from serverutil import ThreadServer

    from server.app import build_app
    from server.config import ServerConfig

    reported, release = threading.Event(), threading.Event()

    def compiling(cfg: EngineConfig, on_progress=None) -> Engine:
        # what Engine.from_config does for device neuron while neuronx-cc runs
        on_progress("compiling", 0.2)
        reported.set()
        release.wait(30)
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(Engine, "from_config", staticmethod(compiling))
    # on a thread: the patch above does not reach a spawned engine process
    with ThreadServer(build_app(ServerConfig(engine_process=False))) as srv:
        assert reported.wait(30)
        r = httpx.get(f"{srv.url}/ready")
        release.set()
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    body = r.json()
    assert (body["status"], body["phase"], body["progress"]) == ("compiling", "compiling", 0.2)


def test_cached_graphs_that_fail_to_load_are_moved_aside(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    build(tmp_path, {})

    def missing_neff(self: FakeModel) -> None:
        raise FileNotFoundError("Could not find a matching NEFF for your HLO")

    monkeypatch.setattr(FakeModel, "to_neuron", missing_neff)
    with pytest.raises(RuntimeError, match="restart to compile anew"):
        build(tmp_path, {})
    names = [d.name for d in (tmp_path / "cache" / "neuron").iterdir()]
    assert len(names) == 1 and ".rejected-" in names[0]
