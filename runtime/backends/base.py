"""The backend contract, mirroring transformers-neuronx continuous batching.

``forward(input_ids, cache_ids, start_ids, last_token_id)`` with tensors already padded to one
bucket by the model runner:

- ``input_ids`` ``[B, T]``: token ids; ``T > 1`` is a context-encoding (prefill) call, ``T == 1``
  a token-generation (decode) call;
- ``cache_ids`` ``[B, T]``: the KV-cache position of each token;
- ``start_ids`` ``[B]``: the KV-cache slot of each row (transformers-neuronx's ``seq_ids``);
  for decode, row ``i`` is slot ``i``, as in transformers-neuronx's padded token generation;
- ``last_token_id`` ``[B]``: which position's logits to return for each row.

Returns float32 logits ``[B, vocab]``.

A backend with ``runs_mixed`` also runs ragged steps,
``forward_mixed(input_ids, cache_ids, start_ids, num_decode, prompt_lens, prompt_starts)``: flat
``[N]`` tensors holding one token for each of ``num_decode`` decode rows (row ``i`` is slot
``i``; ``cache_ids`` -1 marks a row with no request), then every token of each prompt (its
positions from ``prompt_starts[j]``, its slot on every token). It returns logits
``[num_decode + len(prompt_lens), vocab]``: each decode row's, then each prompt's last token's.
The scheduler then puts waiting prompts into the running requests' decode steps (vLLM's mixed
batches).

A backend with ``reuses_prefixes`` runs a prompt from a start above 0 (attending to the
keys its slot holds below the start) and copies held prefixes between slots (``copy_kv``), so
the scheduler may skip a prompt's shared prefix. Static graphs (Neuron) compile prompts from
position 0 only: there it stays off.

Everything above the backend (scheduler, runner, server)
is the same code for every backend.
"""

from __future__ import annotations

from typing import Protocol

import torch

from bucketing import BucketConfig


class Backend(Protocol):
    buckets: BucketConfig
    device: torch.device
    vocab_size: int
    scratch_slot: int  # where prefill batch-padding rows write their (discarded) KV
    # True: every call is padded to one of the buckets' static shapes (Neuron, torch.compile per
    # bucket); False: calls run at their exact shapes (eager PyTorch), so the runner leaves the
    # bucket padding out
    pads_to_buckets: bool
    runs_mixed: bool  # forward_mixed is available (only without static graphs)
    reuses_prefixes: bool  # forward_mixed takes prompt starts above 0, copy_kv works

    def forward(
        self,
        input_ids: torch.Tensor,
        cache_ids: torch.Tensor,
        start_ids: torch.Tensor,
        last_token_id: torch.Tensor,
    ) -> torch.Tensor: ...

    def forward_mixed(
        self,
        input_ids: torch.Tensor,
        cache_ids: torch.Tensor,
        start_ids: torch.Tensor,
        num_decode: int,
        prompt_lens: list[int],
        prompt_starts: list[int] | None = None,
    ) -> torch.Tensor: ...

    def copy_kv(self, copies: list[tuple[int, int, int]]) -> None:
        """For each ``(src, dst, n)``: positions ``0..n-1`` of slot ``src``'s KV into ``dst``."""
        ...

    def warmup(self) -> None:
        """Prepare (compile, load, run once) every bucket's graph."""
        ...

    def settle(self) -> None:
        """Build and time what may replace the warm path (a compiled decode step), before the
        engine reports ready (a no-op where nothing is left to build)."""
        ...

    def kernel_report(self) -> tuple[dict[str, str], bool] | None:
        """The implementation per shape class and whether one is still being built (None:
        this backend has no choice of kernels)."""
        ...
