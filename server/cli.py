"""``ragserve`` command line: one argparse subcommand per job.

``serve`` and ``run-batch`` take every ``ragserve serve`` flag, also as ``RAGSERVE_*``
variables; ``generate`` takes the model and device flags. All three get them from
:mod:`server.config`, where each flag is declared once. ``index`` is :mod:`retrieval.cli`'s,
``neuron plan`` :mod:`planning.neuron`'s and ``buckets plan`` :mod:`planning.buckets`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Mapping, Sequence

from server.batch import add_batch_parser, cmd_run_batch
from server.config import (
    ConfigError,
    ServerConfig,
    add_engine_args,
    add_env_defaults,
    add_serve_args,
    config_from_namespace,
)

DESCRIPTION = ("ragserve: a self-hosted LLM inference server with the OpenAI API, and its "
               "offline tools. `ragserve COMMAND -h` describes a command.")


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.core import Engine
    from scheduler import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    config = config_from_namespace(args).engine_config()
    engine = Engine.from_config(dataclasses.replace(config, max_num_seqs=1, warmup=False))
    t0 = time.perf_counter()
    first = None
    n = 0
    out = None
    for out in engine.stream(args.prompt, params, chat=not args.raw):
        if first is None:
            first = time.perf_counter() - t0
        n = len(out.token_ids)
        sys.stdout.write(out.delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    total = time.perf_counter() - t0
    reason = out.finish_reason.value if out and out.finish_reason else "none"
    logging.getLogger("ragserve").info(
        "%d tokens in %.2fs (first token %.2fs, %.1f tok/s), finish_reason=%s",
        n, total, first or 0.0, n / total if total else 0.0, reason)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``ragserve serve``: the OpenAI server (flags or RAGSERVE_* variables)."""
    try:
        config = config_from_namespace(args)
    except ConfigError as e:
        print(f"ragserve serve: error: {e}", file=sys.stderr)
        return 2
    return run_server(config)


def run_server(config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT: 0 after a clean drain, 1 when the engine or the index
    failed, 2 for settings the engine cannot take."""
    import uvicorn

    from server.app import build_app

    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    log = logging.getLogger("ragserve")
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_failure(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    try:
        app = build_app(config, on_engine_failure=on_failure)
    except ConfigError as e:  # what the engine cannot take (e.g. --vllm-arg keys)
        print(f"ragserve serve: error: {e}", file=sys.stderr)
        return 2
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level,
        timeout_graceful_shutdown=config.shutdown_grace_seconds,
        timeout_keep_alive=config.timeout_keep_alive, access_log=False))
    log.info("serving %s with the %s engine on http://%s:%d (model loads in the background; "
             "/ready says when)", config.model or "the embedded default model", config.engine,
             config.host, config.port)
    # uvicorn drains on SIGTERM (stops accepting, waits up to --shutdown-grace-seconds for
    # in-flight requests), then restores the previous handler and re-raises the signal. A drain
    # is a clean stop, so the handler it restores is a no-op and the process exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if failed:
        log.error("exiting: the engine or the index failed: %s", failed[0])
        return 1
    log.info("shut down cleanly")
    return 0


def add_serve_parser(sub: argparse._SubParsersAction,
                     environ: Mapping[str, str] | None = None) -> None:
    p = sub.add_parser(
        "serve", help="the OpenAI-compatible HTTP server", usage="%(prog)s [-h] [flags]",
        description="The OpenAI-compatible HTTP server. Every flag --foo-bar can also be set "
                    "with the variable RAGSERVE_FOO_BAR; a flag on the command line wins "
                    "(docs/configuration.md).")
    add_serve_args(p)
    add_env_defaults(p, environ)
    p.set_defaults(func=cmd_serve)


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a completion for one prompt",
                       description="Stream a completion for one prompt to stdout; timings go "
                                   "to stderr. Of the RAGSERVE_* variables it reads "
                                   "RAGSERVE_CACHE_DIR only.")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """Every subcommand; ``environ`` (default: the process's) gives the ``RAGSERVE_*``
    defaults of ``serve`` and ``run-batch``."""
    from planning.buckets import add_buckets_parser
    from planning.neuron import add_neuron_parser
    from retrieval.cli import add_index_parser
    from runtime.loader import default_cache_dir

    parser = argparse.ArgumentParser(prog="ragserve", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub, environ)
    add_batch_parser(sub, environ)
    add_generate_parser(sub)
    add_index_parser(sub, default_cache_dir())
    add_neuron_parser(sub)
    add_buckets_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func in (cmd_serve, cmd_run_batch):  # they set up logging and report their errors
        return args.func(args)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from runtime.backends.neuron import NeuronUnavailableError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError, NeuronUnavailableError,
            TimeoutError) as e:  # TimeoutError: another writer held an index's lock too long
        print(f"ragserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
