"""The ``plaid`` backend (colbert-ai's PLAID index) against exact MaxSim, on synthetic embeddings.

The first run builds colbert-ai's C++ kernels into ``$RAGSERVE_CACHE_DIR/torch_extensions``
(about a minute); later runs reuse them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("colbert", reason="colbert-ai is not installed: pip install 'ragserve[plaid]'")
pytest.importorskip("faiss", reason="faiss is not installed: pip install 'ragserve[plaid]'")

import torch

from retrieval.backend import BackendError
from retrieval.maxsim import maxsim, maxsim_packed
from retrieval.plaid import PlaidBackend, _decompress_torch

ROOT = Path(__file__).resolve().parent.parent
DIM = 32


@pytest.fixture(scope="module", autouse=True)
def persistent_extensions():
    """Keep the compiled kernels in the project cache (as the Makefile does), not in a tmp dir."""
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("RAGSERVE_CACHE_DIR") and not os.environ.get("TORCH_EXTENSIONS_DIR"):
            mp.setenv("RAGSERVE_CACHE_DIR", str(ROOT / ".cache" / "ragserve"))
        yield


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def corpus(n: int, *, topics: int, per_passage: int, noise: float, seed: int,
           tokens: tuple[int, int] = (20, 40)) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Passages whose tokens come from a few topic directions plus noise. Returns the passages
    and, per passage, the topic centers it was drawn from."""
    g = torch.Generator().manual_seed(seed)
    centers = unit(torch.randn(topics, DIM, generator=g))
    docs, mixes = [], []
    for i in range(n):
        if topics == n and per_passage == 1:  # passage i is topic i
            mix = centers[i:i + 1]
        else:
            mix = centers[torch.randperm(topics, generator=g)[:per_passage]]
        length = int(torch.randint(tokens[0], tokens[1] + 1, (1,), generator=g))
        picks = mix[torch.randint(0, len(mix), (length,), generator=g)]
        docs.append(unit(picks + noise * torch.randn(length, DIM, generator=g)))
        mixes.append(mix)
    return docs, mixes


def queries(mixes: list[torch.Tensor], count: int, *, length: int, noise: float,
            seed: int) -> list[tuple[int, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        target = int(torch.randint(0, len(mixes), (1,), generator=g))
        mix = mixes[target]
        picks = mix[torch.randint(0, len(mix), (length,), generator=g)]
        out.append((target, unit(picks + noise * torch.randn(length, DIM, generator=g))))
    return out


def exact_top(docs: dict[int, torch.Tensor], q: torch.Tensor, k: int) -> list[int]:
    """Brute-force MaxSim top-k (``retrieval.maxsim``) over every passage."""
    pids = list(docs)
    lens = torch.tensor([len(docs[p]) for p in pids])
    owner = torch.repeat_interleave(torch.arange(len(pids)), lens)
    scores = maxsim_packed(q, torch.cat([docs[p] for p in pids]), owner, len(pids))
    return [pids[i] for i in scores.topk(min(k, len(pids))).indices.tolist()]


def build(docs: list[torch.Tensor], pids: list[int] | None = None, **kw: object) -> PlaidBackend:
    backend = PlaidBackend(DIM, **kw)  # type: ignore[arg-type]
    backend.add(pids if pids is not None else list(range(len(docs))), docs)
    return backend


@pytest.fixture(scope="module")
def separated() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return corpus(50, topics=50, per_passage=1, noise=0.15, seed=1)


@pytest.fixture(scope="module")
def mixed() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return corpus(200, topics=48, per_passage=3, noise=0.1, seed=2)


@pytest.fixture(scope="module")
def mixed_index(mixed) -> PlaidBackend:
    return build(mixed[0])


def test_top1_matches_exact_maxsim_on_separated_data(separated):
    docs, mixes = separated
    backend = build(docs)
    assert len(backend) == 50
    for target, q in queries(mixes, 20, length=8, noise=0.15, seed=3):
        hits = backend.search(q, 3)
        assert hits[0][0] == target == exact_top(dict(enumerate(docs)), q, 1)[0]
        assert hits[0][1] == pytest.approx(maxsim(q, docs[target]), abs=0.5)  # decompressed
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_recall_at_10_against_exact_maxsim(mixed, mixed_index):
    docs, mixes = mixed
    ix = mixed_index._ix
    decompressed = _decompress_torch(torch.arange(len(docs), dtype=torch.int32), ix)
    approx = dict(enumerate(decompressed.split(ix.doclens.tolist())))
    vs_exact, vs_decompressed = [], []
    for _, q in queries(mixes, 20, length=32, noise=0.1, seed=4):
        found = {p for p, _ in mixed_index.search(q, 10)}
        vs_exact.append(len(found & set(exact_top(dict(enumerate(docs)), q, 10))) / 10)
        vs_decompressed.append(len(found & set(exact_top(approx, q, 10))) / 10)
    assert sum(vs_exact) / len(vs_exact) >= 0.9
    # The centroid pruning loses (almost) nothing against brute force over the same vectors.
    assert sum(vs_decompressed) / len(vs_decompressed) >= 0.97


@pytest.mark.parametrize("kernels", ["colbert", "torch"])
def test_kernels_agree(mixed, mixed_index, kernels):
    """ragserve's kernels (the default here: the test machine has a C compiler), colbert-ai's
    C++ kernels and the pure-torch path rank and score alike."""
    _, mixes = mixed
    assert mixed_index._kernels.name == "native"
    other = PlaidBackend(DIM, kernels=kernels)
    other._ix = mixed_index._ix
    assert other._kernels.name == kernels
    for _, q in queries(mixes, 10, length=32, noise=0.1, seed=5):
        ours, theirs = mixed_index.search(q, 5), other.search(q, 5)
        assert [p for p, _ in ours] == [p for p, _ in theirs]
        assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], abs=1e-4)


def test_native_kernels_against_colbert_and_torch(mixed_index):
    """Each native kernel on its own: centroid interaction (with and without the keep mask, a
    passage's repeated codes counted once), decompression (normalized) and segment MaxSim (a
    passage with no rows scores 0)."""
    from retrieval import native
    from retrieval.plaid import _decompress_torch, _maxsim_torch, cache_dir

    k = native.load(cache_dir())
    ix = mixed_index._ix
    g = torch.Generator().manual_seed(9)
    cs = torch.randn(len(ix.codec.centroids), 7, generator=g)
    keep = torch.rand(len(cs), generator=g) > 0.5
    ids = torch.randperm(len(ix.pids), generator=g)[:40].int()
    for mask in (keep, None):
        got = k.centroid_interaction(ids, cs, ix.codes, ix.offsets, ix.doclens, mask)
        for i, score in zip(ids.tolist(), got.tolist()):
            codes = ix.codes[ix.offsets[i]:ix.offsets[i + 1]].long().unique()
            if mask is not None:
                codes = codes[mask[codes]]
            want = cs[codes].amax(0).sum() if len(codes) else torch.tensor(-9999.0 * 7)
            assert score == pytest.approx(float(want), abs=1e-3)
    D = k.decompress(ids, ix.offsets, ix.doclens, ix.residuals, ix.codes, ix.codec.centroids,
                     ix.table)
    assert torch.allclose(D, _decompress_torch(ids, ix), atol=1e-5)
    q = unit(torch.randn(5, DIM, generator=g))
    lens = torch.tensor([3, 0, 4, 1])
    rows = unit(torch.randn(8, DIM, generator=g))
    got = k.segment_maxsim(lens, (rows @ q.T).contiguous())
    assert torch.allclose(got, _maxsim_torch(q, rows, lens), atol=1e-5)
    assert got[1] == 0
    with pytest.raises(TypeError, match=r"contiguous CPU torch\.int32"):
        k.centroid_interaction(ids.long(), cs, ix.codes, ix.offsets, ix.doclens, None)


@pytest.mark.parametrize("nbits", [1, 4, 8])
def test_native_decompression_at_every_nbits(nbits):
    """The byte table holds 8 // nbits values per byte: the same vectors as colbert-ai's
    pure-torch decompression whatever the packing."""
    dim = 64  # 8-bit residuals need a multiple of 64
    g = torch.Generator().manual_seed(nbits)
    docs = [unit(torch.randn(int(torch.randint(5, 15, (1,), generator=g)), dim, generator=g))
            for _ in range(60)]
    backend = PlaidBackend(dim, nbits=nbits)
    backend.add(list(range(len(docs))), docs)
    assert backend._kernels.name == "native"
    ids = torch.arange(len(docs), dtype=torch.int32)
    got = backend._kernels.decompress(ids, backend._ix)
    assert torch.allclose(got, _decompress_torch(ids, backend._ix), atol=1e-5)


def test_without_a_compiler_colbert_kernels_take_over(monkeypatch, tmp_path, caplog):
    from retrieval import native
    from retrieval.plaid import load_kernels

    monkeypatch.setenv("RAGSERVE_CACHE_DIR", str(tmp_path))  # nothing built here yet
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    backend = PlaidBackend(DIM)
    assert backend._kernels.name == "colbert"
    assert "no C compiler" in caplog.text
    with pytest.raises(BackendError, match="no C compiler"):
        load_kernels(backend._colbert, "native")
    with pytest.raises(ValueError, match="kernels must be"):
        load_kernels(backend._colbert, "fast")


def test_native_build_is_cached_and_atomic(tmp_path):
    from retrieval import native

    path = native.build(tmp_path)
    assert path == native.library_path(tmp_path) and path.exists()
    mtime = path.stat().st_mtime_ns
    assert native.build(tmp_path) == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_prebuilt_library_is_used_before_the_cache(tmp_path, monkeypatch, capsys):
    """What an image without a compiler does: `python -m retrieval.native` at build time, then
    load() finds it and never compiles into the cache."""
    from retrieval import native

    monkeypatch.setattr(native, "PREBUILT", tmp_path / "prebuilt")
    assert native.main([]) == 0
    assert capsys.readouterr().out.strip() == str(native.library_path(tmp_path / "prebuilt"))
    monkeypatch.setattr(native.shutil, "which", lambda name: None)  # no compiler from now on
    kernels = native.load(tmp_path / "cache")
    assert kernels.path == native.library_path(tmp_path / "prebuilt")
    assert not (tmp_path / "cache").exists()
    assert native.main(["--into", str(tmp_path / "elsewhere")]) == 1
    assert "no C compiler" in capsys.readouterr().err


def test_add_after_build_uses_the_trained_codec(mixed):
    docs, mixes = mixed
    backend = build(docs[:150], pids=[1000 + i for i in range(150)])
    centroids = backend._ix.codec.centroids
    backend.add([1000 + i for i in range(150, 200)], docs[150:])
    assert len(backend) == 200
    assert backend._ix.codec.centroids is centroids
    found = 0
    for _, q in queries(mixes, 30, length=32, noise=0.1, seed=6):
        exact = exact_top(dict(enumerate(docs)), q, 1)[0]
        found += backend.search(q, 1)[0][0] == 1000 + exact
    assert found >= 27


def test_add_rejects_duplicates_and_bad_shapes(separated):
    docs, _ = separated
    backend = build(docs[:10])
    with pytest.raises(ValueError, match="already in the index"):
        backend.add([3], [docs[3]])
    with pytest.raises(ValueError, match="already in the index"):
        backend.add([20, 20], [docs[0], docs[1]])
    with pytest.raises(ValueError, match="expected"):
        backend.add([21], [torch.zeros(4, DIM + 1)])
    with pytest.raises(ValueError, match="pids for"):
        backend.add([22, 23], [docs[0]])
    assert len(backend) == 10


def test_remove_is_for_good(separated, tmp_path):
    docs, mixes = separated
    backend = build(docs)
    gone = {0, 7, 21, 49}
    backend.remove(gone)
    assert len(backend) == 46
    for target, q in queries(mixes, 40, length=8, noise=0.15, seed=7):
        hits = [p for p, _ in backend.search(q, 50)]
        assert len(hits) == 46 and not gone & set(hits)
        if target not in gone:
            assert hits[0] == target
    with pytest.raises(KeyError):
        backend.remove([7])
    with pytest.raises(KeyError):
        backend.remove([1, 999])
    assert len(backend) == 46  # a failed remove removes nothing
    backend.save(tmp_path)
    assert not gone & set(torch.load(tmp_path / "pids.pt").tolist())
    assert len(torch.load(tmp_path / "0.codes.pt")) == sum(
        len(d) for i, d in enumerate(docs) if i not in gone)
    assert len(PlaidBackend.load(tmp_path)) == 46


def test_save_load_round_trip_gives_identical_results(mixed, mixed_index, tmp_path):
    _, mixes = mixed
    mixed_index.save(tmp_path)
    for name in ("metadata.json", "centroids.pt", "buckets.pt", "avg_residual.pt", "0.codes.pt",
                 "0.residuals.pt", "doclens.0.json", "0.metadata.json", "ivf.pid.pt", "pids.pt"):
        assert (tmp_path / name).exists(), name
    loaded = PlaidBackend.load(tmp_path)
    assert len(loaded) == len(mixed_index)
    for _, q in queries(mixes, 10, length=32, noise=0.1, seed=8):
        assert loaded.search(q, 10) == mixed_index.search(q, 10)


def test_saved_files_are_colbert_ai_layout(mixed_index, tmp_path):
    from colbert.indexing.codecs.residual import ResidualCodec

    mixed_index.save(tmp_path)
    codec = ResidualCodec.load(str(tmp_path))  # colbert-ai's own reader
    assert torch.equal(codec.centroids, mixed_index._ix.codec.centroids)
    chunk = ResidualCodec.Embeddings.load(str(tmp_path), 0)
    assert torch.equal(chunk.codes, mixed_index._ix.codes)
    assert torch.equal(chunk.residuals, mixed_index._ix.residuals)


def test_save_refuses_a_non_empty_dir(mixed_index, tmp_path):
    (tmp_path / "other").write_text("x")
    with pytest.raises(BackendError, match="not empty"):
        mixed_index.save(tmp_path)


def test_empty_index(tmp_path):
    backend = PlaidBackend(DIM)
    assert len(backend) == 0
    assert backend.search(unit(torch.randn(4, DIM)), 5) == []
    backend.save(tmp_path)
    loaded = PlaidBackend.load(tmp_path)
    assert len(loaded) == 0 and loaded.search(unit(torch.randn(4, DIM)), 5) == []


def test_k_larger_than_len_returns_everything(separated):
    docs, mixes = separated
    backend = build(docs[:12])
    q = queries(mixes[:12], 1, length=8, noise=0.15, seed=9)[0][1]
    hits = backend.search(q, 100)
    assert sorted(p for p, _ in hits) == list(range(12))
    assert backend.search(q, 0) == []
    backend.add([12], [torch.zeros(0, DIM)])  # a passage without tokens matches nothing
    assert backend.search(q, 100)[-1] == (12, 0.0)


def test_removing_everything_then_adding_trains_again(separated):
    docs, mixes = separated
    backend = build(docs[:20])
    backend.remove(range(20))
    assert len(backend) == 0 and backend.search(docs[0], 3) == []
    backend.add(list(range(20, 50)), docs[20:])
    target, q = queries(mixes[20:], 1, length=8, noise=0.15, seed=10)[0]
    assert backend.search(q, 1)[0][0] == 20 + target


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 16"):
        PlaidBackend(24, nbits=2)
    with pytest.raises(ValueError, match="nbits"):
        PlaidBackend(32, nbits=3)
    backend = PlaidBackend(DIM)
    backend.add([0], [unit(torch.randn(5, DIM))])
    with pytest.raises(ValueError, match="expected"):
        backend.search(torch.randn(4, DIM + 1), 1)


def test_missing_colbert_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "colbert", None)  # `import colbert` now fails
    with pytest.raises(BackendError, match=r"pip install 'ragserve\[plaid\]'"):
        PlaidBackend(DIM)


def test_colbert_that_does_not_import_names_the_versions(monkeypatch):
    """What a transformers that colbert-ai's model code cannot import looks like: colbert-ai is
    installed, but importing from it fails. The error names the versions, not a reinstall."""
    import types

    monkeypatch.setitem(sys.modules, "colbert.search.index_storage",
                        types.ModuleType("colbert.search.index_storage"))  # no IndexScorer
    with pytest.raises(BackendError, match=r"colbert-ai 0\.2\.22, transformers \d") as err:
        PlaidBackend(DIM)
    assert "IndexScorer" in str(err.value) and "pip install" not in str(err.value)


def test_load_of_a_broken_dir_is_a_backend_error(tmp_path):
    with pytest.raises(BackendError):
        PlaidBackend.load(tmp_path)
