"""The contract every index backend implements, at the level of token embeddings.

A backend stores, per passage id (``pid``, a non-negative int assigned by ``PassageIndex``), the
L2-normalized token embeddings ``D: [n_tokens, dim]`` of that passage, and answers
``search(Q, k)`` for one query ``Q: [query_len, dim]`` with the ``k`` best ``(pid, score)`` pairs,
best first, where the score is ColBERT's MaxSim (``retrieval.maxsim``). Text, metadata, the
encoder and atomic writes live one level up, in ``retrieval.index.PassageIndex``.

``save(path)`` writes into an empty directory that the caller later makes current atomically;
``load(path)`` reads one back. A backend never writes outside the directory it is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class IndexBackend(Protocol):
    name: str  # "exact" | "plaid": recorded in the index manifest

    def __len__(self) -> int:
        """Number of passages currently searchable."""
        ...

    def add(self, pids: Sequence[int], docs: Sequence[torch.Tensor]) -> None:
        """Add passages; ``docs[i]`` is ``[n_tokens_i, dim]`` float, rows L2-normalized."""
        ...

    def remove(self, pids: Iterable[int]) -> None:
        """Remove passages; unknown ids raise ``KeyError``."""
        ...

    def search(self, query: torch.Tensor, k: int, *, effort_k: int | None = None
               ) -> list[tuple[int, float]]:
        """Top-k ``(pid, maxsim score)`` for ``query: [query_len, dim]``, best first.
        ``effort_k`` (default ``k``): an approximate backend searches as hard as for this many
        results; hybrid search asks for more candidates than the user's k at the user's
        effort."""
        ...

    def save(self, path: Path) -> None:
        """Write the backend's files into the existing empty directory ``path``."""
        ...


class BackendError(RuntimeError):
    """A backend cannot do what was asked (missing optional dependency, corrupt files...)."""
