"""``ragserve run-batch``: an OpenAI Batch API input file (JSONL) run offline, as vLLM's
``run-batch`` does.

Each input line is ``{"custom_id", "method": "POST", "url", "body"}`` with ``url``
``/v1/chat/completions`` or ``/v1/completions``; each output line is
``{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
"error": {"code", "message", "line"} | null}``.

The lines go through the same FastAPI app as ``ragserve serve`` (built by
:func:`server.app.build_app` from the same flags), called in-process as an ASGI application:
validation, chat templates, RAG, sampling and errors are the server's own. The app's lifespan
(which starts the engine and loads the index) is entered directly; up to
``--max-concurrency`` lines are in flight at once, so that the engine runs full batches.

Results are appended to the output as they finish (flushed per line, fsynced every few lines),
so a job that stops can be rerun with the same arguments: lines whose ``custom_id`` is already in
the output are skipped. A bad line becomes an error line; it never stops the job.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.config import (
    ConfigError,
    ServerConfig,
    add_env_defaults,
    add_serve_args,
    config_from_namespace,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from engine.core import Engine

log = logging.getLogger(__name__)

PROG = "ragserve run-batch"
URLS = ("/v1/chat/completions", "/v1/completions")
#: fsync the output after this many lines or this many seconds, whichever comes first (every
#: line is flushed to the OS at once: a killed process loses nothing)
SYNC_LINES = 32
SYNC_SECONDS = 1.0
#: the queue bounds of ``serve`` protect interactive clients; a batch waits as long as it takes
BATCH_QUEUE_WAIT = 365 * 24 * 3600.0
BATCH_QUEUE_LEN = 1_000_000

# error codes of lines that never reached the server (OpenAI's batch error codes where one fits)
INVALID_JSON = "invalid_json_line"
MISSING = "missing_required_parameter"
INVALID_METHOD = "invalid_method"
INVALID_URL = "invalid_url"
INVALID_REQUEST = "invalid_request"
DUPLICATE = "duplicate_custom_id"
STREAM = "stream_not_supported"


class BatchError(Exception):
    """A job-level failure (the job cannot run or cannot go on); ``exit_code`` for the CLI."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class BatchSummary:
    """What one run did. ``lines``: non-blank input lines; ``skipped``: already in the output
    (resume); ``succeeded`` and ``failed``: lines written by this run."""

    lines: int = 0
    skipped: int = 0
    succeeded: int = 0
    failed: int = 0
    output_tokens: int = 0
    seconds: float = 0.0


# -- lines -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class _Done:
    """What an existing output file already holds: ``custom_ids`` answered, and the input
    lines answered with an error that has no usable custom_id (an unreadable line, a
    duplicate)."""

    custom_ids: frozenset[str]
    lines: frozenset[int]


def _error(custom_id: str | None, code: str, message: str, line: int,
           response: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": response,
            "error": {"code": code, "message": message, "line": line}}


def _parse(line: int, raw: bytes) -> _Request | dict[str, Any]:
    """An input line as a request, or the error line that answers it."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return _error(None, INVALID_JSON, f"line {line} is not valid JSON: {e}", line)
    if not isinstance(obj, dict):
        return _error(None, INVALID_JSON, f"line {line} is not a JSON object", line)
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _error(None, MISSING, f"line {line} has no `custom_id` (a non-empty string)",
                      line)
    method, url, body = obj.get("method"), obj.get("url"), obj.get("body")
    if not isinstance(method, str) or method.upper() != "POST":
        return _error(custom_id, INVALID_METHOD,
                      f"`method` must be \"POST\", got {json.dumps(method)}", line)
    if url not in URLS:
        return _error(custom_id, INVALID_URL, f"`url` must be one of {', '.join(URLS)}, "
                                              f"got {json.dumps(url)}", line)
    if body is None:
        return _error(custom_id, MISSING, "the line has no `body`", line)
    if not isinstance(body, dict):
        return _error(custom_id, INVALID_REQUEST, "`body` must be a JSON object", line)
    if body.get("stream") is True:
        return _error(custom_id, STREAM, "a batch runs without streaming: remove "
                                         "`\"stream\": true` from the body", line)
    return _Request(line, custom_id, url, body)


def _plan(input_path: Path, done: _Done) -> Iterator[tuple[str, _Request | dict[str, Any]]]:
    """``("skip", ...)``, ``("write", error line)`` or ``("run", request)`` per non-blank input
    line, in order. Deterministic, so that a counting pass and the run agree."""
    seen: set[str] = set()
    with open(input_path, "rb") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            item = _parse(line, raw)
            custom_id = item.custom_id if isinstance(item, _Request) else item["custom_id"]
            if custom_id is not None and custom_id in seen:
                if line in done.lines:
                    yield "skip", item
                else:
                    yield "write", _error(custom_id, DUPLICATE, f"custom_id {custom_id!r} "
                                          "appears on an earlier line; each line needs its "
                                          "own", line)
                continue
            if custom_id is not None:
                seen.add(custom_id)
                if custom_id in done.custom_ids:
                    yield "skip", item
                    continue
            elif line in done.lines:
                yield "skip", item
                continue
            yield ("run" if isinstance(item, _Request) else "write"), item


def _load_done(output_path: Path) -> _Done:
    """The output file's answered lines; a last line cut short (a job killed mid-write) is
    removed. A line that is not a batch output line is a job-level error: this file is not
    appended to."""
    ids: set[str] = set()
    lines: set[int] = set()
    if not output_path.exists():
        return _Done(frozenset(), frozenset())
    with open(output_path, "r+b") as f:
        offset = 0
        for n, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                log.warning("%s: removing a last line cut short (%d bytes) by an earlier run",
                            output_path, len(raw))
                f.truncate(offset)
                f.flush()
                os.fsync(f.fileno())
                break
            offset += len(raw)
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = None
            if not isinstance(obj, dict) or "custom_id" not in obj:
                raise BatchError(f"{output_path} line {n} is not a run-batch output line; "
                                 "refusing to append to it (give another --output-file)")
            error = obj.get("error") if isinstance(obj.get("error"), dict) else {}
            custom_id = obj["custom_id"]
            if custom_id is None or error.get("code") == DUPLICATE:
                if isinstance(error.get("line"), int):
                    lines.add(error["line"])
            else:
                ids.add(custom_id)
    return _Done(frozenset(ids), frozenset(lines))


def _result(req: _Request, status: int, payload: bytes) -> dict[str, Any]:
    """The output line for an HTTP response of the app."""
    try:
        body: Any = json.loads(payload)
    except ValueError:
        body = payload.decode("utf-8", "replace")
    request_id = body.get("id") if isinstance(body, dict) else None
    response = {"status_code": status,
                "request_id": request_id if isinstance(request_id, str)
                else f"req_{uuid.uuid4().hex}",
                "body": body}
    if 200 <= status < 300:
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": req.custom_id,
                "response": response, "error": None}
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {}
    code = err.get("code") if isinstance(err.get("code"), str) else err.get("type")
    return _error(req.custom_id, str(code or f"http_{status}"),
                  str(err.get("message") or body), req.line, response)


# -- the app, in-process ---------------------------------------------------------------------


async def call_app(app: Any, path: str, body: bytes) -> tuple[int, bytes]:
    """POST ``body`` (JSON) to ``path`` of the ASGI ``app`` in this process, as an HTTP server
    would; returns the status and the response body. The client stays connected until the
    response is complete (the app aborts a request whose client disconnects)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
        "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"host", b"run-batch"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 0), "server": ("run-batch", 0), "state": {},
    }
    sent = False
    complete = asyncio.Event()
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                complete.set()

    try:
        await app(scope, receive, send)
    except Exception:
        if not status:  # the app failed before answering (it answered 500 otherwise)
            raise
    finally:
        complete.set()
    return status, b"".join(chunks)


async def _wait_ready(app: FastAPI, failed: threading.Event) -> None:
    """Until the engine is ready (and the index loaded, with --index); BatchError if either
    fails."""
    from engine.client import EngineState

    engine, rag = app.state.engine, app.state.rag
    t0 = time.monotonic()
    while True:
        if engine.state in (EngineState.FAILED, EngineState.STOPPED):
            raise BatchError(f"the model failed to load: {engine.error or engine.state.value}",
                             1)
        if rag.enabled and rag.state == "failed":
            raise BatchError(f"the index failed to load: {rag.error}", 1)
        if engine.state == EngineState.READY and (not rag.enabled or rag.state == "ready"):
            log.info("ready in %.1fs", time.monotonic() - t0)
            return
        if failed.is_set():
            raise BatchError("the engine failed", 1)
        await asyncio.sleep(0.1)


class _Output:
    """The output file, appended to line by line."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "ab")  # noqa: SIM115 - closed by close()
        self.unsynced = 0
        self.synced_at = time.monotonic()

    def write(self, obj: dict[str, Any]) -> None:
        try:
            data = json.dumps(obj, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate (from a \ud800 escape): keep it escaped
            data = json.dumps(obj).encode()
        self.f.write(data + b"\n")
        self.f.flush()
        self.unsynced += 1
        if self.unsynced >= SYNC_LINES or time.monotonic() - self.synced_at >= SYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        if self.unsynced:
            os.fsync(self.f.fileno())
        self.unsynced, self.synced_at = 0, time.monotonic()

    def close(self) -> None:
        self.sync()
        self.f.close()


def batch_config(config: ServerConfig) -> ServerConfig:
    """``config`` for a batch: no queue bounds (``--max-concurrency`` bounds the lines in
    flight) and no API key (nothing is served)."""
    return dataclasses.replace(config, max_queue_wait=BATCH_QUEUE_WAIT,
                               max_queue_len=max(config.max_queue_len, BATCH_QUEUE_LEN),
                               api_key=None)


async def run_batch(config: ServerConfig, input_path: Path, output_path: Path,
                    max_concurrency: int | None = None,
                    factory: Callable[[], Engine] | None = None,
                    progress: bool = True) -> BatchSummary:
    """Run every line of ``input_path`` not yet answered in ``output_path`` through the app
    ``config`` describes, appending the answers to ``output_path``. ``factory`` replaces
    ragserve's model load (tests). Raises :class:`BatchError` when the job cannot run or
    cannot go on (the input cannot be read, the model or the index fails to load, the engine
    dies); every per-line problem is an error line instead."""
    from tqdm import tqdm

    from server.app import build_app

    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise BatchError(f"cannot read the input file {input_path}: no such file")
    if output_path.exists() and output_path.samefile(input_path):
        raise BatchError("the output file must not be the input file")
    concurrency = 2 * config.max_num_seqs if max_concurrency is None else max_concurrency
    if concurrency < 1:
        raise BatchError(f"--max-concurrency must be >= 1, got {concurrency}")
    if not output_path.parent.is_dir():
        raise BatchError(f"cannot write the output file {output_path}: "
                         f"{output_path.parent} is not a directory")
    try:
        done = _load_done(output_path)
    except OSError as e:
        raise BatchError(f"cannot read the output file {output_path}: {e}") from None
    summary = BatchSummary()
    try:
        to_run = 0
        for kind, _ in _plan(input_path, done):
            summary.lines += 1
            summary.skipped += kind == "skip"
            to_run += kind != "skip"
    except OSError as e:
        raise BatchError(f"cannot read the input file {input_path}: {e}") from None
    if summary.skipped:
        log.info("resuming: %d of %d lines are already in %s", summary.skipped, summary.lines,
                 output_path)
    if not to_run:
        log.info("nothing to run: every line of %s is in %s", input_path, output_path)
        return summary

    failed = threading.Event()
    failure: list[BaseException] = []

    def on_failure(e: BaseException) -> None:
        failure.append(e)
        failed.set()

    app = build_app(batch_config(config), factory=factory, on_engine_failure=on_failure)
    out: _Output | None = None
    bar: Any = None
    t0 = time.monotonic()

    def write(line: dict[str, Any]) -> None:
        assert out is not None and bar is not None
        out.write(line)
        if line["error"] is None:
            summary.succeeded += 1
            usage = line["response"]["body"].get("usage") or {}
            summary.output_tokens += int(usage.get("completion_tokens") or 0)
        else:
            summary.failed += 1
        elapsed = time.monotonic() - t0
        bar.set_postfix_str(f"{summary.output_tokens / elapsed if elapsed else 0.0:.1f} "
                            f"out tok/s, {summary.failed} errors", refresh=False)
        bar.update(1)

    async def run_one(req: _Request, slots: asyncio.Semaphore) -> None:
        try:
            payload = json.dumps(req.body).encode()
            try:
                status, answer = await call_app(app, req.url, payload)
            except Exception as e:  # a bug, not the line's fault: still one line, not the job
                log.exception("line %d (%s) failed in the server", req.line, req.custom_id)
                write(_error(req.custom_id, "internal_error", f"{type(e).__name__}: {e}",
                             req.line))
                return
        finally:
            slots.release()
        line = _result(req, status, answer)
        engine_gone = line["error"] is not None and (
            line["error"]["code"] == "engine_unavailable" or (failed.is_set() and status >= 500))
        if engine_gone:  # not the line's fault: left out, so that a rerun runs it
            return
        write(line)

    try:
        async with app.router.lifespan_context(app):
            await _wait_ready(app, failed)
            try:
                out = _Output(output_path)
            except OSError as e:
                raise BatchError(f"cannot write the output file {output_path}: {e}") from None
            bar = tqdm(total=to_run, unit="req", desc="run-batch", file=sys.stderr,
                       disable=not progress, dynamic_ncols=True, mininterval=0.5)
            t0 = time.monotonic()
            slots = asyncio.Semaphore(concurrency)
            tasks: set[asyncio.Task] = set()
            for kind, item in _plan(input_path, done):
                if failed.is_set():
                    break
                if isinstance(item, dict) and kind == "write":
                    write(item)
                elif isinstance(item, _Request) and kind == "run":
                    await slots.acquire()
                    task = asyncio.ensure_future(run_one(item, slots))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
    finally:
        if bar is not None:
            bar.close()
        if out is not None:
            out.close()
        summary.seconds = time.monotonic() - t0
    if failed.is_set():
        cause = failure[0] if failure else "unknown"
        raise BatchError(f"the engine failed: {cause}; {summary.succeeded + summary.failed} "
                         f"lines were written, rerun to resume", 1)
    return summary


# -- command line ----------------------------------------------------------------------------


def add_batch_parser(sub: argparse._SubParsersAction,
                     environ: Mapping[str, str] | None = None) -> None:
    """``ragserve run-batch``: the batch flags and every ``serve`` flag (``RAGSERVE_*``
    variables included, from ``environ``)."""
    p = sub.add_parser(
        "run-batch", help="run an OpenAI Batch API file (JSONL) offline",
        usage=f"{PROG} -i INPUT_FILE -o OUTPUT_FILE [--max-concurrency N] [serve flags]",
        description="Run an OpenAI Batch API input file through the model, offline "
        "(docs/run-batch.md). Takes the `ragserve serve` flags (also as RAGSERVE_* "
        "variables); --host, --port and --api-key mean nothing here, and requests wait for a "
        "sequence slot as long as they need (--max-queue-len and --max-queue-wait do not "
        "apply).")
    p.add_argument("-i", "--input-file", type=Path, required=True,
                   help="the batch input: one OpenAI batch request per line (JSONL)")
    p.add_argument("-o", "--output-file", type=Path, required=True,
                   help="the batch output (JSONL); lines already in it are not run again")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="lines in flight at once (default: 2 x --max-num-seqs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_serve_args(p)
    add_env_defaults(p, environ)
    p.set_defaults(func=cmd_run_batch)


def cmd_run_batch(args: argparse.Namespace) -> int:
    """``ragserve run-batch``: 0 when the job ran (per-line errors included), 1 when the model,
    the index or the engine failed, 2 for bad flags or files."""
    try:
        config = config_from_namespace(args)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        summary = asyncio.run(run_batch(config, args.input_file, args.output_file,
                                        args.max_concurrency, progress=not args.no_progress))
    except BatchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except ConfigError as e:  # what the engine cannot take (e.g. --vllm-arg keys)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output cannot be written (disk full, ...)
        print(f"{PROG}: error: {e}; the lines written so far are kept, rerun to resume",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the lines written so far are kept, rerun to resume",
              file=sys.stderr)
        return 130
    log.info("%d lines: %d skipped (already in %s), %d succeeded, %d failed; %d output tokens "
             "in %.1fs", summary.lines, summary.skipped, args.output_file, summary.succeeded,
             summary.failed, summary.output_tokens, summary.seconds)
    return 0
