"""Documents through the API (issue 23): ingestion throughput, search after incremental adds,
and decode speed while ingesting, side by side in one run on one ``ragserve serve`` (the embedded
SmolLM2-135M, ``--kernels step=eager``, the offline default retriever encoder: all-MiniLM-L6-v2
late interaction, dim 384, the same for ``ragserve index build``; ``--store-dir`` a temp dir).

1. **Throughput, API vs ``ragserve index build``, on the same documents**: the 163 Markdown
   files of ``benchmarks/data/more_itertools/docs``, the repo's ``docs/*.md`` and ``--pdfs`` of
   the repo's docs again as PDFs (written here: 50 Helvetica lines per page, one ``BT ... ET``
   text stream per page, a correct xref), so that PDF parsing is in the mix. A text or Markdown
   file is one page, a PDF its pages. *CLI*: the subprocess's wall time, and the build alone
   (its "built ... in X s" line, which starts before the encoder loads, less its "encoder ...
   loaded in Y s" line); run twice, with torch's default threads (one per core) and with as
   many as the ingestion worker (``OMP_NUM_THREADS`` = ``--ingest-threads``), so that the
   thread count and the API's own costs show apart. *API*: ``POST /v1/files`` for each file
   (``--upload-concurrency`` clients) timed apart from the ingestion (from ``POST
   .../file_batches`` until no file is ``in_progress``); the ingestion worker is started
   beforehand by a one-file store, so its encoder load is left out as the CLI's is.
   Passages: the CLI's log line; the store's ``<store-dir>/vector_stores/<id>/CURRENT`` ->
   ``manifest.json`` ``passages``. Both chunk alike (``auto`` is ragserve's 176/32 tokens,
   the CLI's default).
2. **Search after 20 incremental adds vs one batch**, ``--passages`` synthetic passages
   (``benchmarks.retrieval.make_corpus``: one right passage per query, each uploaded as one
   ``.txt`` file, nearly all under the 176-token chunk size: 10,000 files make 10,005
   passages). Store A: 21 file batches
   one after another, each waited for (a first one and 20 adds); store B: all files at once (in
   requests of ``--max-batch-files``). Both searched through ``POST
   /v1/vector_stores/{id}/search`` (``max_num_results`` 10, one client, sequential, A and B
   alternating query by query, after a warm-up): p50/p95 ms and recall@1 / recall@10 of the
   right file. Goals: p50 A/B <= 1.2, recall equal within 0.01. For reference, the same files
   built at once by ``ragserve index build`` and served as the server's ``--index`` (the
   read-only store) are searched alongside (``cli_fresh``), and that build's passages/s is a
   second CLI-vs-API throughput point at this size (against store A's ingestion).
3. **Decode TPOT while ingesting vs idle**: ``--streams`` concurrent streamed chats
   (``max_tokens`` ``--max-tokens``, temperature 0, ``ignore_eos`` so every request decodes the
   same count), ``--rounds`` rounds; TPOT of a request = (arrival of its last content chunk -
   its first) / (completion tokens - 1), p50 over requests. Idle: after store A is done and
   again after B is done (pooled); ingesting: while store B ingests (the load starts once B's
   first job has landed, so the worker is encoding, and B must still be ``in_progress`` when
   the load ends: ``ingesting_throughout``). Goal: ratio <= 1.15. The files B completed during
   the load and the CPU seconds the worker got meanwhile (``/proc/<pid>/stat``) are reported,
   so a starved ingestion (SCHED_IDLE) shows.

The server log (``--keep`` keeps it and the temp dir) gives each store's jobs and the worker's
own seconds per job: ``outside_worker_s`` is the rest of the ingestion's wall time (dispatch,
the server loading each new version before the files count as completed, polling). The last
line is one JSON object.

    python -m benchmarks.ingest --quick          # 1,000 passages, 40 of the more_itertools docs
    python -m benchmarks.ingest                  # 10,000 passages
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import emit, mean, median, percentile, round_floats, wait_server_ready

ROOT = Path(__file__).resolve().parent.parent
GOAL_SEARCH_P50_RATIO = 1.2
GOAL_RECALL_DELTA = 0.01
GOAL_TPOT_RATIO = 1.15
PDF_LINES_PER_PAGE = 50
WAIT_S = 3600.0  # the longest any one wait for ingestion may take
POLL_S = 0.2

# -- documents ----------------------------------------------------------------------------------


def _pdf_text(line: str) -> str:
    line = line.encode("latin-1", "replace").decode("latin-1")
    return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def make_pdf(pages: Sequence[Sequence[str]]) -> bytes:
    """A minimal valid PDF: one page per item, its lines in Helvetica 10 pt.

    Objects: 1 catalog, 2 page tree, then per page its page object and content stream, then
    the font; the xref gives each object's byte offset.
    """
    font = 3 + 2 * len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(len(pages)))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode()]
    for i, lines in enumerate(pages):
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents "
                       f"{4 + 2 * i} 0 R /Resources << /Font << /F1 {font} 0 R >> >> >>"
                       .encode())
        text = " ".join(f"({_pdf_text(line)}) Tj T*" for line in lines)
        stream = f"BT /F1 10 Tf 12 TL 40 760 Td {text} ET".encode("latin-1")
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def write_documents(out: Path, n_more_itertools: int | None, n_pdfs: int) -> dict[str, int]:
    """The throughput corpus in ``out``: file name -> pages."""
    out.mkdir(parents=True)
    more = sorted((ROOT / "benchmarks/data/more_itertools/docs").glob("*.md"))[:n_more_itertools]
    repo = sorted((ROOT / "docs").glob("*.md"))
    pages: dict[str, int] = {}
    for path in more:
        shutil.copy(path, out / path.name)
        pages[path.name] = 1
    for path in repo:
        shutil.copy(path, out / f"repo-{path.name}")
        pages[f"repo-{path.name}"] = 1
    for path in repo[:n_pdfs]:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        split = [lines[i:i + PDF_LINES_PER_PAGE] for i in range(0, len(lines),
                                                                 PDF_LINES_PER_PAGE)]
        (out / f"repo-{path.stem}.pdf").write_bytes(make_pdf(split))
        pages[f"repo-{path.stem}.pdf"] = len(split)
    return pages


def write_passages(out: Path, texts: Sequence[str]) -> list[str]:
    """One ``.txt`` file per passage; their names, in order."""
    out.mkdir(parents=True)
    names = [f"p{i:06d}.txt" for i in range(len(texts))]
    for name, text in zip(names, texts):
        (out / name).write_text(text)
    return names


# -- ragserve index build -----------------------------------------------------------------------

#: ``ragserve`` itself (``python -m server`` is ``ragserve serve`` only)
RAGSERVE = "import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))"
_BUILT = re.compile(r"built \w+ index of (\d+) passages from (\d+) documents in ([0-9.]+)s")
_ENCODER = re.compile(r"retriever encoder .* loaded in ([0-9.]+)s")


def index_build(docs: Path, out: Path, env: dict[str, str], timeout: float,
                threads: int | None = None) -> dict[str, Any]:
    """``ragserve index build docs --out out`` in a subprocess: wall time, and the build alone
    (the logged build time, which includes the encoder load, less the logged encoder load);
    ``threads``: its torch threads (``OMP_NUM_THREADS``; default: torch's, one per core)."""
    if threads is not None:
        env = {**env, "OMP_NUM_THREADS": str(threads)}
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RAGSERVE, "index", "build", str(docs), "--out",
                        str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    wall = time.perf_counter() - t0
    built, encoder = _BUILT.search(r.stderr), _ENCODER.search(r.stderr)
    if r.returncode != 0 or built is None or encoder is None:
        raise RuntimeError(f"index build failed ({r.returncode}): {r.stderr[-2000:]}")
    logged, encoder_s = float(built.group(3)), float(encoder.group(1))
    return {"threads": threads, "wall_s": wall, "logged_s": logged, "encoder_load_s": encoder_s,
            "build_s": logged - encoder_s, "passages": int(built.group(1)),
            "documents": int(built.group(2))}


# -- the server ---------------------------------------------------------------------------------

_WORKER = re.compile(r"ingestion worker (\d+) ready")
_JOB = re.compile(r"store (vs_\w+): (\d+) files in ([0-9.]+)s \((\d+) pages, (\d+) passages\)")


class Server:
    """One ``ragserve serve`` on 127.0.0.1 with its store directory in ``work``."""

    def __init__(self, args: argparse.Namespace, work: Path, index: Path | None,
                 env: dict[str, str], max_files: int) -> None:
        self.url = f"http://127.0.0.1:{args.port}"
        self.store_dir = work / "store"
        self.log_path = work / "server.log"
        self.batch_files = args.max_batch_files
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(args.port),
               "--kernels", "step=eager", "--max-num-seqs", str(max(4, args.streams)),
               "--store-dir", str(self.store_dir), "--responses-store-persist", "false",
               "--max-files", str(max_files), "--max-files-per-vector-store", str(max_files),
               "--max-batch-files", str(args.max_batch_files),
               "--ingest-threads", str(args.ingest_threads), "--dtype", args.dtype]
        if index is not None:
            cmd += ["--index", str(index)]
        if args.model:
            cmd += ["--model", args.model]
        self.cmd = cmd
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.perf_counter()
        try:
            wait_server_ready(self.proc, self.url, str(self.log_path), args.start_timeout)
        except RuntimeError:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t0
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass

    @staticmethod
    def _ok(r: httpx.Response) -> dict[str, Any]:
        if r.status_code != 200:
            raise RuntimeError(f"{r.request.method} {r.request.url.path}: {r.status_code} "
                               f"{r.text[:500]}")
        return r.json()

    def upload(self, path: Path) -> str:
        r = self.http.post("/v1/files", files={"file": (path.name, path.read_bytes())},
                           data={"purpose": "assistants"})
        return self._ok(r)["id"]

    def upload_all(self, paths: Sequence[Path], clients: int) -> list[str]:
        with ThreadPoolExecutor(clients) as pool:
            return list(pool.map(self.upload, paths))

    def create_store(self, name: str) -> str:
        return self._ok(self.http.post("/v1/vector_stores", json={"name": name}))["id"]

    def add(self, store: str, file_ids: Sequence[str]) -> None:
        """``file_ids`` into ``store`` as file batches of at most ``--max-batch-files``."""
        for i in range(0, len(file_ids), self.batch_files):
            self._ok(self.http.post(f"/v1/vector_stores/{store}/file_batches",
                                    json={"file_ids": list(file_ids[i:i + self.batch_files])}))

    def counts(self, store: str) -> dict[str, int]:
        return self._ok(self.http.get(f"/v1/vector_stores/{store}"))["file_counts"]

    def wait(self, store: str, timeout: float = WAIT_S) -> dict[str, int]:
        """Until no file of ``store`` is ``in_progress``; its file counts then."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts(store)
            if counts["in_progress"] == 0:
                return counts
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"store {store} still ingesting: {counts} "
                                   f"(see {self.log_path})")
            time.sleep(POLL_S)

    def manifest(self, store: str) -> dict[str, Any]:
        root = self.store_dir / "vector_stores" / store
        version = (root / "CURRENT").read_text().strip()
        return json.loads((root / version / "manifest.json").read_text())

    def index_store(self) -> str:
        """The id of the read-only store that is the server's ``--index``."""
        stores = self._ok(self.http.get("/v1/vector_stores", params={"limit": 100}))["data"]
        return next(s["id"] for s in stores if s["metadata"].get("read_only"))

    def search(self, store: str, query: str, k: int) -> tuple[float, list[str]]:
        """(ms, filenames of the hits, best first)."""
        t0 = time.perf_counter()
        r = self.http.post(f"/v1/vector_stores/{store}/search",
                           json={"query": query, "max_num_results": k})
        ms = 1e3 * (time.perf_counter() - t0)
        return ms, [hit["filename"] for hit in self._ok(r)["data"]]

    def worker_cpu_s(self) -> float | None:
        """CPU seconds (user + system) the current ingestion worker has used."""
        pids = _WORKER.findall(self.log_path.read_text())
        try:
            fields = Path(f"/proc/{pids[-1]}/stat").read_text().rsplit(")", 1)[1].split()
        except (IndexError, OSError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def jobs(self, store: str) -> dict[str, Any]:
        """The ingestion jobs the server logged for ``store``: count, files, the worker's own
        seconds (parse, chunk, encode, save), pages, passages."""
        rows = [m.groups()[1:] for m in _JOB.finditer(self.log_path.read_text())
                if m.group(1) == store]
        return {"jobs": len(rows), "files": sum(int(r[0]) for r in rows),
                "worker_s": sum(float(r[1]) for r in rows),
                "pages": sum(int(r[2]) for r in rows),
                "passages": sum(int(r[3]) for r in rows)}


# -- measurements -------------------------------------------------------------------------------


def api_ingest(server: Server, paths: Sequence[Path], name: str, clients: int
               ) -> dict[str, Any]:
    """Upload ``paths``, then ingest them as one store: the two phases timed apart."""
    t0 = time.perf_counter()
    ids = server.upload_all(paths, clients)
    upload_s = time.perf_counter() - t0
    store = server.create_store(name)
    t0 = time.perf_counter()
    server.add(store, ids)
    counts = server.wait(store)
    ingest_s = time.perf_counter() - t0
    manifest = server.manifest(store)
    return {"store": store, "upload_s": upload_s, "uploads_per_s": len(ids) / upload_s,
            "ingest_s": ingest_s, "completed": counts["completed"], "failed": counts["failed"],
            "passages": manifest["passages"], "segments": len(manifest["segments"]),
            **server.jobs(store)}


def _outside_worker(d: dict[str, Any]) -> dict[str, Any]:
    """Seconds of the ingestion not spent in the worker's jobs (dispatch, the server loading
    each new version, polling), and the store's passages/s over the worker's seconds alone."""
    d["outside_worker_s"] = d["ingest_s"] - d["worker_s"]
    d["worker_passages_per_s"] = d["passages"] / d["worker_s"] if d["worker_s"] else None
    return d


def throughput(server: Server, docs: Path, pages: dict[str, int], cli: dict[str, Any],
               same: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    api = api_ingest(server, [docs / n for n in sorted(pages)], "docs", args.upload_concurrency)
    n_pages = sum(pages.values())
    pdfs = [n for n in pages if n.endswith(".pdf")]
    cli.update(pages_per_s=n_pages / cli["build_s"],
               passages_per_s=cli["passages"] / cli["build_s"],
               wall_pages_per_s=n_pages / cli["wall_s"])
    api.update(pages_per_s=n_pages / api["ingest_s"],
               passages_per_s=api["passages"] / api["ingest_s"],
               with_upload_pages_per_s=n_pages / (api["upload_s"] + api["ingest_s"]))
    _outside_worker(api)
    out = {"files": len(pages), "pdfs": len(pdfs), "pdf_pages": sum(pages[n] for n in pdfs),
           "pages": n_pages, "index_build": cli, "api": api,
           "api_over_build_passages_per_s": api["passages_per_s"] / cli["passages_per_s"]}
    if same is not None:  # the CLI on as many torch threads as the worker
        same.update(pages_per_s=n_pages / same["build_s"],
                    passages_per_s=same["passages"] / same["build_s"])
        out["index_build_worker_threads"] = same
        out["api_over_build_worker_threads_passages_per_s"] = (api["passages_per_s"]
                                                               / same["passages_per_s"])
    return out


def cli_docs_threads() -> int:
    """The torch threads ``ragserve index build`` gets by default."""
    import torch

    return torch.get_num_threads()


def search_side_by_side(server: Server, stores: dict[str, str], queries: Sequence[str],
                        targets: Sequence[str], k: int, warmup: int) -> dict[str, Any]:
    """Each query on every store in turn (the order rotating), sequential."""
    names = list(stores)
    for q in queries[:warmup]:
        for name in names:
            server.search(stores[name], q, k)
    ms: dict[str, list[float]] = {n: [] for n in names}
    at1 = dict.fromkeys(names, 0)
    atk = dict.fromkeys(names, 0)
    for i, (q, target) in enumerate(zip(queries, targets)):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t, hits = server.search(stores[name], q, k)
            ms[name].append(t)
            at1[name] += bool(hits) and hits[0] == target
            atk[name] += target in hits
    n = len(queries)
    return {name: {"p50_ms": percentile(ms[name], 50), "p95_ms": percentile(ms[name], 95),
                   "mean_ms": mean(ms[name]), "recall_at_1": at1[name] / n,
                   f"recall_at_{k}": atk[name] / n} for name in names}


async def _chat_load(url: str, streams: int, rounds: int, max_tokens: int, tag: str
                     ) -> list[float]:
    """TPOT (ms) of each of ``streams x rounds`` streamed chats."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                                timeout=600)
    model = (await client.models.list()).data[0].id
    tpots: list[float] = []

    async def one(i: int) -> None:
        stream = await client.chat.completions.create(
            model=model, max_tokens=max_tokens, temperature=0, stream=True,
            messages=[{"role": "user", "content": f"Write a short story about a lighthouse "
                                                  f"keeper, number {i} ({tag})."}],
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        first = last = None
        tokens = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        if first is None or last is None or tokens < 2:
            raise RuntimeError(f"request {i} ({tag}) streamed {tokens} tokens")
        tpots.append(1e3 * (last - first) / (tokens - 1))

    try:
        for r in range(rounds):
            await asyncio.gather(*(one(r * streams + s) for s in range(streams)))
    finally:
        await client.close()
    return tpots


def chat_load(server: Server, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    tpots = asyncio.run(_chat_load(server.url, args.streams, args.rounds, args.max_tokens, tag))
    return {"requests": len(tpots), "tpot_p50_ms": median(tpots), "tpot_mean_ms": mean(tpots),
            "tpot_p95_ms": percentile(tpots, 95), "seconds": time.perf_counter() - t0,
            "tpots_ms": [round(t, 2) for t in tpots]}


def grow(server: Server, ids: Sequence[str], batches: int) -> dict[str, Any]:
    """Store A: ``ids`` in ``batches`` file batches, each waited for."""
    store = server.create_store("grown")
    parts = [ids[i * len(ids) // batches:(i + 1) * len(ids) // batches] for i in range(batches)]
    seconds = []
    for part in parts:
        t0 = time.perf_counter()
        server.add(store, part)
        counts = server.wait(store)
        seconds.append(time.perf_counter() - t0)
    manifest = server.manifest(store)
    out = {"store": store, "batches": batches, "ingest_s": sum(seconds),
           "batch_s": [round(s, 2) for s in seconds], "completed": counts["completed"],
           "failed": counts["failed"], "passages": manifest["passages"],
           "segments": len(manifest["segments"]),
           "passages_per_s": manifest["passages"] / sum(seconds), **server.jobs(store)}
    return _outside_worker(out)


def at_once_while_chatting(server: Server, ids: Sequence[str], args: argparse.Namespace
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Store B: every file at once; the chat load runs while it ingests."""
    store = server.create_store("at-once")
    t0 = time.perf_counter()
    server.add(store, ids)
    deadline = time.monotonic() + WAIT_S
    while (c := server.counts(store))["completed"] == 0 and c["in_progress"] > 0:
        if time.monotonic() > deadline:  # the first job has landed: the worker is encoding
            raise RuntimeError(f"store {store}: no job finished in {WAIT_S:.0f} s")
        time.sleep(POLL_S)
    before, cpu0 = server.counts(store), server.worker_cpu_s()
    load = chat_load(server, args, "ingesting")
    after, cpu1 = server.counts(store), server.worker_cpu_s()
    counts = server.wait(store)
    ingest_s = time.perf_counter() - t0
    manifest = server.manifest(store)
    b = {"store": store, "ingest_s": ingest_s, "completed": counts["completed"],
         "failed": counts["failed"], "passages": manifest["passages"],
         "segments": len(manifest["segments"]),
         "passages_per_s": manifest["passages"] / ingest_s, **server.jobs(store)}
    _outside_worker(b)
    load.update(in_progress_at_start=before["in_progress"],
                in_progress_at_end=after["in_progress"],
                files_completed_during_load=after["completed"] - before["completed"],
                ingesting_throughout=after["in_progress"] > 0)
    load["files_per_s_during_load"] = load["files_completed_during_load"] / load["seconds"]
    if None not in (cpu0, cpu1):  # the worker's share of a core while the chats ran
        load["worker_cpu_s_during_load"] = cpu1 - cpu0
        load["worker_cores_during_load"] = (cpu1 - cpu0) / load["seconds"]
    return b, load


# -- the run ------------------------------------------------------------------------------------


def _phase(out: dict[str, Any], name: str) -> None:
    """Note the phase on stderr and the 1-minute load average as it starts (other jobs on the
    machine show there)."""
    out.setdefault("load_avg_at_phase_start", {})[name] = round(os.getloadavg()[0], 2)
    print(f"# {name} ...", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.retrieval import make_corpus

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.work_dir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    out: dict[str, Any] = {"load_avg_at_start": os.getloadavg()[0],
                           "passages": args.passages, "queries": args.queries,
                           "adds": args.adds, "ingest_threads": args.ingest_threads,
                           "streams": args.streams, "rounds": args.rounds,
                           "max_tokens": args.max_tokens, "work_dir": str(work)}
    try:
        docs = work / "docs"
        pages = write_documents(docs, args.more_itertools_docs, args.pdfs)
        corpus = make_corpus(args.passages, args.queries, args.seed)
        synthetic = work / "synthetic"
        names = write_passages(synthetic, corpus.texts)
        targets = [names[i] for i in corpus.targets]

        _phase(out, "index build of the documents")
        cli_docs = index_build(docs, work / "docs-index", env, WAIT_S)
        cli_same = None
        if args.ingest_threads != cli_docs_threads():
            _phase(out, "index build of the documents, worker threads")
            cli_same = index_build(docs, work / "docs-index", env, WAIT_S, args.ingest_threads)
        _phase(out, "index build of the synthetic files")
        cli_fresh = index_build(synthetic, work / "fresh-index", env, WAIT_S)
        cli_fresh["passages_per_s"] = cli_fresh["passages"] / cli_fresh["build_s"]

        max_files = len(names) + len(pages) + 100
        server = Server(args, work, work / "fresh-index", env, max_files)
        out["server"] = {"ready_s": server.ready_s, "cmd": " ".join(server.cmd[1:])}
        try:
            warm = server.create_store("warm-up")  # starts the worker: its encoder load
            t0 = time.perf_counter()
            server.add(warm, [server.upload(docs / "repo-overview.md")])
            server.wait(warm)
            out["server"]["worker_start_s"] = time.perf_counter() - t0

            _phase(out, "documents through the API")
            out["throughput"] = throughput(server, docs, pages, cli_docs, cli_same, args)
            _show("throughput", out["throughput"])

            _phase(out, "synthetic files uploaded, store A")
            t0 = time.perf_counter()
            ids = server.upload_all([synthetic / n for n in names], args.upload_concurrency)
            upload_s = time.perf_counter() - t0
            a = grow(server, ids, args.adds + 1)
            _show("store A", a)

            _phase(out, "chat load idle, then while store B ingests")
            chat_load(server, args, "warm-up")
            idle_before = chat_load(server, args, "idle")
            b, busy = at_once_while_chatting(server, ids, args)
            _show("store B", b)
            idle_after = chat_load(server, args, "idle after")

            _phase(out, "searches of A, B and the CLI's build")
            search = search_side_by_side(
                server, {"after_adds": a["store"], "one_batch": b["store"],
                         "cli_fresh": server.index_store()},
                corpus.queries, targets, args.k, args.warmup_queries)
        finally:
            server.stop()
    finally:
        if args.keep:
            print(f"# kept {work}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)

    k = args.k
    sa, sb, sc = search["after_adds"], search["one_batch"], search["cli_fresh"]
    out["search"] = {
        "upload_s": upload_s, "uploads_per_s": len(ids) / upload_s,
        "store_a": a, "store_b": b, "cli_fresh_build": cli_fresh,
        "api_over_cli_passages_per_s": a["passages_per_s"] / cli_fresh["passages_per_s"],
        **search,
        "p50_ratio_a_over_b": sa["p50_ms"] / sb["p50_ms"],
        "recall_at_1_delta_a_minus_b": sa["recall_at_1"] - sb["recall_at_1"],
        f"recall_at_{k}_delta_a_minus_b": sa[f"recall_at_{k}"] - sb[f"recall_at_{k}"],
        "p50_ratio_a_over_cli_fresh": sa["p50_ms"] / sc["p50_ms"],
    }
    idle = idle_before["tpots_ms"] + idle_after["tpots_ms"]
    out["decode"] = {"idle_before": idle_before, "ingesting": busy, "idle_after": idle_after,
                     "idle_tpot_p50_ms": median(idle),
                     "tpot_ratio": busy["tpot_p50_ms"] / median(idle),
                     "tpot_ratio_vs_idle_before": busy["tpot_p50_ms"]
                     / idle_before["tpot_p50_ms"]}
    s, d = out["search"], out["decode"]
    recall_delta = max(abs(s["recall_at_1_delta_a_minus_b"]),
                       abs(s[f"recall_at_{k}_delta_a_minus_b"]))
    out["goals"] = {
        "search_p50_ratio_a_over_b": {"goal": f"<= {GOAL_SEARCH_P50_RATIO}",
                                      "value": s["p50_ratio_a_over_b"],
                                      "met": s["p50_ratio_a_over_b"] <= GOAL_SEARCH_P50_RATIO},
        "recall_delta_a_vs_b": {"goal": f"<= {GOAL_RECALL_DELTA}", "value": recall_delta,
                                "met": recall_delta <= GOAL_RECALL_DELTA},
        "tpot_ratio_ingesting_over_idle": {
            "goal": f"<= {GOAL_TPOT_RATIO}, ingesting throughout", "value": d["tpot_ratio"],
            "met": d["tpot_ratio"] <= GOAL_TPOT_RATIO and busy["ingesting_throughout"]},
    }
    out["load_avg_at_end"] = os.getloadavg()[0]  # other jobs on the machine show here
    out["tree_dirty"] = _tree_dirty()
    return _rounded(out)


def _rounded(d: Any) -> Any:
    if isinstance(d, dict):
        return round_floats({k: _rounded(v) for k, v in d.items()}, 4)
    return d


def _tree_dirty() -> bool | None:
    try:
        r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(r.stdout.strip()) if r.returncode == 0 else None


def _show(name: str, d: dict[str, Any]) -> None:
    print(f"{name}: {json.dumps(_rounded(d), default=float)}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.common import parser

    p = parser(__doc__.split("\n\n")[0])
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--passages", type=int, default=10_000,
                   help="synthetic passages (files) for the search and decode measurements")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("-k", type=int, default=10, help="max_num_results (recall@k)")
    p.add_argument("--warmup-queries", type=int, default=5)
    p.add_argument("--adds", type=int, default=20, help="store A: batches after the first")
    p.add_argument("--more-itertools-docs", type=int, default=None,
                   help="how many of the 163 more_itertools docs (default all; quick 40)")
    p.add_argument("--pdfs", type=int, default=14, help="repo docs also ingested as PDFs")
    p.add_argument("--upload-concurrency", type=int, default=4)
    p.add_argument("--ingest-threads", type=int, default=1,
                   help="the server's --ingest-threads (its default: 1)")
    p.add_argument("--max-batch-files", type=int, default=2000,
                   help="the server's --max-batch-files (its default); bigger sets are split")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8, help="chat rounds of --streams requests")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=8431)
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the temp dir goes (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (store, logs)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.passages = min(args.passages, 1000)
        args.queries = min(args.queries, 50)
        if args.more_itertools_docs is None:
            args.more_itertools_docs = 40
        args.pdfs = min(args.pdfs, 4)
        args.rounds = min(args.rounds, 3)
    if min(args.passages, args.queries, args.k, args.streams, args.rounds, args.max_tokens,
           args.upload_concurrency, args.max_batch_files) < 1 or args.adds < 0:
        raise SystemExit("sizes must be >= 1 (--adds >= 0)")
    if args.passages < args.adds + 1:
        raise SystemExit("--passages must be at least --adds + 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    emit("ingest", args, result)
    return result


if __name__ == "__main__":
    main()
