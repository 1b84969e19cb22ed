"""The PyTorch backend (CPU, and CUDA when present): one prepared graph per bucket.

Eager by default; ``compile=True`` wraps each bucket's call in its own ``torch.compile`` with
static shapes, the CPU/CUDA analogue of one neuronx-cc graph per bucket.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from bucketing import DECODE, PREFILL, Bucket, BucketConfig, select
from runtime.model import Llama

log = logging.getLogger(__name__)


class TorchBackend:
    def __init__(self, model: Llama, buckets: BucketConfig, *, compile: bool = False,
                 kv_cache_dtype: torch.dtype | None = None) -> None:
        if buckets.context_encoding_buckets[0] < 2:
            raise ValueError("context_encoding_buckets must be >= 2 (a 1-token graph is decode)")
        self.model = model
        self.buckets = buckets
        self.compile = compile
        self.device = model.tok_embeddings.weight.device
        self.vocab_size = model.args.vocab_size
        self.scratch_slot = buckets.max_num_seqs  # one slot past the real ones
        if not compile:  # inductor packs weights itself (and cannot trace opaque ones)
            model.pack_weights()
        model.setup_caches(buckets.max_num_seqs + 1, buckets.max_model_len, kv_cache_dtype)
        self.graphs: dict[Bucket, Callable[..., torch.Tensor]] = {
            b: self._prepare(b) for b in buckets.all_buckets()
        }

    def _prepare(self, bucket: Bucket) -> Callable[..., torch.Tensor]:
        ctx_len = None if bucket.phase == PREFILL else bucket.seq_len
        fn = functools.partial(self.model, ctx_len=ctx_len)
        if self.compile:
            return torch.compile(fn, dynamic=False, fullgraph=True)
        return fn

    def bucket_for(self, input_ids: torch.Tensor, cache_ids: torch.Tensor) -> Bucket:
        """The graph these padded tensors run in (as transformers-neuronx picks it)."""
        batch, n_tokens = input_ids.shape
        if n_tokens > 1:
            return Bucket(PREFILL, batch, n_tokens)
        ctx = select(self.buckets.token_generation_buckets, int(cache_ids.max()) + 1,
                     "context length")
        return Bucket(DECODE, batch, ctx)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache_ids: torch.Tensor,
        start_ids: torch.Tensor,
        last_token_id: torch.Tensor,
    ) -> torch.Tensor:
        bucket = self.bucket_for(input_ids, cache_ids)
        graph = self.graphs.get(bucket)
        if graph is None:
            raise ValueError(f"no graph was prepared for bucket {bucket}")
        dev = self.device
        return graph(input_ids.to(dev), cache_ids.to(dev), start_ids.to(dev),
                     last_token_id.to(dev))

    def warmup(self) -> None:
        """Run every bucket once (compiling it when ``compile``); logs the time taken."""
        t0 = time.perf_counter()
        buckets = self.buckets.all_buckets()
        for b in tqdm(buckets, desc="warming up bucket graphs", unit="graph", leave=False):
            rows = torch.zeros(b.batch_size, dtype=torch.long)
            if b.phase == PREFILL:
                ids = torch.zeros(b.batch_size, b.seq_len, dtype=torch.long)
                pos = torch.arange(b.seq_len).expand(b.batch_size, -1)
                slots = rows + self.scratch_slot
            else:
                ids = torch.zeros(b.batch_size, 1, dtype=torch.long)
                pos = torch.zeros(b.batch_size, 1, dtype=torch.long)
                pos[0, 0] = b.seq_len - 1  # select this context bucket
                slots = torch.arange(b.batch_size)
            self.forward(ids, pos, slots, rows)
        log.info("warmed up %d bucket graphs in %.1fs%s", len(buckets),
                 time.perf_counter() - t0, " (torch.compile)" if self.compile else "")
