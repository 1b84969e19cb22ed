"""``exact`` backend: exact MaxSim over every token embedding, held in memory.

Right for small corpora and for tests; no centroid pruning, no compression: MaxSim over every
vector. All passages are packed into one ``[N, dim]`` matrix so a search is a few large matrix
products (blocked, so memory stays bounded) and one scatter-max
(``retrieval.maxsim.maxsim_packed``). On CPUs with native bf16 the matrix is held in bfloat16
(``dtype="auto"``): half the memory and 2.7x faster search than float32 at 10k passages
(BENCHMARKS.md), for scores that move by ~1e-2; ``dtype="float32"`` keeps full precision.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.maxsim import maxsim_packed

if TYPE_CHECKING:
    import torch

_FILE = "exact.safetensors"


class ExactBackend:
    name = "exact"

    def __init__(self, dim: int, *, dtype: str = "auto") -> None:
        import torch

        from runtime.loader import resolve_dtype

        self.dim = dim
        self.dtype = resolve_dtype(dtype, torch.device("cpu"))
        self._docs: dict[int, torch.Tensor] = {}
        self._packed: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None

    def __len__(self) -> int:
        return len(self._docs)

    def add(self, pids: Sequence[int], docs: Sequence[torch.Tensor]) -> None:
        if len(pids) != len(docs):
            raise ValueError(f"{len(pids)} pids for {len(docs)} documents")
        for pid, d in zip(pids, docs):
            if pid in self._docs:
                raise ValueError(f"passage id {pid} is already in the index")
            if d.ndim != 2 or d.shape[1] != self.dim:
                raise ValueError(f"passage {pid}: embeddings {tuple(d.shape)}, "
                                 f"expected [n, {self.dim}]")
        for pid, d in zip(pids, docs):
            self._docs[int(pid)] = d.to(self.dtype)
        self._packed = None

    def remove(self, pids: Iterable[int]) -> None:
        pids = list(pids)
        unknown = [p for p in pids if p not in self._docs]
        if unknown:
            raise KeyError(f"passage ids not in the index: {unknown[:5]}")
        for p in pids:
            del self._docs[p]
        self._packed = None

    def vectors(self, pid: int) -> int:
        """How many token vectors passage ``pid`` holds."""
        return len(self._docs[pid])

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        import torch

        if self._packed is None:
            pids = sorted(self._docs)
            docs = [self._docs[p] for p in pids]
            tokens = torch.cat(docs) if docs else torch.zeros(0, self.dim, dtype=self.dtype)
            lens = torch.tensor([len(d) for d in docs], dtype=torch.long)
            # the per-passage tensors become views of the packed matrix: one copy in memory
            self._docs = dict(zip(pids, tokens.split(lens.tolist())))
            owner = torch.repeat_interleave(torch.arange(len(docs)), lens)
            self._packed = (tokens, owner, pids)
        return self._packed

    def search(self, query: torch.Tensor, k: int, *, effort_k: int | None = None
               ) -> list[tuple[int, float]]:
        import torch

        tokens, owner, pids = self._pack()
        if not pids or k <= 0:
            return []
        with torch.inference_mode():
            scores = maxsim_packed(query.to(tokens.dtype), tokens, owner, len(pids))
            top = torch.topk(scores, min(k, len(pids)))
        return [(pids[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]

    #: ``PassageIndex`` may save this backend in segments: ``save(path, pids)`` writes a subset
    #: and ``merge`` joins loaded segments
    segmented = True

    def save(self, path: Path, pids: Sequence[int] | None = None) -> None:
        """Write every passage, or only ``pids`` (one segment of a segmented index)."""
        import torch
        from safetensors.torch import save_file

        tokens, _, pids_all = self._pack()
        if pids is None:
            pids = pids_all
        else:
            pids = sorted(pids)
            tokens = (torch.cat([self._docs[p] for p in pids]) if pids
                      else torch.zeros(0, self.dim, dtype=self.dtype))
        lens = torch.tensor([len(self._docs[p]) for p in pids], dtype=torch.long)
        save_file({"tokens": tokens.half(), "doclens": lens,
                   "pids": torch.tensor(pids, dtype=torch.long)}, str(Path(path) / _FILE),
                  metadata={"dim": str(self.dim)})

    @classmethod
    def load(cls, path: Path, *, dtype: str = "auto") -> ExactBackend:
        from safetensors import safe_open

        with safe_open(str(Path(path) / _FILE), framework="pt") as f:
            dim = int(f.metadata()["dim"])
            tokens = f.get_tensor("tokens")
            lens = f.get_tensor("doclens").tolist()
            pids = f.get_tensor("pids").tolist()
        backend = cls(dim, dtype=dtype)
        backend._docs = dict(zip(pids, tokens.to(backend.dtype).split(lens)))
        return backend

    def merge(self, other: ExactBackend, drop: Iterable[int] = ()) -> None:
        """Take ``other``'s passages (another segment of the same index), less ``drop``."""
        dropped = set(drop)
        clash = [p for p in other._docs if p in self._docs and p not in dropped]
        if clash:
            raise ValueError(f"passage ids in two segments: {clash[:5]}")
        self._docs.update((p, d) for p, d in other._docs.items() if p not in dropped)
        self._packed = None
