"""``ragserve`` command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from server.config import bucket_list

if TYPE_CHECKING:
    from server.engine import EngineConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face directory, .gguf file or Hub repo id "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto",
                   help="auto, float32, bfloat16 or float16 (auto: float32 on CPU, bf16 on CUDA)")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="auto (the model dtype) or a dtype")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "neuron"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--context-encoding-buckets", type=bucket_list, default=None,
                   help="prefill lengths, e.g. 128,256,512 (default: three per octave)")
    p.add_argument("--token-generation-buckets", type=bucket_list, default=None,
                   help="decode context lengths (default: powers of two up to max-model-len)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile one static graph per bucket (as on Neuron)")
    p.add_argument("--kernels", default="auto",
                   help="auto, or KEY=VALUE items: linear=packed|plain, "
                        "attention=matmul|sdpa|grouped, step=eager|compiled")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file")
    p.add_argument("--cache-dir", type=Path, default=None)


def engine_config(args: argparse.Namespace, **overrides: object) -> EngineConfig:
    from server.engine import EngineConfig

    template = Path(args.chat_template).read_text() if args.chat_template else None
    fields = dict(
        model=args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        context_encoding_buckets=args.context_encoding_buckets,
        token_generation_buckets=args.token_generation_buckets,
        compile=args.compile, kernels=args.kernels, chat_template=template,
        cache_dir=args.cache_dir,
    )
    fields.update(overrides)
    return EngineConfig(**fields)


def cmd_generate(args: argparse.Namespace) -> int:
    from scheduler import SamplingParams
    from server.engine import Engine

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    engine = Engine.from_config(engine_config(args, max_num_seqs=1, warmup=False))
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


def serve(argv: Sequence[str] | None = None) -> int:
    """``ragserve serve``: the OpenAI server (flags or RAGSERVE_* variables)."""
    import uvicorn

    from server.app import build_app
    from server.config import ConfigError, config_from_args

    try:
        config = config_from_args(argv)
    except ConfigError as e:
        print(f"ragserve serve: error: {e}", file=sys.stderr)
        return 2
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
        timeout_graceful_shutdown=config.shutdown_grace_seconds, access_log=False))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="the OpenAI-compatible HTTP server (see `ragserve serve -h`)",
                   add_help=False)
    sub.add_parser("run-batch", help="run an OpenAI Batch API file (JSONL) offline (see "
                                     "`ragserve run-batch -h`)", add_help=False)
    g = sub.add_parser("generate", help="stream a completion for one prompt")
    add_engine_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.set_defaults(func=cmd_generate)
    from retrieval.cli import add_index_parser
    from runtime.loader import default_cache_dir

    add_index_parser(sub, default_cache_dir())
    from runtime.neuron_cli import add_neuron_parser
    add_neuron_parser(sub)
    from server.buckets_cli import add_buckets_parser
    add_buckets_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    if argv[:1] == ["run-batch"]:
        from server.batch import main as run_batch

        return run_batch(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from runtime.backends.neuron import NeuronUnavailableError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError, NeuronUnavailableError) as e:
        print(f"ragserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
