"""ColBERT's late-interaction score, as pure functions on tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def maxsim(query: torch.Tensor, doc: torch.Tensor) -> float:
    """MaxSim of one query ``[q, dim]`` against one document ``[n, dim]``: for every query vector
    the best dot product with any document vector, summed over the query.

    >>> import torch
    >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> d = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    >>> maxsim(q, d)  # max(1, .6) + max(0, .8)
    1.8
    >>> maxsim(q, torch.zeros(0, 2))  # an empty document matches nothing
    0.0
    """
    if doc.shape[0] == 0:
        return 0.0
    return round(float((query @ doc.T).max(dim=1).values.sum()), 6)


def maxsim_packed(query: torch.Tensor, tokens: torch.Tensor, owner: torch.Tensor,
                  num_docs: int, *, block: int = 1 << 16) -> torch.Tensor:
    """MaxSim of one query against many documents packed into one token matrix.

    ``tokens: [N, dim]`` holds every document's vectors one after another, ``owner: [N]`` says
    which document (0..num_docs-1) each row belongs to. Returns ``[num_docs]`` scores; a document
    with no rows scores 0. Rows are scored ``block`` at a time, so memory stays bounded
    (``[block, q]`` fp32 scores: 8 MiB at the default and q=32).

    >>> import torch
    >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> tokens = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    >>> [round(s, 4) for s in maxsim_packed(q, tokens, torch.tensor([0, 0, 1]), 3).tolist()]
    [1.8, 1.0, 0.0]
    """
    import torch

    best = torch.full((num_docs, query.shape[0]), -torch.inf)
    for lo in range(0, tokens.shape[0], block):
        sims = (tokens[lo:lo + block] @ query.T).float()  # [block, q]
        rows = owner[lo:lo + block].long().unsqueeze(1).expand_as(sims)
        best.scatter_reduce_(0, rows, sims, reduce="amax")
    return best.nan_to_num(neginf=0.0).sum(dim=1)
