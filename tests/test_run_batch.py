"""``ragserve run-batch``: OpenAI batch files through the serving path, in-process, on the tiny
random Llama (ragserve's engine on a thread): every input line answered once with the batch
output shape, bad lines as error lines, RAG bodies, an engine error, and resume."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import POISON, PoisonRunner
from serverutil import ROOT, engine_flags

from engine.core import Engine, EngineConfig
from server.batch import BatchError, BatchSummary, run_batch
from server.cli import main
from server.config import ServerConfig

MODEL = "tiny"
MSG = [{"role": "user", "content": "Tell me about buckets."}]
TINY_FLAGS = ["--served-model-name", MODEL, "--dtype", "float32", "--max-model-len", "256",
              "--max-num-seqs", "2", "--context-encoding-buckets", "16,32,64,128",
              "--token-generation-buckets", "32,64,128,256", "--kernels", "step=eager",
              "--engine-process", "false"]


def tiny_config(model: Path, **kw: object) -> ServerConfig:
    fields: dict = dict(model=str(model), served_model_name=MODEL, dtype="float32",
                        max_model_len=256, max_num_seqs=2, kernels="step=eager",
                        context_encoding_buckets=(16, 32, 64, 128),
                        token_generation_buckets=(32, 64, 128, 256), engine_process=False)
    fields.update(kw)
    return ServerConfig(**fields)


def chat(custom_id: str, **body: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": MSG, "max_tokens": 5, "temperature": 0,
                     "ignore_eos": True, **body}}


def completion(custom_id: str, **body: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "Buckets are", "max_tokens": 4,
                     "temperature": 0, "ignore_eos": True, **body}}


def write_input(path: Path, lines: list[dict | str]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n"
                            for x in lines))
    return path


def read_output(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def check_shape(line: dict) -> None:
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert line["id"].startswith("batch_req_")
    if line["response"] is not None:
        assert set(line["response"]) == {"status_code", "request_id", "body"}
    if line["error"] is None:
        assert line["response"]["status_code"] == 200
    else:
        assert {"code", "message", "line"} <= set(line["error"])
        assert isinstance(line["error"]["message"], str) and line["error"]["message"]


def test_mixed_input_every_line_answered(tiny_llama_dir: Path, index_dir: Path,
                                         tmp_path: Path):
    rag_question = [{"role": "user", "content": "What is the capital of Zorvania?"}]
    inp = write_input(tmp_path / "in.jsonl", [
        chat("chat-1"),
        completion("cmpl-1"),
        '{"custom_id": "broken", "method": "POST", "url": ',  # line 3: not JSON
        "",  # blank lines are skipped
        {**completion("wrong-url"), "url": "/v1/embeddings"},
        {**chat("wrong-method"), "method": "GET"},
        chat("negative", max_tokens=-1),
        chat("streamed", stream=True),
        chat("chat-1", max_tokens=3),  # line 9: duplicate custom_id
        chat("other-model", model="no-such-model"),
        chat("rag", messages=rag_question, max_tokens=8, rag={"top_k": 2}),
        completion("cmpl-n2", n=2, prompt=["a", "b"]),
    ])
    out = tmp_path / "out.jsonl"
    config = tiny_config(tiny_llama_dir, index=index_dir, max_model_len=512,
                         context_encoding_buckets=(128, 256, 384),
                         token_generation_buckets=(512,), rag_answer_tokens=16)
    summary = asyncio.run(run_batch(config, inp, out, max_concurrency=3, progress=False))
    lines = read_output(out)
    for line in lines:
        check_shape(line)
    assert summary == BatchSummary(lines=11, skipped=0, succeeded=4, failed=7,
                                   output_tokens=summary.output_tokens,
                                   seconds=summary.seconds)
    assert len(lines) == 11
    by_id: dict[str | None, list[dict]] = {}
    for line in lines:
        by_id.setdefault(line["custom_id"], []).append(line)

    ok = by_id["chat-1"][0] if by_id["chat-1"][0]["error"] is None else by_id["chat-1"][1]
    body = ok["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["usage"]["completion_tokens"] == 5
    assert ok["response"]["request_id"] == body["id"] and body["id"].startswith("chatcmpl-")
    dup = next(x for x in by_id["chat-1"] if x is not ok)
    assert dup["error"]["code"] == "duplicate_custom_id" and dup["error"]["line"] == 9
    assert dup["response"] is None

    cmpl = by_id["cmpl-1"][0]["response"]["body"]
    assert cmpl["object"] == "text_completion" and cmpl["usage"]["completion_tokens"] == 4
    assert len(by_id["cmpl-n2"][0]["response"]["body"]["choices"]) == 4
    assert summary.output_tokens == 5 + 4 + 4 * 4 + body_tokens(by_id["rag"][0])

    broken = by_id[None]
    assert len(broken) == 1 and broken[0]["error"]["code"] == "invalid_json_line"
    assert broken[0]["error"]["line"] == 3 and broken[0]["response"] is None
    assert by_id["wrong-url"][0]["error"]["code"] == "invalid_url"
    assert by_id["wrong-method"][0]["error"]["code"] == "invalid_method"
    assert by_id["streamed"][0]["error"]["code"] == "stream_not_supported"

    negative = by_id["negative"][0]  # the server's own validation, as `serve` answers it
    assert negative["response"]["status_code"] == 400
    assert negative["response"]["body"]["error"]["param"] == "max_tokens"
    assert negative["error"]["code"] == "invalid_request_error"
    assert "max_tokens" in negative["error"]["message"] and negative["error"]["line"] == 7
    other = by_id["other-model"][0]
    assert other["response"]["status_code"] == 404 and other["error"]["code"] == "model_not_found"

    rag = by_id["rag"][0]
    assert rag["error"] is None, rag
    rag_body = rag["response"]["body"]
    assert rag_body["sources"] and rag_body["sources"][0]["doc_id"] == "zorvania.txt"
    assert "grounding" in rag_body


def body_tokens(line: dict) -> int:
    return line["response"]["body"]["usage"]["completion_tokens"]


def test_resume_runs_only_the_missing_lines(tiny_llama_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture):
    lines: list[dict | str] = [chat(f"c{i}", max_tokens=3 + i % 3) for i in range(6)]
    lines += [completion(f"p{i}") for i in range(4)]
    lines += ["not json", chat("c0"), {**chat("get"), "method": "GET"}]
    inp = write_input(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    argv = ["run-batch", "-i", str(inp), "-o", str(out), "--model", str(tiny_llama_dir),
            "--max-concurrency", "3", *TINY_FLAGS]
    assert main(argv) == 0
    first = read_output(out)
    assert len(first) == 13
    assert "run-batch" in capsys.readouterr().err  # the progress bar, on stderr

    # keep 4 complete lines and half of the fifth (a job killed mid-write)
    raw = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(raw[:4]) + raw[4][: len(raw[4]) // 2])
    kept = [json.loads(x) for x in raw[:4]]
    assert main(argv) == 0
    final = read_output(out)
    assert final[:4] == kept  # untouched; the cut line is gone
    for line in final:
        check_shape(line)
    new = final[4:]
    kept_keys = {(x["custom_id"], x["error"] and x["error"]["code"]) for x in kept}
    assert not kept_keys & {(x["custom_id"], x["error"] and x["error"]["code"]) for x in new}
    assert len(final) == 13

    ids = [x["custom_id"] for x in final]
    assert sorted(i for i in ids if i is not None) == sorted(
        [f"c{i}" for i in range(6)] + [f"p{i}" for i in range(4)] + ["c0", "get"])
    assert ids.count(None) == 1  # the unreadable line, answered once
    c0 = [x for x in final if x["custom_id"] == "c0"]
    assert sorted(str(x["error"] and x["error"]["code"]) for x in c0) == [
        "None", "duplicate_custom_id"]
    assert all(x["error"] is None for x in final
               if x["custom_id"] and x["custom_id"][0] in "cp"
               and (x["error"] or {}).get("code") != "duplicate_custom_id")

    # a third run has nothing left to do (and loads no model)
    before = out.read_bytes()
    summary = asyncio.run(run_batch(tiny_config(tiny_llama_dir), inp, out, progress=False))
    assert summary.skipped == 13 and summary.succeeded == summary.failed == 0
    assert out.read_bytes() == before


def test_greedy_results_match_and_do_not_depend_on_concurrency(tiny_llama_dir: Path,
                                                               tmp_path: Path):
    inp = write_input(tmp_path / "in.jsonl", [chat(f"c{i}", max_tokens=6) for i in range(5)])
    texts = []
    for c in (1, 4):
        out = tmp_path / f"out{c}.jsonl"
        asyncio.run(run_batch(tiny_config(tiny_llama_dir), inp, out, max_concurrency=c,
                              progress=False))
        texts.append({x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"]
                      for x in read_output(out)})
    assert texts[0] == texts[1] and len(set(texts[0].values())) == 1


def test_an_engine_error_is_one_error_line(tiny_llama_dir: Path, tmp_path: Path):
    def factory() -> Engine:
        engine = Engine.from_config(EngineConfig(
            model=str(tiny_llama_dir), dtype="float32", max_model_len=256, max_num_seqs=2,
            context_encoding_buckets=(16, 32, 64, 128), warmup=False,
            token_generation_buckets=(32, 64, 128, 256), kernels="step=eager"))
        engine.runner = PoisonRunner(engine.runner)
        return engine

    inp = write_input(tmp_path / "in.jsonl", [
        completion("before"), completion("poison", prompt=[5, POISON, 6]),
        # a lone surrogate (valid JSON, not valid Unicode) in the id and the prompt: the line
        # gets an answer whatever the server makes of it, and the output stays valid JSON
        completion("s\ud800", prompt="a \ud800 b"),
        completion("after")])
    out = tmp_path / "out.jsonl"
    summary = asyncio.run(run_batch(tiny_config(tiny_llama_dir), inp, out, max_concurrency=1,
                                    factory=factory, progress=False))
    assert summary.succeeded + summary.failed == 4 and summary.succeeded >= 2
    by_id = {x["custom_id"]: x for x in read_output(out)}
    assert set(by_id) == {"before", "poison", "s\ud800", "after"}
    assert by_id["poison"]["response"]["status_code"] == 500
    assert by_id["poison"]["error"]["code"] == "engine_step_failed"
    assert by_id["before"]["error"] is None and by_id["after"]["error"] is None


def test_job_level_failures(tiny_llama_dir: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture):
    out = tmp_path / "out.jsonl"
    assert main(["run-batch", "-i", str(tmp_path / "missing.jsonl"), "-o", str(out),
                 *TINY_FLAGS]) == 2
    assert "cannot read the input file" in capsys.readouterr().err
    inp = write_input(tmp_path / "in.jsonl", [completion("a")])
    # a model that cannot load: exit 1, nothing written
    assert main(["run-batch", "-i", str(inp), "-o", str(out), "--model", str(tmp_path),
                 *TINY_FLAGS]) == 1
    assert "failed to load" in capsys.readouterr().err and not out.exists()
    # an output file that is not a batch output is never appended to
    out.write_text("hello\n")
    with pytest.raises(BatchError, match="not a run-batch output line"):
        asyncio.run(run_batch(tiny_config(tiny_llama_dir), inp, out, progress=False))
    assert out.read_text() == "hello\n"
    assert main(["run-batch", "-i", str(inp), "-o", str(out), "--max-num-seqs", "0"]) == 2
    assert main(["run-batch", "-i", str(inp), "-o", str(tmp_path / "new.jsonl"),
                 "--max-concurrency", "0", *TINY_FLAGS]) == 2
    assert "--max-concurrency must be >= 1" in capsys.readouterr().err


def test_cli_in_a_process_of_its_own(engine_name: str, tiny_llama_dir: Path, tmp_path: Path):
    """``python -m server.cli run-batch`` with the engine's default settings (ragserve's engine
    in its own process; ``make test-vllm``: vLLM's engine)."""
    inp = write_input(tmp_path / "in.jsonl", [chat("a"), completion("b"),
                                              chat("bad", max_tokens=-1)])
    out = tmp_path / "out.jsonl"
    buckets = ["--context-encoding-buckets", "16,32,64,128", "--token-generation-buckets",
               "32,64,128,256"] if engine_name == "ragserve" else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_HOST_IP="127.0.0.1")
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "run-batch", "-i", str(inp), "-o", str(out),
         "--model", str(tiny_llama_dir), "--served-model-name", MODEL, "--dtype", "float32",
         "--max-model-len", "256", "--max-num-seqs", "2", *buckets,
         *engine_flags(engine_name)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_id = {x["custom_id"]: x for x in read_output(out)}
    assert set(by_id) == {"a", "b", "bad"}
    for line in by_id.values():
        check_shape(line)
    assert by_id["a"]["response"]["body"]["usage"]["completion_tokens"] == 5
    assert by_id["b"]["response"]["body"]["usage"]["completion_tokens"] == 4
    assert by_id["bad"]["response"]["status_code"] == 400
    assert "2 succeeded, 1 failed" in proc.stderr
