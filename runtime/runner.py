"""ModelRunner: SchedulerOutput in, sampled tokens out; the only code that builds tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bucketing import Bucket
from runtime.backends import Backend
from runtime.sampler import RequestState, Sampler
from runtime.structured import GrammarCompiler, GrammarMatcher
from scheduler import ModelRunnerOutput, SamplingParams, SchedulerOutput


@dataclass(frozen=True)
class BucketedBatch:
    """A step's rows padded to its bucket; ``rows[i]`` is where scheduled row i sits."""

    bucket: Bucket
    input_ids: torch.Tensor  # [B, T]
    cache_ids: torch.Tensor  # [B, T]
    start_ids: torch.Tensor  # [B]
    last_token_id: torch.Tensor  # [B]
    rows: list[int]

    @property
    def num_computed_tokens(self) -> int:
        """Tokens the backend computes for this batch, padding included."""
        return self.input_ids.numel()

    @classmethod
    def pack(cls, out: SchedulerOutput, scratch_slot: int, exact: bool = False,
             pad_pos: int = 0) -> BucketedBatch:
        """Prefill: rows stacked, right-padded, padding rows in the scratch slot.
        Decode: row i is slot i (transformers-neuronx's layout); free slots are padding, at
        position ``pad_pos`` (-1: the backend's spare position, so a free slot's held prefix
        survives).

        ``exact``: for a backend without static graphs, the bucket's padding is left out: a
        prefill pads only to its longest prompt (at least 2 tokens, which marks a prefill) with
        no padding rows, and a decode has rows up to the highest running slot (the backend reads
        the cache only to the longest live sequence)."""
        b = out.bucket
        if exact:
            longest = max(len(r.token_ids) for r in out.rows) if out.is_prefill else 1
            rows = (len(out.rows) if out.is_prefill
                    else max(r.slot for r in out.rows) + 1)
            b = Bucket(b.phase, rows, max(2, longest) if out.is_prefill else b.seq_len)
        if out.is_prefill:
            ids = [list(r.token_ids) + [0] * (b.seq_len - len(r.token_ids)) for r in out.rows]
            ids += [[0] * b.seq_len] * (b.batch_size - len(out.rows))
            slots = [r.slot for r in out.rows] + [scratch_slot] * (b.batch_size - len(out.rows))
            last = [len(r.token_ids) - 1 for r in out.rows] + [0] * (b.batch_size - len(out.rows))
            return cls(
                bucket=b,
                input_ids=torch.tensor(ids),
                cache_ids=torch.arange(b.seq_len).expand(b.batch_size, -1),
                start_ids=torch.tensor(slots),
                last_token_id=torch.tensor(last),
                rows=list(range(len(out.rows))),
            )
        ids = [0] * b.batch_size
        pos = [pad_pos] * b.batch_size
        for r in out.rows:
            ids[r.slot] = r.token_ids[0]
            pos[r.slot] = r.start_pos
        return cls(
            bucket=b,
            input_ids=torch.tensor(ids).unsqueeze(1),
            cache_ids=torch.tensor(pos).unsqueeze(1),
            start_ids=torch.arange(b.batch_size),
            last_token_id=torch.zeros(b.batch_size, dtype=torch.long),
            rows=[r.slot for r in out.rows],
        )


@dataclass(frozen=True)
class RaggedBatch:
    """A step with prompts flattened for ``Backend.forward_mixed``: one token per decode row
    (row i is slot i, ``cache_ids`` -1 where no request holds the slot), then every prompt's
    tokens.
    ``rows[i]`` is where scheduled row i's logits are."""

    input_ids: torch.Tensor  # [N]
    cache_ids: torch.Tensor  # [N]
    start_ids: torch.Tensor  # [N]: each token's slot
    num_decode: int
    prompt_lens: list[int]
    prompt_starts: list[int]  # where each prompt's tokens start (above 0 after a held prefix)
    rows: list[int]

    @property
    def num_computed_tokens(self) -> int:
        return self.input_ids.numel()

    @classmethod
    def pack(cls, out: SchedulerOutput) -> RaggedBatch:
        dec, prompts = out.decode_rows, out.rows
        n_dec = max((r.slot for r in dec), default=-1) + 1
        ids, pos, slots = [0] * n_dec, [-1] * n_dec, list(range(n_dec))
        for r in dec:
            ids[r.slot], pos[r.slot] = r.token_ids[0], r.start_pos
        for r in prompts:
            ids += r.token_ids
            pos += range(r.start_pos, r.start_pos + len(r.token_ids))
            slots += [r.slot] * len(r.token_ids)
        return cls(
            input_ids=torch.tensor(ids),
            cache_ids=torch.tensor(pos),
            start_ids=torch.tensor(slots),
            num_decode=n_dec,
            prompt_lens=[len(r.token_ids) for r in prompts],
            prompt_starts=[r.start_pos for r in prompts],
            rows=[r.slot for r in dec] + [n_dec + j for j in range(len(prompts))],
        )


class ModelRunner:
    """Keeps per-request sampling state, packs each step into its bucket, runs the backend and
    samples. Plain lists leave; no tensor crosses into the scheduler."""

    def __init__(self, backend: Backend, sampler: Sampler | None = None,
                 grammars: GrammarCompiler | None = None) -> None:
        self.backend = backend
        self.sampler = sampler or Sampler()
        self.grammars = grammars
        self.states: dict[str, RequestState] = {}
        self._compiled: dict[str, object] = {}  # request id -> its grammar, until it runs

    def prepare(self, request_id: str, params: SamplingParams) -> None:
        """Check what only the runner can before a request is queued: its logit-bias ids fit
        the logits, its structured-output constraint compiles (cached per spec). Raises
        ValueError naming the problem; nothing is kept for a request that fails."""
        vocab = self.grammars.vocab_size if self.grammars else None
        if vocab is not None:
            bad = [t for t, _ in params.logit_bias if t >= vocab]
            if bad:
                raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary "
                                 f"(0..{vocab - 1})")
        if params.structured is not None:
            if self.grammars is None:
                raise ValueError("structured outputs need the model's tokenizer; this runner "
                                 "was built without one")
            self._compiled[request_id] = self.grammars.compile(params.structured)

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.finished_request_ids:
            self.states.pop(rid, None)
            self._compiled.pop(rid, None)  # aborted before it ran
        for new in out.new_requests:
            compiled = self._compiled.pop(new.request_id, None)
            self.states[new.request_id] = RequestState.create(
                new.sampling_params, new.prompt_token_ids, self.backend.device,
                GrammarMatcher(compiled) if compiled is not None else None)
        backend = self.backend
        batch: BucketedBatch | RaggedBatch
        if out.kv_copies:
            if not backend.reuses_prefixes:
                raise ValueError("prefix reuse was scheduled for a backend without it")
            backend.copy_kv([(c.src, c.dst, c.num_tokens) for c in out.kv_copies])
        if out.is_prefill and backend.runs_mixed:  # prompts, maybe with decode rows
            batch = RaggedBatch.pack(out)
            logits = backend.forward_mixed(batch.input_ids, batch.cache_ids, batch.start_ids,
                                           batch.num_decode, batch.prompt_lens,
                                           batch.prompt_starts)
        elif out.decode_rows:
            raise ValueError("a mixed step was scheduled for a backend that cannot run one")
        elif out.num_cached_tokens:
            raise ValueError("a prompt after a held prefix was scheduled for static graphs")
        else:
            batch = BucketedBatch.pack(out, backend.scratch_slot, not backend.pads_to_buckets,
                                       -1 if backend.reuses_prefixes else 0)
            logits = backend.forward(
                batch.input_ids, batch.cache_ids, batch.start_ids, batch.last_token_id
            )
        n = len(batch.rows)
        logits = logits[:n] if batch.rows == list(range(n)) else logits[batch.rows]
        rows = out.scheduled_rows
        states = [self.states[r.request_id] for r in rows]
        sampled = self.sampler(logits, states)
        for st, tok in zip(states, sampled.token_ids):
            st.output_token_ids.append(tok)
            if st.matcher is not None and not st.matcher.accept(tok):
                # the mask allowed only what the grammar accepts: a refusal here is a bug
                raise RuntimeError(f"the grammar refused token {tok} that its mask allowed")
        return ModelRunnerOutput(
            request_ids=[r.request_id for r in rows],
            sampled_token_ids=sampled.token_ids,
            logprobs=sampled.logprobs,
            num_computed_tokens=batch.num_computed_tokens,
        )
