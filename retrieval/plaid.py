"""``plaid`` backend: colbert-ai's PLAID index (ColBERTv2 residual compression, centroid pruning)
behind the ``IndexBackend`` contract. Our encoder makes the token embeddings; no colbert-ai
checkpoint, ``Indexer``, ``Searcher`` or child process is involved.

What comes from colbert-ai 0.2.22, driven in-process:
- build: faiss k-means with ``compute_faiss_kmeans``' settings, residual statistics as
  ``CollectionIndexer._compute_avg_residual``, ``ResidualCodec`` (nbits per dimension);
- IVF: centroid -> sorted unique passage ids, the ``ivf.pid.pt`` that ``optimize_ivf`` writes
  (built with one sort instead of its per-centroid loop);
- search, as ``IndexScorer.rank`` on CPU: centroid scores, ``ncells`` probed centroids per query
  token, ``filter_pids`` (centroid-interaction pruning with ``centroid_score_threshold``, then
  ``ndocs`` -> ``ndocs // 4`` passages) and ``decompress_residuals``, with
  ``ncells``/threshold/``ndocs`` chosen by ``k`` as ``Searcher.dense_search`` does. The final
  scores are exact MaxSim on the decompressed vectors (``retrieval.maxsim``).
- files: colbert-ai's index layout (one chunk) plus ``pids.pt``, our passage id per internal id.

``add`` after the first build keeps the centroids and codec (as ``IndexUpdater.add``): new
passages are compressed with them and the IVF is extended. An index emptied by ``remove`` forgets
its centroids; the next ``add`` trains new ones.

The search kernels (``Kernels``) are ragserve's own by default: ``plaid_kernels.c``, the same
computations as colbert-ai's ``filter_pids`` and ``decompress_residuals`` C++ kernels in about
half the time (no hash set per passage; decompression through one precombined byte table,
normalized as it writes), built by the system C compiler in under a second
(``retrieval/native.py``). Without a compiler, colbert-ai's kernels; if those cannot be built
either, a pure-torch path (slower, same results up to ties). Each fallback says so in the log.
``retrieval/PLAID_NOTES.md``: load times and where a search's time goes.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.backend import BackendError
from retrieval.maxsim import maxsim_packed

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT = "ragserve-plaid/1"
_PIDS = "pids.pt"
_KERNELS = ("filter_pids_cpp", "decompress_residuals_cpp")
_STALE_LOCK_S = 600  # a torch extension build lock older than this was left by a killed build
_KMEANS_SEED = 123  # compute_faiss_kmeans' seed
_INSTALL_HINT = "pip install 'ragserve[plaid]'"


def num_partitions(num_embeddings: int) -> int:
    """colbert-ai's number of centroids, ``2**floor(log2(16 * sqrt(n)))``, capped at about 16
    embeddings per centroid so that k-means has data for every centroid on a small corpus.

    >>> [num_partitions(n) for n in (1, 200, 2_000, 20_000, 1_000_000)]
    [1, 8, 64, 1024, 8192]
    """
    colbert = 2 ** math.floor(math.log2(16 * math.sqrt(max(1, num_embeddings))))
    cap = 2 ** math.floor(math.log2(max(1, num_embeddings // 16)))
    return max(1, min(colbert, cap))


@dataclass(frozen=True)
class SearchParams:
    ncells: int
    centroid_score_threshold: float
    ndocs: int


def search_params(k: int) -> SearchParams:
    """colbert-ai's ``Searcher.dense_search`` defaults for a given ``k``.

    >>> search_params(10), search_params(11).ndocs, search_params(1000).ndocs
    (SearchParams(ncells=1, centroid_score_threshold=0.5, ndocs=256), 1024, 4096)
    """
    if k <= 10:
        return SearchParams(1, 0.5, 256)
    if k <= 100:
        return SearchParams(2, 0.45, 1024)
    return SearchParams(4, 0.4, max(k * 4, 4096))


@dataclass(frozen=True)
class _Index:
    """Everything a search reads, replaced as a whole by ``add``/``remove`` (searches running
    in other threads keep the one they started with). Internal ids are 0..n-1."""

    codec: Any  # colbert ResidualCodec
    codes: torch.Tensor  # [N] int32: centroid id of every token embedding
    residuals: torch.Tensor  # [N, dim * nbits / 8] uint8
    doclens: torch.Tensor  # [n] int64
    offsets: torch.Tensor  # [n + 1] int64: first embedding of each passage
    ivf: torch.Tensor  # [M] int32: internal ids, grouped by centroid, sorted within a group
    ivf_lengths: torch.Tensor  # [C] int64
    ivf_offsets: torch.Tensor  # [C + 1] int64
    pids: torch.Tensor  # [n] int64: our pid of each internal id
    table: torch.Tensor  # [256, 8 // nbits] float32: the residual values a packed byte holds


class PlaidBackend:
    """colbert-ai PLAID index over caller-supplied token embeddings.

    ``ncells``, ``centroid_score_threshold`` and ``ndocs`` default (None) to colbert-ai's choice
    by ``k``. ``num_threads`` (default 1) is the torch/kernel thread count inside ``search``:
    on a small CPU one thread avoids OpenMP workers spinning against colbert-ai's pthreads.
    ``kernels``: ``auto`` (ragserve's own, else colbert-ai's, else pure torch), or one of
    ``native``, ``colbert``, ``torch`` (benchmarks compare them; not saved with the index).
    """

    name = "plaid"

    def __init__(self, dim: int, *, nbits: int = 2, ncells: int | None = None,
                 centroid_score_threshold: float | None = None, ndocs: int | None = None,
                 kmeans_niters: int = 4, num_threads: int | None = 1,
                 kernels: str = "auto") -> None:
        if nbits not in (1, 2, 4, 8):
            raise ValueError(f"nbits must be 1, 2, 4 or 8, got {nbits}")
        if dim <= 0 or dim % (8 * nbits):
            raise ValueError(f"colbert-ai's codec packs {nbits}-bit residuals per dimension: "
                             f"dim must be a positive multiple of {8 * nbits}, got {dim}")
        for label, value in (("ncells", ncells), ("ndocs", ndocs), ("num_threads", num_threads)):
            if value is not None and value < 1:
                raise ValueError(f"{label} must be >= 1, got {value}")
        self.dim, self.nbits, self.kmeans_niters = dim, nbits, kmeans_niters
        self.ncells, self.ndocs = ncells, ndocs
        self.centroid_score_threshold = centroid_score_threshold
        self.num_threads = num_threads
        self._colbert = _import_colbert()
        self._kernels = load_kernels(self._colbert, kernels)
        self._ix: _Index | None = None

    # -- IndexBackend ------------------------------------------------------------------------

    def __len__(self) -> int:
        return 0 if self._ix is None else len(self._ix.pids)

    def add(self, pids: Sequence[int], docs: Sequence[torch.Tensor]) -> None:
        import torch

        pids = [int(p) for p in pids]
        if len(pids) != len(docs):
            raise ValueError(f"{len(pids)} pids for {len(docs)} documents")
        known = set(self._ix.pids.tolist()) if self._ix is not None else set()
        for pid, d in zip(pids, docs):
            if pid in known:
                raise ValueError(f"passage id {pid} is already in the index")
            known.add(pid)
            if d.ndim != 2 or d.shape[1] != self.dim:
                raise ValueError(f"passage {pid}: embeddings {tuple(d.shape)}, "
                                 f"expected [n, {self.dim}]")
        if not pids:
            return
        with torch.no_grad():
            embs = torch.cat([d.detach().float().cpu() for d in docs])
            doclens = torch.tensor([len(d) for d in docs], dtype=torch.long)
            ix = self._ix
            if ix is None and len(embs) == 0:
                raise ValueError("cannot train a plaid index on passages without embeddings")
            codec = ix.codec if ix is not None else self._train(embs, doclens)
            t = time.perf_counter()
            new = codec.compress(embs) if len(embs) else codec.Embeddings(
                torch.zeros(0, dtype=torch.int32),
                torch.zeros(0, self.dim * self.nbits // 8, dtype=torch.uint8))
            log.info("plaid: compressed %d passages (%d embeddings) in %.1f s",
                     len(pids), len(embs), time.perf_counter() - t)
            parts = [ix] if ix is not None else []
            self._ix = _make_index(
                codec,
                torch.cat([p.codes for p in parts] + [new.codes]),
                torch.cat([p.residuals for p in parts] + [new.residuals]),
                torch.cat([p.doclens for p in parts] + [doclens]),
                torch.cat([p.pids for p in parts] + [torch.tensor(pids, dtype=torch.long)]))

    def remove(self, pids: Iterable[int]) -> None:
        import torch

        pids = {int(p) for p in pids}
        ix = self._ix
        present = set(ix.pids.tolist()) if ix is not None else set()
        unknown = sorted(pids - present)
        if unknown:
            raise KeyError(f"passage ids not in the index: {unknown[:5]}")
        if not pids or ix is None:
            return
        keep = ~torch.isin(ix.pids, torch.tensor(sorted(pids), dtype=torch.long))
        if not keep.any():
            self._ix = None  # empty: the next add trains new centroids
            return
        rows = torch.repeat_interleave(keep, ix.doclens)
        self._ix = _make_index(ix.codec, ix.codes[rows], ix.residuals[rows], ix.doclens[keep],
                               ix.pids[keep])

    def search(self, query: torch.Tensor, k: int, *, effort_k: int | None = None
               ) -> list[tuple[int, float]]:
        """colbert-ai's search with the parameters it picks for ``effort_k`` (default ``k``):
        its ``ndocs // 4`` exactly scored passages bound what comes back."""
        import torch

        ix = self._ix
        if ix is None or k <= 0:
            return []
        if query.ndim != 2 or query.shape[1] != self.dim:
            raise ValueError(f"query embeddings {tuple(query.shape)}, expected [q, {self.dim}]")
        with torch.inference_mode(), _threads(self.num_threads):
            Q = query.detach().float().cpu().contiguous()  # [q, dim]
            want = min(k, len(ix.pids))
            ids, scores = self._rank(ix, Q, self._params(effort_k or k), want)
            top = torch.topk(scores, min(want, len(ids)))
            found = ids[top.indices]
        return [(int(ix.pids[i]), float(s)) for i, s in zip(found.tolist(), top.values.tolist())]

    def save(self, path: Path) -> None:
        import torch

        path = Path(path)
        if not path.is_dir():
            raise BackendError(f"{path}: not a directory")
        if any(path.iterdir()):
            raise BackendError(f"{path}: not empty; the plaid backend saves into an empty dir")
        ix = self._ix
        n_emb = 0 if ix is None else len(ix.codes)
        meta = {
            "config": {"dim": self.dim, "nbits": self.nbits, "kmeans_niters": self.kmeans_niters},
            "num_chunks": 0 if ix is None else 1,
            "num_partitions": 0 if ix is None else len(ix.ivf_lengths),
            "num_embeddings": n_emb,
            "avg_doclen": n_emb / max(1, len(self)),
            "ragserve": {"format": FORMAT, "ncells": self.ncells, "ndocs": self.ndocs,
                         "centroid_score_threshold": self.centroid_score_threshold,
                         "num_threads": self.num_threads},
        }
        if ix is not None:
            ix.codec.save(index_path=str(path))  # centroids.pt, avg_residual.pt, buckets.pt
            torch.save(ix.codes, path / "0.codes.pt")
            torch.save(ix.residuals, path / "0.residuals.pt")
            (path / "doclens.0.json").write_text(json.dumps(ix.doclens.tolist()))
            (path / "0.metadata.json").write_text(json.dumps(
                {"passage_offset": 0, "num_passages": len(ix.pids), "num_embeddings": n_emb,
                 "embedding_offset": 0}))
            torch.save((ix.ivf, ix.ivf_lengths), path / "ivf.pid.pt")
            torch.save(ix.pids, path / _PIDS)
        (path / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> PlaidBackend:
        import torch

        path = Path(path)
        try:
            meta = json.loads((path / "metadata.json").read_text())
            ours = meta["ragserve"]
            if ours.get("format") != FORMAT:
                raise BackendError(f"{path}: format {ours.get('format')!r}, expected {FORMAT}")
            config = meta["config"]
            backend = cls(int(config["dim"]), nbits=int(config["nbits"]),
                          kmeans_niters=int(config.get("kmeans_niters", 4)),
                          ncells=ours.get("ncells"), ndocs=ours.get("ndocs"),
                          centroid_score_threshold=ours.get("centroid_score_threshold"),
                          num_threads=ours.get("num_threads", 1))
            if int(meta["num_chunks"]) == 0:
                return backend

            def read(name: str) -> Any:
                return torch.load(path / name, map_location="cpu", mmap=True, weights_only=True)

            cutoffs, weights = read("buckets.pt")
            avg_residual = read("avg_residual.pt")  # as ResidualCodec.load
            if avg_residual.dim() == 0:
                avg_residual = avg_residual.item()
            codec = backend._codec(read("centroids.pt").float(), avg_residual, cutoffs, weights)
            ivf, ivf_lengths = read("ivf.pid.pt")
            doclens = torch.tensor(json.loads((path / "doclens.0.json").read_text()),
                                   dtype=torch.long)
            backend._ix = _make_index(codec, read("0.codes.pt"), read("0.residuals.pt"),
                                      doclens, read(_PIDS), ivf=(ivf, ivf_lengths))
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            if isinstance(e, BackendError):
                raise
            raise BackendError(f"{path}: cannot load the plaid index ({e})") from e
        return backend

    # -- build -------------------------------------------------------------------------------

    def _codec(self, centroids: torch.Tensor, avg_residual: Any = None,
               bucket_cutoffs: torch.Tensor | None = None,
               bucket_weights: torch.Tensor | None = None) -> Any:
        config = self._colbert.ColBERTConfig(dim=self.dim, nbits=self.nbits)
        config.total_visible_gpus = 0  # this backend runs colbert-ai's CPU paths
        return self._colbert.ResidualCodec(config=config, centroids=centroids,
                                           avg_residual=avg_residual,
                                           bucket_cutoffs=bucket_cutoffs,
                                           bucket_weights=bucket_weights)

    def _train(self, embs: torch.Tensor, doclens: torch.Tensor) -> Any:
        """Centroids and residual buckets from the first batch, as CollectionIndexer.train."""
        import torch

        try:
            import faiss
        except ImportError as e:
            raise BackendError(f"building a plaid index needs faiss: {_INSTALL_HINT}") from e
        g = torch.Generator().manual_seed(_KMEANS_SEED)
        n = len(doclens)
        # CollectionIndexer._sample_pids: ~16 * sqrt(120 * n) passages, all their embeddings.
        sampled = torch.randperm(n, generator=g)[:min(1 + int(16 * math.sqrt(120 * n)), n)]
        rows = torch.repeat_interleave(torch.zeros(n, dtype=torch.bool).index_fill_(0, sampled,
                                                                                    True), doclens)
        sample = embs[rows].half().float()  # colbert-ai stores the sample in fp16
        sample = sample[torch.randperm(len(sample), generator=g)]
        held = int(min(0.05 * len(sample), 50_000))
        train, heldout = sample[:len(sample) - held], (sample[len(sample) - held:] if held
                                                      else sample)
        k = num_partitions(len(embs))
        t = time.perf_counter()
        kmeans = faiss.Kmeans(self.dim, k, niter=self.kmeans_niters, gpu=False, verbose=False,
                              seed=_KMEANS_SEED)
        kmeans.train(train.numpy())
        centroids = torch.nn.functional.normalize(torch.from_numpy(kmeans.centroids), dim=-1)
        centroids = centroids.half().float()  # as saved (centroids.pt is fp16): load == build
        log.info("plaid: trained %d centroids on %d embeddings in %.1f s", k, len(train),
                 time.perf_counter() - t)
        # CollectionIndexer._compute_avg_residual (torch.quantile takes at most 2**24 values).
        heldout = heldout[:max(1, (1 << 24) // self.dim)]
        plain = self._codec(centroids)
        residual = heldout - plain.lookup_centroids(
            plain.compress_into_codes(heldout, out_device="cpu"), out_device="cpu")
        options = 2 ** self.nbits
        quantiles = torch.arange(0, options) * (1 / options)
        cutoffs = residual.quantile(quantiles[1:])
        weights = residual.quantile(quantiles + 0.5 / options)
        return self._codec(centroids, residual.abs().mean(dim=0).mean(), cutoffs, weights)

    # -- search ------------------------------------------------------------------------------

    def _params(self, k: int) -> SearchParams:
        d = search_params(k)
        return SearchParams(
            self.ncells or d.ncells,
            (self.centroid_score_threshold if self.centroid_score_threshold is not None
             else d.centroid_score_threshold),
            max(self.ndocs or d.ndocs, 4 * k))  # filter_pids keeps ndocs // 4 >= k

    def _rank(self, ix: _Index, Q: torch.Tensor, p: SearchParams,
              want: int) -> tuple[torch.Tensor, torch.Tensor]:
        """IndexScorer.rank on CPU: candidates, centroid pruning, exact scores of the survivors.
        Returns (internal ids [m] int32, MaxSim on decompressed vectors [m])."""
        import torch

        centroid_scores = ix.codec.centroids @ Q.T  # [C, q]
        cells = centroid_scores.topk(min(p.ncells, len(centroid_scores)), dim=0).indices
        cells = cells.flatten().unique()
        cand = ix.ivf[_ranges(ix.ivf_offsets[cells], ix.ivf_lengths[cells])].unique()
        if len(cand) < want:  # the probed cells hold fewer passages than asked for
            cand = torch.arange(len(ix.pids), dtype=torch.int32)
        keep = centroid_scores.amax(-1) >= p.centroid_score_threshold
        kern = self._kernels
        ids = kern.filter_pids(cand.int(), centroid_scores, ix, keep, p.ndocs)
        D = kern.decompress(ids, ix)  # [tokens, dim], normalized
        return ids.long(), kern.maxsim(Q, D, ix.doclens[ids.long()])


def _make_index(codec: Any, codes: torch.Tensor, residuals: torch.Tensor, doclens: torch.Tensor,
                pids: torch.Tensor,
                ivf: tuple[torch.Tensor, torch.Tensor] | None = None) -> _Index:
    """Offsets and (unless given) the IVF: what CollectionIndexer._build_ivf + optimize_ivf
    compute, with one sort over (centroid, passage) keys instead of a loop per centroid."""
    import torch

    n, C = len(doclens), len(codec.centroids)
    if ivf is None:
        owner = torch.repeat_interleave(torch.arange(n), doclens)
        keys = (codes.long() * n + owner).unique()
        ivf = ((keys % n).int(), torch.bincount(keys // n, minlength=C))
    ivf_ids, ivf_lengths = ivf
    zero = torch.zeros(1, dtype=torch.long)
    # what decompress_residuals reads per packed byte: bucket weights in bit-reversed order
    table = codec.bucket_weights.float()[
        codec.decompression_lookup_table[codec.reversed_bit_map.long()].long()].contiguous()
    return _Index(codec=codec, codes=codes.int().contiguous(), residuals=residuals.contiguous(),
                  doclens=doclens.long(), offsets=torch.cat((zero, doclens.long().cumsum(0))),
                  ivf=ivf_ids.int(), ivf_lengths=ivf_lengths.long(),
                  ivf_offsets=torch.cat((zero, ivf_lengths.long().cumsum(0))), pids=pids.long(),
                  table=table)


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenated ``arange(s, s + l)`` for every (s, l): a packed lookup of segments.

    >>> import torch
    >>> _ranges(torch.tensor([5, 0, 9]), torch.tensor([2, 0, 3])).tolist()
    [5, 6, 9, 10, 11]
    """
    import torch

    lengths = lengths.long()
    total = int(lengths.sum())
    firsts = torch.repeat_interleave(starts.long() - (lengths.cumsum(0) - lengths), lengths,
                                     output_size=total)
    return firsts + torch.arange(total)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch threads (None: leave as is). colbert-ai's kernels start
    ``torch.get_num_threads()`` pthreads. torch keeps the count per thread once a thread has
    started, so this does not change other threads that are already running."""
    import torch

    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- colbert-ai ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Colbert:
    ColBERTConfig: Any
    ResidualCodec: Any
    ResidualEmbeddings: Any
    IndexScorer: Any


def _import_colbert() -> _Colbert:
    """The colbert-ai classes the backend uses. None of them needs transformers, but any
    ``colbert.*`` import runs colbert-ai's ``__init__``, which imports its model code
    (``HF_ColBERT``) from transformers: if that fails, the error names both versions."""
    _set_extensions_dir()
    try:
        import colbert  # noqa: F401  (fails first, and clearly, when colbert-ai is missing)
        from colbert.indexing.codecs.residual import ResidualCodec
        from colbert.indexing.codecs.residual_embeddings import ResidualEmbeddings
        from colbert.infra.config import ColBERTConfig
        from colbert.search.index_storage import IndexScorer
    except ModuleNotFoundError as e:
        raise BackendError(f"the plaid index backend needs colbert-ai and faiss: {_INSTALL_HINT} "
                           f"({e})") from e
    except Exception as e:  # installed, but it does not import in this environment
        raise BackendError(f"colbert-ai does not import with {_versions()} "
                           f"({type(e).__name__}: {e}); the exact backend does not need it") from e
    return _Colbert(ColBERTConfig, ResidualCodec, ResidualEmbeddings, IndexScorer)


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("colbert-ai", "transformers"):
        try:
            out.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist} not installed")
    return ", ".join(out)


def cache_dir() -> Path:
    """``$RAGSERVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/ragserve``, else ``~/.cache/ragserve``
    (the same rule as ``runtime.loader.default_cache_dir``)."""
    if os.environ.get("RAGSERVE_CACHE_DIR"):
        return Path(os.environ["RAGSERVE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ragserve"


def _set_extensions_dir() -> Path:
    """Where torch builds colbert-ai's C++ extensions: a caller's ``TORCH_EXTENSIONS_DIR``, else
    ``<cache>/torch_extensions``, so the minute-long builds happen once per machine."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache_dir() / "torch_extensions")
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


@dataclass(frozen=True)
class Kernels:
    """The three steps of a search after the centroid scores, one implementation each:
    ``filter_pids(cand, centroid_scores, ix, keep, ndocs)`` -> the ``ndocs // 4`` internal ids
    to score exactly; ``decompress(ids, ix)`` -> their normalized vectors, passage by passage;
    ``maxsim(Q, D, lens)`` -> their scores."""

    name: str  # native (retrieval/plaid_kernels.c), colbert (colbert-ai's C++), torch
    filter_pids: Callable[..., torch.Tensor]
    decompress: Callable[[torch.Tensor, _Index], torch.Tensor]
    maxsim: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def load_kernels(cb: _Colbert, which: str = "auto") -> Kernels:
    """``auto``: ragserve's own kernels (``retrieval/native.py``: a C file, built in under a
    second where a C compiler exists), else colbert-ai's C++ kernels (built once into the
    extensions dir), else pure torch; each fallback says why in the log. Naming one
    (``native``, ``colbert``, ``torch``) takes that one or raises."""
    from retrieval.native import NativeError

    if which not in ("auto", "native", "colbert", "torch"):
        raise ValueError(f"kernels must be auto, native, colbert or torch, got {which!r}")
    if which in ("auto", "native"):
        try:
            return _native_kernels()
        except NativeError as e:
            if which == "native":
                raise BackendError(f"ragserve's PLAID kernels are unavailable: {e}") from e
            log.warning("plaid: %s; using colbert-ai's kernels", e)
    if which in ("auto", "colbert"):
        try:
            return _colbert_kernels(cb)
        except Exception as e:  # no compiler, failed build: fall back, loudly
            if which == "colbert":
                raise BackendError(f"colbert-ai's C++ kernels are unavailable ({e})") from e
            log.warning("plaid: colbert-ai's C++ kernels are unavailable (%s: %s); searching "
                        "with the pure-torch path, several times slower", type(e).__name__, e)
    return TORCH_KERNELS


def _native_kernels() -> Kernels:
    from retrieval import native

    k = native.load(cache_dir())

    def filter_pids(cand: torch.Tensor, cs: torch.Tensor, ix: _Index, keep: torch.Tensor,
                    ndocs: int) -> torch.Tensor:
        def approx(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            return k.centroid_interaction(ids, cs, ix.codes, ix.offsets, ix.doclens, mask)

        return _two_stage(cand, approx, keep, ndocs)

    def decompress(ids: torch.Tensor, ix: _Index) -> torch.Tensor:
        return k.decompress(ids.int().contiguous(), ix.offsets, ix.doclens, ix.residuals,
                            ix.codes, ix.codec.centroids, ix.table)

    def maxsim(Q: torch.Tensor, D: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        return k.segment_maxsim(lens.long().contiguous(), (D @ Q.T).contiguous())

    return Kernels("native", filter_pids, decompress, maxsim)


def _colbert_kernels(cb: _Colbert) -> Kernels:
    """colbert-ai's ``filter_pids`` and ``decompress_residuals`` C++ kernels, built on first use
    (both at once); raises when they cannot be built."""
    import torch

    scorer = cb.IndexScorer
    if not hasattr(scorer, "loaded_extensions"):
        root = _set_extensions_dir()
        _remove_stale_locks(root)
        built = all((root / n / f"{n}.so").exists() for n in _KERNELS)
        if not built:
            log.info("plaid: compiling colbert-ai's C++ search kernels into %s "
                     "(once per machine, about a minute)", root)
        t = time.perf_counter()
        if not built:
            _build_in_parallel(scorer)
        with contextlib.redirect_stdout(io.StringIO()):  # colbert-ai prints progress lines
            scorer.try_load_torch_extensions(use_gpu=False)
        if not built:
            log.info("plaid: kernels built in %.0f s", time.perf_counter() - t)

    def filter_pids(cand: torch.Tensor, cs: torch.Tensor, ix: _Index, keep: torch.Tensor,
                    ndocs: int) -> torch.Tensor:
        return scorer.filter_pids(cand, cs, ix.codes, ix.doclens, ix.offsets, keep, ndocs)

    def decompress(ids: torch.Tensor, ix: _Index) -> torch.Tensor:
        c = ix.codec
        D = scorer.decompress_residuals(ids, ix.doclens, ix.offsets, c.bucket_weights,
                                        c.reversed_bit_map, c.decompression_lookup_table,
                                        ix.residuals, ix.codes, c.centroids, c.dim, c.nbits)
        return torch.nn.functional.normalize(D, p=2, dim=-1)

    return Kernels("colbert", filter_pids, decompress, _maxsim_torch)


def _build_in_parallel(scorer: Any) -> None:
    """Compile both kernels at once (one compiler process each, ~35 s apiece on a small CPU),
    with exactly the arguments ``IndexScorer.try_load_torch_extensions`` passes, so its own
    load afterwards finds them built."""
    from concurrent.futures import ThreadPoolExecutor

    from torch.utils.cpp_extension import load

    src = Path(inspect.getfile(scorer)).parent.resolve()

    def build(name: str) -> None:
        load(name=name, sources=[os.path.join(src, name.removesuffix("_cpp") + ".cpp")],
             extra_cflags=["-O3"], verbose=False)

    with ThreadPoolExecutor(len(_KERNELS)) as pool:
        list(pool.map(build, _KERNELS))


def _remove_stale_locks(root: Path) -> None:
    """torch waits forever on a build dir's ``lock`` file; a build killed mid-way leaves one."""
    for lock in root.glob("*/lock"):
        with contextlib.suppress(OSError):
            if time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
                log.warning("plaid: removing %s, left by an interrupted extension build", lock)
                lock.unlink()


def _two_stage(cand: torch.Tensor, approx: Callable[..., torch.Tensor], keep: torch.Tensor,
               ndocs: int) -> torch.Tensor:
    """filter_pids.cpp's two passes: the top ``ndocs`` by centroid interaction over the
    centroids in ``keep``, then the top ``ndocs // 4`` of those over all centroids."""
    first = cand[approx(cand, keep).topk(min(ndocs, len(cand))).indices]
    return first[approx(first, None).topk(min(ndocs // 4, len(first))).indices].int()


def _filter_pids_torch(cand: torch.Tensor, cs: torch.Tensor, ix: _Index, keep: torch.Tensor,
                       ndocs: int) -> torch.Tensor:
    """filter_pids.cpp in torch."""
    import torch

    def approx(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        lens = ix.doclens[ids.long()]
        c = ix.codes[_ranges(ix.offsets[ids.long()], lens)].long()
        s = cs[c]  # [tokens, q]
        if mask is not None:
            s = s.masked_fill(~mask[c].unsqueeze(1), -9999.0)
        best = torch.full((len(ids), s.shape[1]), -9999.0)
        owner = torch.repeat_interleave(torch.arange(len(ids)), lens).unsqueeze(1)
        return best.scatter_reduce_(0, owner.expand_as(s), s, reduce="amax").sum(1)

    return _two_stage(cand, approx, keep, ndocs)


def _decompress_torch(ids: torch.Tensor, ix: _Index) -> torch.Tensor:
    """colbert-ai's pure-torch ``ResidualCodec.decompress`` (normalized) over the given ids."""
    rows = _ranges(ix.offsets[ids.long()], ix.doclens[ids.long()])
    packed = type(ix.codec).Embeddings(ix.codes[rows], ix.residuals[rows])
    return ix.codec.decompress(packed)


def _maxsim_torch(Q: torch.Tensor, D: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    import torch

    owner = torch.repeat_interleave(torch.arange(len(lens)), lens)
    return maxsim_packed(Q, D, owner, len(lens))


TORCH_KERNELS = Kernels("torch", _filter_pids_torch, _decompress_torch, _maxsim_torch)
