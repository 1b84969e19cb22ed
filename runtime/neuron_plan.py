"""Size a Llama model for NeuronCores: validate a configuration, recommend one, print the budget.

Pure integer arithmetic on a Hugging Face ``config.json``: no torch, no Neuron packages, no
weights; it imports the standard library and bucketing only. ``validate`` runs before any
compile (the neuron backend calls it); ``recommend`` and ``format_plan`` back
``ragserve neuron plan`` (:mod:`planning.neuron`: planning/'s only import from runtime/, which
is why this module must stay free of torch).

The numbers are estimates. Weights and KV cache are counted exactly as transformers-neuronx
lays them out (Q-head and vocabulary padding, KV-head replication); compiled graphs,
activations and the runtime are covered by a fixed reserve of :data:`OVERHEAD_FRACTION` of
each core's HBM, which is a rule of thumb, not a measurement.

Sources:
- Instances: the AWS Neuron architecture pages (Inf2: 1/1/6/12 Inferentia2 chips of 2
  NeuronCore-v2 and 32 GiB HBM each; Trn1: 1/16 Trainium chips of 2 NeuronCore-v2 and 32 GiB
  each), https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/arch/neuron-hardware/
  inf2-arch.html and trn1-arch.html.
- Supported TP degrees (Neuron runtime collectives): NxD Inference developer guide,
  "Tensor-parallelism support": Inf2 1, 2, 4, 8, 24; Trn1 1, 2, 8, 16, 32 (the older
  transformers-neuronx guide lists Trn1 1, 2, 8, 32), 16 GB of memory per NeuronCore.
- Head padding and KV sharding: transformers-neuronx commit 1ade6d7,
  ``src/transformers_neuronx/utils.py`` (``get_qkv_padding``), ``decoder.py``
  (``check_gqa_fallback``, ``DecoderLayer.to_neuron``, lm_head vocab padding) and
  ``llama/model.py`` (``LlamaForSampling``, ``allow_pad=True``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import MappingProxyType

from bucketing import (
    CONTEXT_ENCODING_FLAG,
    DEFAULT_MIN_BUCKET,
    TOKEN_GENERATION_FLAG,
    generate_buckets,
)

GiB = 1 << 30

#: Share of each core's HBM held back for compiled graphs (NEFFs), activations, collective
#: buffers and the Neuron runtime. An estimate: 1.6 GiB of 16 GiB.
OVERHEAD_FRACTION = 0.10

MAX_BATCH = 64  # the largest batch recommend() proposes
DEFAULT_MAX_MODEL_LEN_CAP = 8192  # recommend() without --max-model-len: min(model max, this)
MIN_BUCKET = DEFAULT_MIN_BUCKET  # smallest recommended bucket: where ragserve's defaults start

DTYPE_BYTES: Mapping[str, int] = MappingProxyType({
    "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "f16": 2,
    "float32": 4, "fp32": 4, "f32": 4,
    "auto": 2,  # the neuron backend runs bfloat16 unless told otherwise
})


class NeuronConfigError(ValueError):
    """A Neuron configuration that cannot work; the message names the number and the fix."""


@dataclass(frozen=True)
class Instance:
    name: str
    family: str  # "inf2" or "trn1": decides the supported TP degrees
    neuron_cores: int
    hbm_per_core: int  # bytes
    host_memory: int  # bytes: the checkpoint is loaded here before it is sharded

    @property
    def tp_degrees(self) -> tuple[int, ...]:
        """TP degrees the Neuron runtime supports on this instance (<= its NeuronCores)."""
        return tuple(t for t in SUPPORTED_TP[self.family] if t <= self.neuron_cores)


SUPPORTED_TP: Mapping[str, tuple[int, ...]] = MappingProxyType({
    "inf2": (1, 2, 4, 8, 24),
    "trn1": (1, 2, 8, 16, 32),
})

INSTANCES: Mapping[str, Instance] = MappingProxyType({i.name: i for i in (
    Instance("inf2.xlarge", "inf2", 2, 16 * GiB, 16 * GiB),
    Instance("inf2.8xlarge", "inf2", 2, 16 * GiB, 128 * GiB),
    Instance("inf2.24xlarge", "inf2", 12, 16 * GiB, 384 * GiB),
    Instance("inf2.48xlarge", "inf2", 24, 16 * GiB, 768 * GiB),
    Instance("trn1.2xlarge", "trn1", 2, 16 * GiB, 32 * GiB),
    Instance("trn1.32xlarge", "trn1", 32, 16 * GiB, 512 * GiB),
    Instance("trn1n.32xlarge", "trn1", 32, 16 * GiB, 512 * GiB),
)})

ALL_TP = tuple(sorted({t for ts in SUPPORTED_TP.values() for t in ts}))


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama ``config.json`` that decide memory."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    name: str = "the model"

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                    "num_hidden_layers", "intermediate_size", "vocab_size",
                    "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise NeuronConfigError(f"config.json: {key} must be >= 1, got "
                                        f"{getattr(self, key)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise NeuronConfigError(
                f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads {self.num_key_value_heads}")
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_config(cls, config: Mapping[str, object], name: str | None = None) -> ModelShape:
        """Read a Hugging Face Llama ``config.json`` (as a dict).

        >>> s = ModelShape.from_config({"hidden_size": 64, "num_attention_heads": 4,
        ...     "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100})
        >>> s.num_key_value_heads, s.head_dim, s.max_position_embeddings
        (4, 16, 2048)
        """
        def get(key: str, default: object = None) -> int:
            value = config.get(key)
            if value is None:  # absent or null
                value = default
            if value is None:
                raise NeuronConfigError(f"config.json has no {key!r}")
            if isinstance(value, bool) or not isinstance(value, int):
                raise NeuronConfigError(f"config.json: {key} must be an integer, got {value!r}")
            return value

        heads = get("num_attention_heads")
        return cls(
            hidden_size=get("hidden_size"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads", heads),
            num_hidden_layers=get("num_hidden_layers"),
            intermediate_size=get("intermediate_size"),
            vocab_size=get("vocab_size"),
            max_position_embeddings=get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=get("head_dim", 0),
            name=name or str(config.get("_name_or_path") or "the model"),
        )

    @property
    def num_parameters(self) -> int:
        """Parameters of the Hugging Face checkpoint (Llama: no biases, RMSNorm weights).

        >>> ModelShape(4096, 32, 8, 32, 14336, 128256, 8192).num_parameters  # Llama-3-8B
        8030261248
        """
        h, d = self.hidden_size, self.head_dim
        attn = 2 * h * self.num_attention_heads * d + 2 * h * self.num_key_value_heads * d
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        embed = self.vocab_size * h
        return self.num_hidden_layers * layer + h + embed * (1 if self.tie_word_embeddings else 2)


def qkv_heads(shape: ModelShape, tp_degree: int) -> tuple[int, int]:
    """Q and KV heads after transformers-neuronx pads/replicates them for ``tp_degree``.

    Follows ``utils.get_qkv_padding`` with the GQA mode ``decoder.check_gqa_fallback`` picks
    by default (commit 1ade6d7): KV heads are sharded when ``tp`` divides them, otherwise
    replicated (``GQA.REPLICATED_HEADS``); Q heads are padded up to a multiple of ``tp``.

    >>> llama70b = ModelShape(8192, 64, 8, 80, 28672, 128256, 8192)
    >>> qkv_heads(llama70b, 8), qkv_heads(llama70b, 24), qkv_heads(llama70b, 32)
    ((64, 8), (72, 24), (64, 32))
    """
    n_head, n_kv, tp = shape.num_attention_heads, shape.num_key_value_heads, tp_degree
    n_head_padded = math.ceil(n_head / tp) * tp
    if n_head == n_kv:  # MHA: K/V are padded like Q (DecoderLayer.to_neuron)
        return n_head_padded, n_head_padded
    if n_kv % tp == 0:  # GQA.SHARD_OVER_HEADS
        return n_head_padded, n_kv
    ratio = n_head // n_kv  # GQA.REPLICATED_HEADS: full replication unless partial suffices
    extra = n_head_padded - n_head
    if n_kv < tp and tp % n_kv == 0 and (n_head % tp == 0 or (extra > 0 and extra % n_kv == 0)):
        ratio = tp // n_kv
    elif n_head_padded * n_kv == n_head * tp:  # n_head_padded / tp == n_head / n_kv
        ratio = 1
    n_kv_padded = max(n_kv * ratio, tp)
    if n_kv_padded == n_head:
        n_kv_padded = n_head_padded
    return n_head_padded, n_kv_padded


def heads_ok(shape: ModelShape, tp_degree: int) -> bool:
    """Whether ``tp_degree`` splits the attention heads evenly.

    Either ``tp`` divides the Q heads, or (GQA) it is a multiple of the KV heads and the
    Q-head padding transformers-neuronx adds spreads evenly over the KV groups (the
    interleaved padding of ``DecoderLayer.to_neuron``): how Llama-3-70B (64 heads) runs on
    24 NeuronCores. Other uneven splits would also run, padded, but waste compute; we refuse them.

    >>> llama70b = ModelShape(8192, 64, 8, 80, 28672, 128256, 8192)
    >>> [t for t in ALL_TP if heads_ok(llama70b, t)]
    [1, 2, 4, 8, 16, 24, 32]
    >>> [t for t in ALL_TP if heads_ok(ModelShape(64, 6, 6, 1, 128, 100, 128), t)]
    [1, 2]
    """
    heads, kv = shape.num_attention_heads, shape.num_key_value_heads
    if heads % tp_degree == 0:
        return True
    extra = math.ceil(heads / tp_degree) * tp_degree - heads
    return kv < heads and tp_degree % kv == 0 and extra % kv == 0


@dataclass(frozen=True)
class MemoryEstimate:
    """HBM per NeuronCore, in bytes."""

    tp_degree: int
    batch_size: int
    max_model_len: int
    dtype: str
    weights: int
    kv_cache: int
    overhead: int
    hbm: int
    q_heads: int  # after padding, all cores together
    kv_heads_per_core: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    @property
    def free(self) -> int:
        """HBM left after weights, KV cache and the reserve (negative: does not fit)."""
        return self.hbm - self.total

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype.lower()]
    except KeyError:
        raise NeuronConfigError(f"--dtype {dtype!r} is not supported on Neuron: use bfloat16, "
                                "float16 or float32") from None


def estimate(shape: ModelShape, *, tp_degree: int, batch_size: int, max_model_len: int,
             dtype: str = "bfloat16", hbm_per_core: int = 16 * GiB) -> MemoryEstimate:
    """Weights, KV cache and reserve on one of ``tp_degree`` NeuronCores.

    Every weight is sharded over the cores (Q/O by padded heads, K/V by KV heads per core,
    MLP by the intermediate size padded to ``tp``, lm_head by the vocabulary padded to ``tp``);
    the embedding is counted sharded too, as with ``on_device_embedding`` (by default
    transformers-neuronx keeps it in host memory, so this errs on the safe side). The KV cache
    is one ``[max_model_len, batch_size]`` slot array per layer for K and for V
    (continuous batching with ``batch_size_for_shared_caches = batch_size``).

    >>> e = estimate(ModelShape(4096, 32, 8, 32, 14336, 128256, 8192),
    ...              tp_degree=2, batch_size=1, max_model_len=8192)
    >>> round(e.weights / GiB, 2), e.kv_cache // (1 << 20), e.kv_heads_per_core
    (7.48, 512, 4)
    """
    for what, value in (("--tensor-parallel-size", tp_degree), ("--max-num-seqs", batch_size),
                        ("--max-model-len", max_model_len)):
        if value < 1:
            raise NeuronConfigError(f"{what} must be >= 1, got {value}")
    nbytes = dtype_bytes(dtype)
    h, d, tp = shape.hidden_size, shape.head_dim, tp_degree
    q_heads, kv_heads = qkv_heads(shape, tp)
    kv_per_core = math.ceil(kv_heads / tp)
    layer = (2 * h * (q_heads // tp) * d  # q_proj, o_proj
             + 2 * h * kv_per_core * d  # k_proj, v_proj
             + 3 * h * math.ceil(shape.intermediate_size / tp)  # gate, up, down
             + 2 * h)  # two RMSNorms, replicated
    vocab = math.ceil(shape.vocab_size / tp)
    params = shape.num_hidden_layers * layer + h + 2 * h * vocab  # + final norm, lm_head, embed
    kv = 2 * shape.num_hidden_layers * batch_size * max_model_len * kv_per_core * d * nbytes
    return MemoryEstimate(
        tp_degree=tp, batch_size=batch_size, max_model_len=max_model_len, dtype=dtype,
        weights=params * nbytes, kv_cache=kv, overhead=int(OVERHEAD_FRACTION * hbm_per_core),
        hbm=hbm_per_core, q_heads=q_heads, kv_heads_per_core=kv_per_core)


def get_instance(name: str) -> Instance:
    try:
        return INSTANCES[name]
    except KeyError:
        raise NeuronConfigError(f"unknown instance {name!r}: use one of "
                                f"{', '.join(INSTANCES)}") from None


def _tp_choices(shape: ModelShape, instance: Instance | None) -> list[int]:
    tps = instance.tp_degrees if instance else ALL_TP
    return [t for t in tps if heads_ok(shape, t)]


def _max_batch(shape: ModelShape, tp: int, max_model_len: int, dtype: str, cap: int) -> int:
    """The largest batch <= ``cap`` that fits at ``tp`` (0: not even one sequence)."""
    one = estimate(shape, tp_degree=tp, batch_size=1, max_model_len=max_model_len, dtype=dtype)
    if not one.fits:
        return 0
    per_seq = one.kv_cache
    return min(cap, 1 + (one.free // per_seq if per_seq else cap))


def _smallest_fits(shape: ModelShape, batch_size: int, max_model_len: int,
                   dtype: str) -> list[tuple[int, Instance]]:
    """Per instance family, the fewest NeuronCores holding the model and the smallest instance
    with that many."""
    out = []
    for family, tps in SUPPORTED_TP.items():
        for tp in tps:
            if heads_ok(shape, tp) and estimate(
                    shape, tp_degree=tp, batch_size=batch_size, max_model_len=max_model_len,
                    dtype=dtype).fits:
                hosts = [i for i in INSTANCES.values()
                         if i.family == family and tp in i.tp_degrees]
                out.append((tp, min(hosts, key=lambda i: (i.neuron_cores, i.name))))
                break
    return out


def _gib(n: int, width: int = 0, digits: int = 1) -> str:
    return f"{n / GiB:{width}.{digits}f} GiB"


def _too_big(shape: ModelShape, est: MemoryEstimate, inst: Instance | None) -> NeuronConfigError:
    g = _gib
    where = f" on {inst.name}" if inst else ""
    msg = (f"{shape.name} {est.dtype} needs ~{g(est.total)} per NeuronCore at "
           f"--tensor-parallel-size {est.tp_degree}{where} (weights {g(est.weights)}, KV cache "
           f"{g(est.kv_cache)} for {est.batch_size} x {est.max_model_len} tokens, reserve "
           f"{g(est.overhead)}), more than its {g(est.hbm)} of HBM")
    fits = _smallest_fits(shape, est.batch_size, est.max_model_len, est.dtype)
    # the instance's own family first, then the fewest cores
    fits.sort(key=lambda f: (inst is not None and f[1].family != inst.family, f[0]))
    if not fits:
        msg += (f"; no instance holds it at --max-num-seqs {est.batch_size} --max-model-len "
                f"{est.max_model_len}: lower them")
    elif fits[0][0] > est.tp_degree:
        uses = [f"{i.name} with --tensor-parallel-size {tp}" for tp, i in fits]
        msg += (f": {shape.name} {est.dtype} needs >= {fits[0][0]} NeuronCores: use {uses[0]}"
                + (f" (or {', '.join(uses[1:])})" if len(uses) > 1 else ""))
    batch = _max_batch(shape, est.tp_degree, est.max_model_len, est.dtype, est.batch_size)
    if batch:
        msg += f"; or lower --max-num-seqs to {batch}"
    return NeuronConfigError(msg)


def validate(shape: ModelShape, *, tp_degree: int, batch_size: int, max_model_len: int,
             context_encoding_buckets: Sequence[int] = (),
             token_generation_buckets: Sequence[int] = (),
             dtype: str = "bfloat16", instance: str | None = None) -> MemoryEstimate:
    """Check a configuration before compiling; return its estimate or raise NeuronConfigError.

    Checks, in order: the instance exists; ``tp_degree`` is one the Neuron runtime supports
    and the instance has that many NeuronCores; ``tp_degree`` splits the attention heads
    (:func:`heads_ok`); ``max_model_len`` <= the model's ``max_position_embeddings``; no bucket
    exceeds ``max_model_len``; weights + KV cache + reserve fit one core's HBM.

    >>> s = ModelShape(8192, 64, 8, 80, 28672, 128256, 8192, name="Llama-3-70B")
    >>> validate(s, tp_degree=24, batch_size=4, max_model_len=4096,
    ...          instance="inf2.48xlarge").tp_degree
    24
    >>> validate(s, tp_degree=8, batch_size=1, max_model_len=4096, instance="inf2.48xlarge")
    Traceback (most recent call last):
    ...
    runtime.neuron_plan.NeuronConfigError: Llama-3-70B bfloat16 needs ~18.2 GiB per \
NeuronCore at --tensor-parallel-size 8 on inf2.48xlarge (weights 16.4 GiB, KV cache 0.2 GiB \
for 1 x 4096 tokens, reserve 1.6 GiB), more than its 16.0 GiB of HBM: Llama-3-70B bfloat16 \
needs >= 24 NeuronCores: use inf2.48xlarge with --tensor-parallel-size 24 (or trn1.32xlarge \
with --tensor-parallel-size 16)
    """
    inst = get_instance(instance) if instance is not None else None
    supported = inst.tp_degrees if inst else ALL_TP
    if tp_degree not in supported:
        if inst and tp_degree > inst.neuron_cores:
            bigger = sorted((i for i in INSTANCES.values() if tp_degree in i.tp_degrees),
                            key=lambda i: i.neuron_cores)
            fix = f"use {bigger[0].name}" if bigger else "use a supported degree"
            raise NeuronConfigError(
                f"--tensor-parallel-size {tp_degree} exceeds the {inst.neuron_cores} "
                f"NeuronCores of {inst.name}: {fix}, or one of "
                f"{', '.join(map(str, supported))}")
        where = f" on {inst.name}" if inst else ""
        raise NeuronConfigError(
            f"--tensor-parallel-size {tp_degree} is not supported by the Neuron runtime{where}: "
            f"use one of {', '.join(map(str, supported))}")
    if not heads_ok(shape, tp_degree):
        valid = _tp_choices(shape, inst)
        raise NeuronConfigError(
            f"num_attention_heads {shape.num_attention_heads} (num_key_value_heads "
            f"{shape.num_key_value_heads}) of {shape.name} is not divisible by "
            f"--tensor-parallel-size {tp_degree}: use one of {', '.join(map(str, valid))}")
    if max_model_len > shape.max_position_embeddings:
        raise NeuronConfigError(
            f"--max-model-len {max_model_len} exceeds max_position_embeddings "
            f"{shape.max_position_embeddings} of {shape.name}: use "
            f"--max-model-len {shape.max_position_embeddings} or less")
    for flag, buckets in ((CONTEXT_ENCODING_FLAG, context_encoding_buckets),
                          (TOKEN_GENERATION_FLAG, token_generation_buckets)):
        if buckets and max(buckets) > max_model_len:
            raise NeuronConfigError(
                f"{flag}: the largest bucket {max(buckets)} exceeds --max-model-len "
                f"{max_model_len}: drop it or raise --max-model-len to {max(buckets)}")
    hbm = inst.hbm_per_core if inst else 16 * GiB
    est = estimate(shape, tp_degree=tp_degree, batch_size=batch_size,
                   max_model_len=max_model_len, dtype=dtype, hbm_per_core=hbm)
    if not est.fits:
        raise _too_big(shape, est, inst)
    return est


@dataclass(frozen=True)
class Plan:
    """A configuration that fits: what ``ragserve neuron plan`` prints."""

    model: str
    instance: str
    dtype: str
    tp_degree: int
    batch_size: int
    max_model_len: int
    context_encoding_buckets: tuple[int, ...]
    token_generation_buckets: tuple[int, ...]
    estimate: MemoryEstimate
    num_parameters: int
    neuron_cores: int
    notes: tuple[str, ...] = field(default=())

    def serve_args(self) -> list[str]:
        return ["--device", "neuron", "--dtype", self.dtype,
                "--tensor-parallel-size", str(self.tp_degree),
                "--max-num-seqs", str(self.batch_size),
                "--max-model-len", str(self.max_model_len),
                CONTEXT_ENCODING_FLAG, ",".join(map(str, self.context_encoding_buckets)),
                TOKEN_GENERATION_FLAG, ",".join(map(str, self.token_generation_buckets))]

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        est = self.estimate
        out["estimate"] = {**asdict(est), "total": est.total, "free": est.free}
        out["serve_args"] = self.serve_args()
        return out


def recommend(shape: ModelShape, instance: str, *, dtype: str = "bfloat16",
              max_model_len: int | None = None, batch_size: int | None = None) -> Plan:
    """The fewest NeuronCores that hold the model, the largest power-of-two batch (<= 64, or
    ``batch_size`` exactly) at ``max_model_len``, and power-of-two buckets from 128.

    >>> p = recommend(ModelShape(4096, 32, 8, 32, 14336, 128256, 8192), "inf2.xlarge")
    >>> p.tp_degree, p.batch_size, p.max_model_len, p.context_encoding_buckets[:3]
    (2, 8, 8192, (128, 256, 512))
    """
    inst = get_instance(instance)
    notes = []
    if max_model_len is None:
        max_model_len = min(shape.max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP)
        if max_model_len < shape.max_position_embeddings:
            notes.append(f"--max-model-len not given: using {max_model_len} (the model allows "
                         f"{shape.max_position_embeddings})")
    dtype_bytes(dtype)
    choices = _tp_choices(shape, inst)
    for tp in choices:
        cap = batch_size if batch_size is not None else MAX_BATCH
        fits = _max_batch(shape, tp, max_model_len, dtype, cap)
        if fits == 0 or (batch_size is not None and fits < batch_size):
            continue
        batch = batch_size if batch_size is not None else 1 << (fits.bit_length() - 1)
        buckets = tuple(generate_buckets(MIN_BUCKET, max_model_len))
        est = validate(shape, tp_degree=tp, batch_size=batch, max_model_len=max_model_len,
                       context_encoding_buckets=buckets, token_generation_buckets=buckets,
                       dtype=dtype, instance=inst.name)
        if est.q_heads != shape.num_attention_heads:
            notes.append(f"transformers-neuronx pads the {shape.num_attention_heads} attention "
                         f"heads to {est.q_heads} for --tensor-parallel-size {tp}")
        if tp < inst.neuron_cores:
            notes.append(f"uses {tp} of the {inst.neuron_cores} NeuronCores of {inst.name}")
        checkpoint = shape.num_parameters * dtype_bytes(dtype)
        if 2 * checkpoint > inst.host_memory:
            notes.append(f"the {checkpoint / GiB:.0f} GiB checkpoint is loaded into host memory "
                         f"before sharding and {inst.name} has {inst.host_memory // GiB} GiB: "
                         "loading may run out of memory (inf2.8xlarge has 128 GiB)")
        return Plan(model=shape.name, instance=inst.name, dtype=dtype, tp_degree=tp,
                    batch_size=batch, max_model_len=max_model_len,
                    context_encoding_buckets=buckets, token_generation_buckets=buckets,
                    estimate=est, num_parameters=shape.num_parameters,
                    neuron_cores=inst.neuron_cores, notes=tuple(notes))
    # nothing fits on this instance: let validate() at its largest TP degree explain why
    tp = max(choices, default=1)
    validate(shape, tp_degree=tp, batch_size=batch_size or 1, max_model_len=max_model_len,
             dtype=dtype, instance=inst.name)
    raise NeuronConfigError(f"{shape.name} does not fit on {inst.name}")  # not reached


def format_plan(plan: Plan, model_path: str | None = None) -> str:
    """The memory budget per NeuronCore and the ``ragserve serve`` line, as text."""
    est = plan.estimate
    def g(n: int) -> str:
        return _gib(n, 6, 2)

    lines = [
        f"{plan.model}: {plan.num_parameters / 1e9:.2f}B parameters, {plan.dtype}, "
        f"on {plan.instance} ({plan.neuron_cores} NeuronCores, {est.hbm // GiB} GiB HBM each)",
        f"tensor parallel {plan.tp_degree}, batch {plan.batch_size}, "
        f"max length {plan.max_model_len}, {est.kv_heads_per_core} KV head(s) per core",
        "",
        "HBM per NeuronCore (estimate)",
        f"  weights    {g(est.weights)}",
        f"  KV cache   {g(est.kv_cache)}  ({plan.batch_size} x {plan.max_model_len} tokens)",
        f"  reserve    {g(est.overhead)}  (graphs, activations, runtime: "
        f"{OVERHEAD_FRACTION:.0%} of HBM)",
        f"  free       {g(est.free)}",
        f"  HBM        {g(est.hbm)}",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    model = ["--model", model_path] if model_path else []
    lines += ["", "ragserve serve " + " ".join(model + plan.serve_args())]
    return "\n".join(lines)
