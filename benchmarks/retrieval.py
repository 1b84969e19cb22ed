"""Index build, load and search for the retrieval backends, on a synthetic corpus.

The corpus is deterministic (``--seed``): passages of about 100-150 encoder tokens made of
sentences over a fixed vocabulary of real English words, each about one made-up entity with a
unique name ("Velmora Quenthadrix is a quiet carpenter from ..."). A query names one passage's
entity and a few words of one of its sentences, so every query has one right passage.

Passages are encoded once per size with the offline default encoder (all-MiniLM-L6-v2 late
interaction, dim 384; ``load_encoder(None, cache_dir)``) and the same embeddings go into every
backend. Per backend and size it measures:

- build: ``encode_s`` (the encoder), ``backend_add_s`` + ``save_s`` (the backend), and
  passages/s for the whole build and for the backend alone;
- load: ``PassageIndex.load`` in a fresh subprocess (OS file cache warm, nothing in-process),
  median of ``--load-runs``; the encoder load (with its import and weight fingerprint) apart;
- search: p50/p95 ms over ``--queries`` queries through ``PassageIndex.search`` (query encoding
  included) on the loaded index; then the query encoding and the backend's ``search`` timed
  apart;
- quality: recall@1 and recall@k of the query's passage.
- the index searches in its default mode, hybrid (late interaction fused with BM25); BM25's own
  search is timed apart (``lexical_search_p50_ms``);
- with ``--http``: ``POST /v1/retrieve`` p50/p95 through a ``ragserve serve --index`` of the
  saved index, hybrid and late_interaction (``http_*_ms``): the number the 20 ms goal is about.

Goals printed alongside: search p50 <= 20 ms at 10k passages, index load <= 5 s.

    python -m benchmarks.retrieval --quick                      # 200 passages, 20 queries
    python -m benchmarks.retrieval --sizes 1000,10000 --backends exact,plaid --queries 100
    python -m benchmarks.retrieval --sizes 10000 --backends plaid --http \
        --retriever-model ragserve/minilm-l6-late-interaction-128
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.common import emit, mean, median, percentile, round_floats

if TYPE_CHECKING:
    import torch

    from retrieval.encoder import ColBERTEncoder
    from retrieval.index import PassageIndex
    from retrieval.types import Chunk

ROOT = Path(__file__).resolve().parent.parent
GOAL_SEARCH_P50_MS = 20.0  # at GOAL_SIZE passages
GOAL_SIZE = 10_000
GOAL_LOAD_S = 5.0

# -- synthetic corpus -------------------------------------------------------------------------

_NOUNS = ("lantern", "river", "bridge", "garden", "letter", "engine", "window", "basket",
          "mountain", "village", "harbor", "forest", "library", "market", "violin", "compass",
          "blanket", "ladder", "mirror", "candle", "saddle", "kettle", "anchor", "meadow",
          "orchard", "tower", "wagon", "carpet", "helmet", "hammer", "needle", "pillow",
          "barrel", "feather", "island", "canyon", "glacier", "harvest", "festival", "journal",
          "painting", "statue", "fountain", "workshop", "telescope", "bicycle", "cottage",
          "chimney", "quarry", "vineyard", "lighthouse", "monastery", "factory", "theater",
          "stadium", "museum", "railway", "tunnel", "canal", "pasture")
_VERBS = ("repaired", "painted", "carried", "borrowed", "discovered", "polished", "measured",
          "guarded", "abandoned", "designed", "rebuilt", "described", "photographed", "sold",
          "inherited", "restored", "explored", "mapped", "cleaned", "decorated", "visited",
          "admired", "replaced", "studied", "collected", "delivered", "ignored", "protected",
          "opened", "locked")
_ADJECTIVES = ("quiet", "ancient", "crooked", "golden", "narrow", "bright", "dusty", "hollow",
               "silver", "gentle", "rusty", "famous", "hidden", "wooden", "frozen", "crowded",
               "distant", "humble", "broken", "elegant", "muddy", "scarlet", "tiny", "enormous",
               "fragile", "peaceful", "stormy", "velvet", "wealthy", "patient")
_ROLES = ("carpenter", "sailor", "merchant", "painter", "farmer", "teacher", "baker",
          "architect", "doctor", "musician", "poet", "engineer", "gardener", "weaver", "miner")
_PLACES = ("valley", "coast", "province", "district", "plateau", "peninsula", "county", "delta")
_TIMES = ("morning", "winter", "spring", "evening", "autumn", "summer", "weekend", "night")
_SYLLABLES = ("vel", "mor", "quen", "tha", "drix", "zor", "bel", "kan", "lis", "oth", "ryn",
              "sev", "ul", "gra", "pim", "tor", "wen", "yas", "fen", "lo", "mab", "nir", "esk",
              "cor", "dai", "hul", "jov", "kre", "pau", "sid", "tav", "vim", "xan", "yel", "zu")
_SENTENCES = (
    "The {a} {n} {v} a {n2} near the {p}.",
    "Every {t} the {n} {v} the {a} {n2}.",
    "{e} {v} the {n} with a {a} {n2}.",
    "Later a {a} {n} {v} the {n2} by the {p}.",
    "Nobody expected the {n} beside the {n2} to be so {a}.",
    "In the {t} {e} {v} an old {n} and a {a} {n2}.",
)
_ENTITY_SENTENCES = tuple(s for s in _SENTENCES if "{e}" in s)  # the one a query is about


@dataclass(frozen=True)
class Corpus:
    texts: list[str]
    queries: list[str]
    targets: list[int]  # queries[i] is answered by passage targets[i]


def _name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def make_corpus(n: int, n_queries: int, seed: int = 0) -> Corpus:
    """``n`` passages, each about a uniquely named entity, and ``n_queries`` queries about
    distinct passages (chosen at random)."""
    rng = random.Random(seed)
    taken: set[str] = set()
    towns = [_name(rng, 2) for _ in range(40)]
    texts: list[str] = []
    facts: list[tuple[str, dict[str, str]]] = []
    for _ in range(n):
        entity = ""
        for _ in range(1000):  # bounded: a fresh family name
            family = _name(rng, 3)
            if family not in taken:
                taken.add(family)
                entity = f"{_name(rng, 2)} {family}"
                break
        if not entity:
            raise RuntimeError("ran out of unique entity names")
        adjective = rng.choice(_ADJECTIVES)
        article = "an" if adjective[0] in "aeiou" else "a"
        sentences = [f"{entity} is {article} {adjective} {rng.choice(_ROLES)} from the "
                     f"{rng.choice(_ADJECTIVES)} {rng.choice(_PLACES)} of {rng.choice(towns)}."]
        count = rng.randint(8, 9)
        slots: dict[str, str] = {}
        for j in range(count):
            slots = {"a": rng.choice(_ADJECTIVES), "n": rng.choice(_NOUNS),
                     "n2": rng.choice(_NOUNS), "v": rng.choice(_VERBS), "p": rng.choice(_PLACES),
                     "t": rng.choice(_TIMES), "e": entity}
            templates = _ENTITY_SENTENCES if j == count - 1 else _SENTENCES
            sentences.append(rng.choice(templates).format(**slots))
        texts.append(" ".join(sentences))
        facts.append((entity, slots))  # the last sentence (about the entity) makes the query
    targets = rng.sample(range(n), min(n_queries, n))
    queries = []
    for i in targets:
        entity, s = facts[i]
        queries.append(f"Which {s['a']} {s['n2']} was there when {entity} {s['v']} the "
                       f"{s['n']}?")
    return Corpus(texts, queries, targets)


# -- measurements -----------------------------------------------------------------------------


def _chunks(texts: Sequence[str]) -> list[Chunk]:
    from retrieval.types import Chunk

    return [Chunk(doc_id=f"p{i:06d}", source="synthetic", page=None, start=0, end=len(t), text=t)
            for i, t in enumerate(texts)]


def add_encoded(index: PassageIndex, chunks: Sequence[Chunk],
                embeddings: Sequence[torch.Tensor]) -> None:
    """``PassageIndex.add_chunks`` with embeddings computed beforehand (shared by backends)."""
    pids = list(range(index.next_pid, index.next_pid + len(chunks)))
    index.backend.add(pids, embeddings)
    index.chunks.update(zip(pids, chunks))
    index.next_pid += len(chunks)


_LOAD_CHILD = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
import torch, transformers  # noqa: F401
t1 = time.perf_counter()
from retrieval.default_encoder import load_encoder
from retrieval.index import PassageIndex, read_manifest
encoder = load_encoder(read_manifest(Path(sys.argv[1]))["encoder"]["name"], Path(sys.argv[2]))
encoder.fingerprint  # computed on first use: part of the encoder's cost, not the index's
t2 = time.perf_counter()
index = PassageIndex.load(Path(sys.argv[1]), encoder)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "encoder_load_s": t2 - t1, "index_load_s": t3 - t2,
                  "passages": len(index)}))
"""


def load_in_subprocess(index_dir: Path, cache_dir: Path, timeout: float = 600) -> dict:
    """Times of one ``PassageIndex.load`` in a fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(index_dir), str(cache_dir)],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"load subprocess failed ({r.returncode}): {r.stderr[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _backend_options(name: str, args: argparse.Namespace) -> dict:
    return {"nbits": args.nbits} if name == "plaid" else {}


def measure_backend(name: str, encoder: ColBERTEncoder, corpus: Corpus,
                    embeddings: list[torch.Tensor], encode_s: float, work: Path,
                    args: argparse.Namespace) -> dict[str, Any]:
    """Build, save, load (subprocess) and search one backend over pre-encoded passages."""
    from retrieval.index import PassageIndex

    n = len(corpus.texts)
    out: dict[str, Any] = {"backend": name, "passages": n}
    chunks = _chunks(corpus.texts)
    index = PassageIndex(encoder, name, **_backend_options(name, args))
    t0 = time.perf_counter()
    add_encoded(index, chunks, embeddings)
    t1 = time.perf_counter()
    index_dir = work / f"{name}-{n}"
    index.save(index_dir)
    t2 = time.perf_counter()
    del index
    gc.collect()
    backend_s = t2 - t0
    out.update(encode_s=encode_s, backend_add_s=t1 - t0, save_s=t2 - t1,
               build_passages_per_s=n / (encode_s + backend_s),
               backend_passages_per_s=n / backend_s, index_mib=_dir_mib(index_dir))

    loads = [load_in_subprocess(index_dir, args.cache_dir) for _ in range(args.load_runs)]
    out.update(index_load_s=median([x["index_load_s"] for x in loads]),
               index_load_runs_s=[x["index_load_s"] for x in loads],
               encoder_load_s=median([x["encoder_load_s"] for x in loads]),
               import_s=median([x["import_s"] for x in loads]))

    index = PassageIndex.load(index_dir, encoder)
    pid_of = {c.doc_id: pid for pid, c in index.chunks.items()}
    target_pids = [pid_of[f"p{i:06d}"] for i in corpus.targets]
    for q in corpus.queries[:3]:  # warm-up: first-call allocations, lazy packing
        index.search(q, args.k)
    full_ms, hits1, hitsk = [], 0, 0
    for q, pid in zip(corpus.queries, target_pids):
        t = time.perf_counter()
        hits = index.search(q, args.k)
        full_ms.append(1e3 * (time.perf_counter() - t))
        hits1 += bool(hits) and hits[0].chunk_id == pid
        hitsk += any(h.chunk_id == pid for h in hits)
    encode_ms, backend_ms = [], []
    for q in corpus.queries:  # the same searches in two timed halves
        t = time.perf_counter()
        encoded = encoder.encode_queries([q])[0]
        t1 = time.perf_counter()
        index.backend.search(encoded, args.k)
        encode_ms.append(1e3 * (t1 - t))
        backend_ms.append(1e3 * (time.perf_counter() - t1))
    n_q = len(corpus.queries)
    p50 = percentile(full_ms, 50)
    out.update(search_p50_ms=p50, search_p95_ms=percentile(full_ms, 95),
               search_mean_ms=mean(full_ms), query_encode_p50_ms=percentile(encode_ms, 50),
               backend_search_p50_ms=percentile(backend_ms, 50),
               backend_search_p95_ms=percentile(backend_ms, 95), recall_at_1=hits1 / n_q,
               recall_at_k=hitsk / n_q,
               meets_search_goal=p50 <= GOAL_SEARCH_P50_MS if n >= GOAL_SIZE else None,
               meets_load_goal=out["index_load_s"] <= GOAL_LOAD_S)
    lexical_ms = []
    for q in corpus.queries:
        t = time.perf_counter()
        index.lexical.search(q, index.retrieval.candidates)
        lexical_ms.append(1e3 * (time.perf_counter() - t))
    out.update(lexical_search_p50_ms=percentile(lexical_ms, 50), mode=index.retrieval.mode)
    del index
    gc.collect()
    if args.http:
        out.update(time_http(index_dir, corpus.queries, args.k, args.cache_dir))
        if n >= GOAL_SIZE:
            out["meets_http_goal"] = out["http_hybrid_p50_ms"] <= GOAL_SEARCH_P50_MS
    if not args.keep:
        shutil.rmtree(index_dir, ignore_errors=True)
    return round_floats(out, 4)


def time_http(index_dir: Path, queries: Sequence[str], k: int, cache_dir: Path,
              modes: Sequence[str] = ("hybrid", "late_interaction")) -> dict[str, float]:
    """p50/p95 ms of ``POST /v1/retrieve`` (one client, one request at a time, keep-alive) on a
    ``ragserve serve --index`` of ``index_dir`` on 127.0.0.1, per mode: what a user measures,
    HTTP, JSON, query encoding, both retrievers and the fusion included."""
    import socket

    import httpx

    from benchmarks.common import wait_server_ready

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(index_dir.parent / f"serve-{index_dir.name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "server", "--index", str(index_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--log-level",
                             "warning"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAGSERVE_CACHE_DIR": str(cache_dir)})
    out: dict[str, float] = {}
    try:
        wait_server_ready(proc, url, log.name, 900)  # kernels are settled before ready
        with httpx.Client(base_url=url, timeout=60) as client:
            for mode in modes:
                for q in queries[:5]:  # warm-up
                    client.post("/v1/retrieve", json={"query": q, "k": k, "mode": mode})
                ms = []
                for q in queries:
                    t = time.perf_counter()
                    r = client.post("/v1/retrieve", json={"query": q, "k": k, "mode": mode})
                    ms.append(1e3 * (time.perf_counter() - t))
                    r.raise_for_status()
                out[f"http_{mode}_p50_ms"] = percentile(ms, 50)
                out[f"http_{mode}_p95_ms"] = percentile(ms, 95)
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    return out


def backend_available(name: str, dim: int, args: argparse.Namespace) -> str | None:
    """None when backend ``name`` can be built here, else why not."""
    from retrieval.index import new_backend

    try:
        new_backend(name, dim, **_backend_options(name, args))
    except (ImportError, RuntimeError, ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"[:300]
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from retrieval.default_encoder import load_encoder

    t0 = time.perf_counter()
    encoder = load_encoder(args.retriever_model, args.cache_dir)
    encoder_load_s = time.perf_counter() - t0
    dim = encoder.settings.dim
    skipped = {b: why for b in args.backends if (why := backend_available(b, dim, args))}
    for b, why in skipped.items():
        print(f"# backend {b} skipped: {why}", file=sys.stderr, flush=True)
    results: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-retrieval-", dir=args.work_dir))
    try:
        for n in args.sizes:
            corpus = make_corpus(n, args.queries, args.seed)
            print(f"# {n} passages: encoding...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            embeddings = encoder.encode_documents(corpus.texts)
            encode_s = time.perf_counter() - t
            tokens = [len(e) for e in embeddings]
            print(f"# {n} passages encoded in {encode_s:.1f}s ({n / encode_s:.1f} passages/s, "
                  f"{mean(tokens):.0f} vectors/passage)", file=sys.stderr, flush=True)
            for b in args.backends:
                if b in skipped:
                    continue
                try:
                    r = measure_backend(b, encoder, corpus, embeddings, encode_s, work, args)
                except Exception as e:  # one backend failing must not lose the others' numbers
                    r = {"backend": b, "passages": n, "error": f"{type(e).__name__}: {e}"[:300]}
                r["vectors_per_passage"] = round(mean(tokens), 1)
                results.append(r)
                _print_result(r)
            del embeddings
            gc.collect()
    finally:
        if args.keep:
            print(f"# indexes kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "encoder": encoder.name,
        "encoder_label": encoder.label,
        "dim": dim,
        "encoder_load_in_process_s": round(encoder_load_s, 3),
        "sizes": args.sizes,
        "backends": args.backends,
        "skipped_backends": skipped,
        "queries": args.queries,
        "k": args.k,
        "seed": args.seed,
        "nbits": args.nbits,
        "goals": {"search_p50_ms": GOAL_SEARCH_P50_MS, "at_passages": GOAL_SIZE,
                  "index_load_s": GOAL_LOAD_S},
        "results": results,
    }


def _print_result(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{r['backend']:>5} {r['passages']:>6} passages: FAILED {r['error']}", flush=True)
        return
    goal = "" if r["meets_search_goal"] is None else (
        f" (goal <= {GOAL_SEARCH_P50_MS:.0f} ms: {'met' if r['meets_search_goal'] else 'MISSED'})")
    print(f"{r['backend']:>5} {r['passages']:>6} passages: build {r['build_passages_per_s']:.1f} "
          f"passages/s (backend alone {r['backend_passages_per_s']:.0f}/s), load "
          f"{r['index_load_s']:.2f}s (goal <= {GOAL_LOAD_S:.0f} s: "
          f"{'met' if r['meets_load_goal'] else 'MISSED'}), search p50 "
          f"{r['search_p50_ms']:.1f} ms p95 {r['search_p95_ms']:.1f} ms{goal} (query encoding "
          f"{r['query_encode_p50_ms']:.1f} ms + backend {r['backend_search_p50_ms']:.1f} ms), "
          f"recall@1 {r['recall_at_1']:.2f}", flush=True)


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from runtime.loader import default_cache_dir

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_csv_ints, default=[1000, 10000],
                   help="corpus sizes in passages")
    p.add_argument("--backends", type=_csv, default=["exact", "plaid"])
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("-k", type=int, default=10, help="passages per search (recall@k)")
    p.add_argument("--nbits", type=int, default=2, help="plaid: bits per residual dimension")
    p.add_argument("--load-runs", type=int, default=None,
                   help="subprocess loads per index (default 3; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retriever-model", default=None, help="encoder (default: the offline "
                   "default, 384 dims; ragserve/minilm-l6-late-interaction-128: 128 dims)")
    p.add_argument("--http", action="store_true", help="also time POST /v1/retrieve on a "
                   "`ragserve serve --index` of each index (hybrid and late_interaction)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where the default encoder is converted (RAGSERVE_CACHE_DIR)")
    p.add_argument("--work-dir", type=Path, default=None, help="where indexes are written "
                                                                "(default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the indexes (prints their folder)")
    p.add_argument("--quick", action="store_true", help="200 passages, 20 queries")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.sizes, args.queries = [200], 20
    if args.load_runs is None:
        args.load_runs = 1 if args.quick else 3
    if not args.sizes or min(args.sizes) < 1 or args.queries < 1 or args.k < 1:
        raise SystemExit("--sizes, --queries and -k must be >= 1")
    if args.load_runs < 1:
        raise SystemExit("--load-runs must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    emit("retrieval", args, result)
    return result


if __name__ == "__main__":
    main()
