"""Load time and search latency of the ``plaid`` backend (colbert-ai PLAID) on synthetic embeddings.

Builds (once, cached under ``$RAGSERVE_CACHE_DIR/bench-plaid/``) a PLAID index of synthetic
clustered token embeddings (default 10,000 passages x 100 tokens x dim 128, nbits=2), then
measures in a fresh process, phase by phase: ``import torch``, transformers' BERT (the encoder
imports it in the server anyway), ``import colbert``, ``PlaidBackend.load`` (C++
kernels from the persistent extensions dir, codec, mmap'd codes/residuals, IVF), the first search
and the p50/p90 of the following ones (for 1 and 2 torch threads). With ``--colbert`` it also
times colbert-ai's own ``IndexScorer`` loading the same directory (our files are its layout).
Recall@10 against brute-force MaxSim over the raw embeddings is measured in the parent.

    python -m benchmarks.plaid_load [--quick] [--passages 10000] [--colbert]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import emit, median, percentile, round_floats


def corpus(n: int, tokens: int, dim: int, seed: int) -> tuple[Any, Any, Any]:
    """Token embeddings drawn around 4 of 2,048 topic directions per passage. Returns (packed
    tokens [N, dim], doclens [n], per-passage topic ids [n, 4])."""
    import torch

    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(2048, dim, generator=g), dim=-1)
    topics = torch.randint(0, 2048, (n, 4), generator=g)
    lens = torch.randint(tokens * 4 // 5, tokens * 6 // 5 + 1, (n,), generator=g)
    owner = torch.repeat_interleave(torch.arange(n), lens)
    pick = topics[owner, torch.randint(0, 4, (len(owner),), generator=g)]
    noise = torch.nn.functional.normalize(torch.randn(len(owner), dim, generator=g), dim=-1)
    return torch.nn.functional.normalize(centers[pick] + 0.6 * noise, dim=-1), lens, topics


def queries(topics: Any, dim: int, count: int, seed: int, query_seed: int) -> list[Any]:
    """32-token queries drawn around the topics of random passages."""
    import torch

    g = torch.Generator().manual_seed(query_seed)
    centers = torch.nn.functional.normalize(
        torch.randn(2048, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)
    out = []
    for _ in range(count):
        mix = topics[int(torch.randint(0, len(topics), (1,), generator=g))]
        pick = mix[torch.randint(0, len(mix), (32,), generator=g)]
        noise = torch.nn.functional.normalize(torch.randn(32, dim, generator=g), dim=-1)
        out.append(torch.nn.functional.normalize(centers[pick] + 0.6 * noise, dim=-1))
    return out


def build(args: argparse.Namespace, path: Path) -> float:
    from retrieval.plaid import PlaidBackend

    tokens, lens, _ = corpus(args.passages, args.tokens, args.dim, args.seed)
    t = time.perf_counter()
    backend = PlaidBackend(args.dim, nbits=args.nbits)
    backend.add(list(range(args.passages)), list(tokens.split(lens.tolist())))
    seconds = time.perf_counter() - t
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True)
    backend.save(tmp)
    tmp.rename(path)
    return seconds


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a fresh interpreter: every import and load is cold in this process."""
    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    from transformers import AutoTokenizer, BertModel  # noqa: F401  (what the encoder imports)

    t2 = time.perf_counter()
    import colbert  # noqa: F401

    t3 = time.perf_counter()
    from retrieval.plaid import PlaidBackend

    out: dict[str, Any] = {"import_torch_s": t1 - t0, "import_transformers_s": t2 - t1,
                           "import_colbert_s": t3 - t2}
    _, _, topics = corpus(args.passages, args.tokens, args.dim, args.seed)
    qs = queries(topics, args.dim, args.queries, args.seed, args.seed + 1)
    t = time.perf_counter()
    backend = PlaidBackend.load(Path(args.dir))
    out["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    backend.search(qs[0], 10)
    out["first_search_s"] = time.perf_counter() - t
    out["load_plus_first_search_s"] = out["load_s"] + out["first_search_s"]
    for threads in (1, 2):
        backend.num_threads = threads
        times = []
        for q in qs:
            t = time.perf_counter()
            backend.search(q, 10)
            times.append(time.perf_counter() - t)
        out[f"search_p50_ms_{threads}t"] = median(times) * 1e3
        out[f"search_p90_ms_{threads}t"] = percentile(times, 90) * 1e3
    if args.colbert:
        from colbert.infra import ColBERTConfig
        from colbert.modeling.colbert import ColBERT
        from colbert.search.index_storage import IndexScorer

        torch.set_num_threads(1)
        t = time.perf_counter()
        ColBERT.try_load_torch_extensions(use_gpu=False)  # Searcher gets it via its checkpoint
        scorer = IndexScorer(args.dir, use_gpu=False)
        out["colbert_indexscorer_load_s"] = time.perf_counter() - t
        config = ColBERTConfig(ncells=1, centroid_score_threshold=0.5, ndocs=256)
        times = []
        for q in qs:
            t = time.perf_counter()
            scorer.rank(config, q.unsqueeze(0))
            times.append(time.perf_counter() - t)
        out["colbert_rank_p50_ms_1t"] = median(times) * 1e3
    return out


def recall(args: argparse.Namespace) -> float:
    import torch

    from retrieval.maxsim import maxsim_packed
    from retrieval.plaid import PlaidBackend

    tokens, lens, topics = corpus(args.passages, args.tokens, args.dim, args.seed)
    owner = torch.repeat_interleave(torch.arange(args.passages), lens)
    backend = PlaidBackend.load(Path(args.dir))
    hits = []
    for q in queries(topics, args.dim, args.recall_queries, args.seed, args.seed + 2):
        exact = set(maxsim_packed(q, tokens, owner, args.passages).topk(10).indices.tolist())
        hits.append(len(exact & {p for p, _ in backend.search(q, 10)}) / 10)
    return sum(hits) / len(hits)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2,000 passages, fewer queries")
    p.add_argument("--passages", type=int, default=None)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--nbits", type=int, default=2)
    p.add_argument("--queries", type=int, default=None)
    p.add_argument("--recall-queries", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--colbert", action="store_true", help="also time colbert-ai's IndexScorer")
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.passages = args.passages or (2_000 if args.quick else 10_000)
    args.queries = args.queries or (50 if args.quick else 200)
    if args.child:
        print(json.dumps(child(args)))
        return

    from retrieval.plaid import cache_dir

    path = (cache_dir() / "bench-plaid" /
            f"p{args.passages}-t{args.tokens}-d{args.dim}-b{args.nbits}-s{args.seed}")
    result: dict[str, Any] = {"passages": args.passages, "tokens": args.tokens, "dim": args.dim,
                              "nbits": args.nbits, "index_dir": str(path)}
    if not (path / "metadata.json").exists():
        print(f"# building {path} (k-means and compression take minutes at 10k passages)",
              flush=True)
        result["build_s"] = build(args, path)
    args.dir = str(path)
    cmd = [sys.executable, "-m", "benchmarks.plaid_load", "--child", "--dir", str(path),
           "--passages", str(args.passages), "--tokens", str(args.tokens), "--dim", str(args.dim),
           "--queries", str(args.queries), "--seed", str(args.seed)]
    if args.colbert:
        cmd.append("--colbert")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if run.returncode:
        sys.exit(f"child failed ({run.returncode}):\n{run.stderr[-4000:]}")
    result.update(json.loads(run.stdout.strip().splitlines()[-1]))
    result["recall_at_10_vs_exact"] = recall(args)
    for key, value in round_floats(result, 3).items():
        print(f"{key:32s} {value}")
    emit("plaid_load", args, round_floats(result, 4))


if __name__ == "__main__":
    main()
