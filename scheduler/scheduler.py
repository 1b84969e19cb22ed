"""Token-level continuous batching over a fixed pool of KV-cache slots.

Every step is either a prefill (waiting requests enter free slots, their prompts run through one
context-encoding graph) or a decode (every running request advances one token). A finished
request frees its slot at once, so the next step can admit a waiting request into it: requests
join and leave the running batch at every step.

Policy: prefill whenever a request waits and a slot is free, but never more than
``max_prefill_streak`` prefill steps in a row while requests are decoding, so a stream of
arrivals cannot starve decode.

With ``mixed`` (a backend without static graphs, ``Backend.runs_mixed``) there are no separate
prefill steps while requests run: each step advances every running request by one token and
admits waiting prompts into the same step, first come first served, while slots are free and
the step stays within ``max_num_batched_tokens`` (vLLM's policy and flag; the queue's head is
always admitted when a slot is free, so a long prompt never waits for the budget). Decode never
stalls for a prefill, and the matmuls read their weights once for both. Given ``step_costs``
measured on the machine (scheduler/step_costs.py), a step whose prompts would cost the running
requests more inside their decode step than in a step apart runs them apart instead, under
the separate policy above.

With ``prefix_caching`` (a backend that runs prompts at exact shapes, ``Backend.
reuses_prefixes``), a slot keeps the tokens whose KV it holds after its request finishes, until
the slot is allocated again. A new prompt starts after the longest prefix it shares with any
slot, free or running (the instructions every RAG request starts with, a conversation's earlier
turns re-sent on every agent step): its row's ``start_pos`` is the shared length, and when the
prefix is in another slot than the one the request gets (always the lowest free one, which keeps
decode steps compact) the step first copies it there (``SchedulerOutput.kv_copies``). SGLang
keeps a radix tree for this and vLLM hashes blocks; with one slot per sequence a linear scan of
the slots is the whole index.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Iterable

from bucketing import PREFILL, Bucket, BucketConfig, select
from scheduler.outputs import (
    KVCopy,
    ModelRunnerOutput,
    NewRequestData,
    ScheduledRow,
    SchedulerOutput,
    StepOutput,
)
from scheduler.request import FinishReason, GenerationRequest, Request, RequestStatus
from scheduler.slots import SlotPool
from scheduler.stats import IterationStats, SchedulerStats
from scheduler.step_costs import StepCosts


class RequestTooLongError(ValueError):
    """A request that cannot fit the model or the compiled graphs; the message names the limit."""

    def __init__(self, message: str, *, prompt_len: int, max_model_len: int, max_prompt_len: int):
        super().__init__(message)
        self.prompt_len = prompt_len
        self.max_model_len = max_model_len
        self.max_prompt_len = max_prompt_len


def check_fits(prompt_len: int, max_tokens: int | None, *, max_model_len: int,
               max_prompt_len: int, bucketed: bool) -> int:
    """A request's effective ``max_tokens`` (``None``: up to ``max_model_len``), or
    :class:`RequestTooLongError` naming the limit. ``max_prompt_len`` is the largest prefill
    bucket where prompts run in ``bucketed`` graphs (else it equals ``max_model_len``).

    >>> check_fits(10, None, max_model_len=64, max_prompt_len=32, bucketed=True)
    54
    >>> check_fits(40, 4, max_model_len=64, max_prompt_len=32, bucketed=True)
    Traceback (most recent call last):
    ...
    scheduler.scheduler.RequestTooLongError: prompt has 40 tokens; the largest prefill bucket is \
32 tokens and max_model_len is 64 (the prompt must leave room for one new token)
    """
    limit, largest = max_model_len, max_prompt_len
    limits = dict(prompt_len=prompt_len, max_model_len=limit, max_prompt_len=largest)
    if prompt_len > largest or prompt_len >= limit:
        where = (f"the largest prefill bucket is {largest} tokens and " if bucketed else "")
        raise RequestTooLongError(
            f"prompt has {prompt_len} tokens; {where}max_model_len is {limit} (the prompt must "
            "leave room for one new token)",
            **limits,
        )
    if max_tokens is None:
        return limit - prompt_len
    if prompt_len + max_tokens > limit:
        raise RequestTooLongError(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
            f"{prompt_len + max_tokens} exceeds max_model_len ({limit})",
            **limits,
        )
    return max_tokens


#: vLLM's default for its OpenAI server on CPU (``--max-num-batched-tokens``)
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


def common_prefix(a: tuple[int, ...], b: tuple[int, ...], limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit`` (slices compare in C).

    >>> common_prefix((1, 2, 3, 4), (1, 2, 5), 10)
    2
    >>> common_prefix((1, 2, 3), (1, 2, 3), 2)
    2
    """
    hi = min(len(a), len(b), limit)
    if hi <= 0 or a[0] != b[0]:
        return 0
    if a[:hi] == b[:hi]:
        return hi
    lo = 1  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Scheduler:
    """Decides, each step, which requests run and in which bucket; owns slot ids."""

    # How far down the waiting queue a prefill looks for prompts that share the head's bucket.
    PREFILL_LOOKAHEAD = 64

    def __init__(
        self,
        buckets: BucketConfig,
        eos_token_ids: Iterable[int] = (),
        max_prefill_streak: int = 1,
        *,
        mixed: bool = False,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        prefix_caching: bool = False,
        step_costs: StepCosts | None = None,
    ) -> None:
        if max_prefill_streak < 1:
            raise ValueError(f"max_prefill_streak must be >= 1, got {max_prefill_streak}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.buckets = buckets
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_prefill_streak = max_prefill_streak
        self.mixed = mixed
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefix_caching = prefix_caching
        self.step_costs = step_costs
        self.slots = SlotPool(buckets.max_num_seqs)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.last_iteration: IterationStats | None = None
        self._finished_ids: set[str] = set()
        self._prefill_streak = 0
        self.prefix_queries = 0  # prompt tokens looked up in the held prefixes (vLLM's count)
        self.prefix_hits = 0  # of which found: not computed

    # -- requests in and out -------------------------------------------------------------

    def check_fits(self, prompt_len: int, max_tokens: int | None) -> int:
        """The request's effective ``max_tokens``, or :class:`RequestTooLongError`."""
        return check_fits(prompt_len, max_tokens, max_model_len=self.buckets.max_model_len,
                          max_prompt_len=self.buckets.max_prompt_len, bucketed=True)

    def add_request(self, request: GenerationRequest) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        params = request.sampling_params
        max_tokens = self.check_fits(len(request.prompt_token_ids), params.max_tokens)
        req = Request(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling_params=params,
            max_tokens=max_tokens,
            eos_token_ids=self.eos_token_ids,
            arrival_time=request.arrival_time,
        )
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish_requests(self, request_ids: Iterable[str], reason: FinishReason) -> None:
        """Finish requests from outside a step (abort, stop string); unknown ids are ignored."""
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None:
                self._finish(req, reason)

    def abort_request(self, request_id: str) -> None:
        self.finish_requests([request_id], FinishReason.ABORT)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """The next step's batch. Call only when :meth:`has_unfinished`."""
        if not self.has_unfinished():
            raise RuntimeError("schedule() called with no unfinished requests")
        finished, self._finished_ids = frozenset(self._finished_ids), set()
        if self.mixed:
            return self._schedule_mixed(finished)
        if self.should_prefill():
            self._prefill_streak += 1
            return self._schedule_prefill(finished)
        self._prefill_streak = 0
        return self._schedule_decode(finished)

    def should_prefill(self) -> bool:
        """The policy hook: prefill now (True) or decode the running requests (False)."""
        if not self.waiting or not self.slots.can_allocate():
            return False
        return not self.running or self._prefill_streak < self.max_prefill_streak

    def _schedule_prefill(self, finished: frozenset[str],
                          chosen: list[Request] | None = None) -> SchedulerOutput:
        chosen = chosen or self._pick_prefill()
        new, rows, copies = [], [], []
        for req in chosen:
            self.waiting.remove(req)
            req.slot, reused, copy = self._place(req)
            req.num_cached_tokens = reused
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            params, prompt = req.sampling_params, req.prompt_token_ids
            new.append(NewRequestData(req.request_id, req.slot, prompt, params))
            rows.append(ScheduledRow(req.request_id, req.slot, prompt[reused:], reused))
            if copy is not None:
                copies.append(copy)
        longest = max(len(r.token_ids) for r in rows)
        if self.mixed:  # exact shapes: any number of prompts, no batch bucket
            bucket = Bucket(PREFILL, len(chosen),
                            select(self.buckets.context_encoding_buckets, longest, "prompt length"))
        else:
            bucket = self.buckets.prefill(longest, len(chosen))
        return SchedulerOutput(bucket, tuple(rows), tuple(new), finished,
                               kv_copies=tuple(copies))

    def _place(self, req: Request) -> tuple[int, int, KVCopy | None]:
        """``req``'s slot (the lowest free one), how many of its prompt tokens it skips, and
        the copy that brings them there. At most all but the last prompt token are reused: the
        last one runs, its logits give the first output token."""
        if not self.prefix_caching:
            return self.slots.allocate(), 0, None
        prompt = req.prompt_token_ids
        limit = len(prompt) - 1
        best, src = 0, -1
        for slot, held in self.slots.held().items():
            n = common_prefix(prompt, held, limit)
            if n > best or (n == best and n and slot == self.slots.lowest_free()):
                best, src = n, slot
        for other in self.running:
            if other.num_computed_tokens > best:
                n = common_prefix(prompt, _computed(other), limit)
                if n > best:
                    best, src = n, other.slot
        self.prefix_queries += len(prompt)
        self.prefix_hits += best
        slot = self.slots.allocate()
        if best == 0:
            return slot, 0, None
        return slot, best, None if src == slot else KVCopy(src, slot, best)
    def _pick_prefill(self) -> list[Request]:
        """The head of the queue plus later prompts in the same context bucket, within the
        free slots, the largest prefill batch bucket and ``max_prefill_tokens``."""
        b = self.buckets
        head = self.waiting[0]
        seq_len = select(b.context_encoding_buckets, head.num_prompt_tokens)
        room = min(self.slots.num_free, b.prefill_batch_buckets[-1])
        chosen = [head]
        for req in itertools.islice(self.waiting, 1, self.PREFILL_LOOKAHEAD):
            if len(chosen) == room:
                break
            if select(b.context_encoding_buckets, req.num_prompt_tokens) != seq_len:
                continue
            padded_rows = select(b.prefill_batch_buckets, len(chosen) + 1)
            if padded_rows * seq_len > b.max_prefill_tokens:
                break
            chosen.append(req)
        return chosen

    def _schedule_mixed(self, finished: frozenset[str]) -> SchedulerOutput:
        """Every running request's next token, plus the waiting prompts that fit (FIFO)."""
        budget = self.max_num_batched_tokens - len(self.running)
        chosen: list[Request] = []
        for req in self.waiting:
            if len(chosen) == self.slots.num_free:
                break
            if chosen and req.num_prompt_tokens > budget:
                break  # first come, first served: no prompt overtakes the one that waits
            chosen.append(req)
            budget -= req.num_prompt_tokens
        if not chosen:
            self._prefill_streak = 0
            return self._schedule_decode(finished)
        if self.running and self.step_costs is not None and not self.step_costs.joins(
                max(r.slot for r in self.running) + 1, sum(r.num_prompt_tokens for r in chosen)):
            # joining costs more here than a step apart: the separate policy, for this step
            if self._prefill_streak < self.max_prefill_streak:
                self._prefill_streak += 1
                return self._schedule_prefill(finished, chosen)
            self._prefill_streak = 0
            return self._schedule_decode(finished)
        self._prefill_streak = 0
        decode = self._decode_rows()  # before the new requests join the running ones
        return dataclasses.replace(self._schedule_prefill(finished, chosen), decode_rows=decode)

    def _decode_rows(self) -> tuple[ScheduledRow, ...]:
        return tuple(
            ScheduledRow(r.request_id, r.slot, (r.last_token_id,), r.num_computed_tokens)
            for r in sorted(self.running, key=lambda r: r.slot)
        )

    def _schedule_decode(self, finished: frozenset[str]) -> SchedulerOutput:
        """Every running request advances one token. Row i of a decode graph is slot i (the
        transformers-neuronx layout), so the batch bucket must reach the highest slot in use.
        Rows are listed in slot order, so with slots 0..n-1 in use the runner's logits are a
        plain slice of the graph's output."""
        rows = self._decode_rows()
        context_len = max(r.start_pos for r in rows) + 1
        bucket = self.buckets.decode(context_len, max(r.slot for r in rows) + 1)
        return SchedulerOutput(bucket, rows, (), finished)

    def update(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[StepOutput]:
        """Apply one step's sampled tokens; finish and free what is done."""
        rows = out.scheduled_rows
        if result.request_ids != [r.request_id for r in rows]:
            raise ValueError("runner output rows do not match the scheduled rows")
        logprobs = result.logprobs or [None] * len(rows)
        steps = []
        for row, token, lp in zip(rows, result.sampled_token_ids, logprobs):
            req = self.requests.get(row.request_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # finished while the step ran
            req.num_computed_tokens = row.start_pos + len(row.token_ids)
            req.output_token_ids.append(token)
            reason = req.check_stop(self.buckets.max_model_len)
            if reason is not None:
                self._finish(req, reason)
            steps.append(
                StepOutput(
                    request_id=req.request_id,
                    new_token_ids=(token,),
                    finish_reason=reason,
                    num_prompt_tokens=req.num_prompt_tokens,
                    num_output_tokens=len(req.output_token_ids),
                    logprobs=(lp,) if lp is not None else (),
                    num_cached_tokens=req.num_cached_tokens,
                )
            )
        self._record(out, generated=len(rows), computed=result.num_computed_tokens)
        return steps

    def fail_step(self, out: SchedulerOutput) -> list[StepOutput]:
        """The step raised: finish exactly its requests with ``error``; everything else goes on."""
        steps = []
        for row in out.scheduled_rows:
            req = self.requests.get(row.request_id)
            if req is None:
                continue
            self._finish(req, FinishReason.ERROR)
            steps.append(
                StepOutput(
                    request_id=req.request_id,
                    new_token_ids=(),
                    finish_reason=FinishReason.ERROR,
                    num_prompt_tokens=req.num_prompt_tokens,
                    num_output_tokens=len(req.output_token_ids),
                )
            )
        self._record(out, generated=0)
        return steps

    def fail_mixed_step(self, out: SchedulerOutput
                        ) -> tuple[list[StepOutput], SchedulerOutput | None]:
        """A mixed step raised: its prompts fail (the same decode rows ran fine a step ago, so
        a prompt is the likely cause), and the decode step returned, if any row is still
        running, lets the running requests retry alone. Rewriting their cache positions is
        harmless: the retry writes the same positions again."""
        steps = self.fail_step(dataclasses.replace(out, decode_rows=()))
        rows = tuple(r for r in out.decode_rows if r.request_id in self.requests)
        if not rows:
            return steps, None
        bucket = self.buckets.decode(max(r.start_pos for r in rows) + 1,
                                     max(r.slot for r in rows) + 1)
        return steps, SchedulerOutput(bucket, rows)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        elif req.status == RequestStatus.RUNNING:
            self.running.remove(req)
            # a failed step may have left its rows' KV half written: keep nothing from them
            keep = self.prefix_caching and reason != FinishReason.ERROR
            self.slots.free(req.slot, _computed(req) if keep else ())
            req.slot = None
            self._finished_ids.add(req.request_id)
        req.status = RequestStatus.for_reason(reason)
        del self.requests[req.request_id]

    # -- statistics ----------------------------------------------------------------------

    def _record(self, out: SchedulerOutput, generated: int, computed: int | None = None) -> None:
        """``computed``: the tokens the backend ran, padding included (None: the bucket's)."""
        self.last_iteration = IterationStats(
            phase=out.phase,
            bucket=str(out.bucket),
            batch_size=out.bucket.batch_size,
            num_rows=len(out.scheduled_rows),
            num_prompt_tokens=out.num_prompt_tokens,
            num_generation_tokens=generated,
            num_padding_tokens=(out.padding_tokens if computed is None
                                else computed - out.num_tokens),
            num_decode_rows=len(out.decode_rows) if out.is_prefill else len(out.rows),
            num_cached_tokens=out.num_cached_tokens,
            num_queried_tokens=(out.num_prompt_tokens + out.num_cached_tokens
                                if self.prefix_caching else 0),
        )

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_slots=self.slots.num_slots,
            num_free_slots=self.slots.num_free,
            kv_tokens_used=sum(r.num_computed_tokens for r in self.running),
            kv_tokens_capacity=self.slots.num_slots * self.buckets.max_model_len,
        )


def _computed(req: Request) -> tuple[int, ...]:
    """The tokens whose KV ``req``'s slot holds (from position 0)."""
    n = req.num_computed_tokens
    if n <= req.num_prompt_tokens:
        return req.prompt_token_ids[:n]
    return req.prompt_token_ids + tuple(req.output_token_ids[:n - req.num_prompt_tokens])
