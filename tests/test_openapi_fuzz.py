"""Schemathesis over the server's own /openapi.json: every operation, a bounded number of
generated requests each (its coverage phase's valid and invalid edge cases, then fuzzing),
against a real server (tiny model, an index for /v1/retrieve, the API key on). Every response
must be a non-5xx with a documented status code and Content-Type and conform to the documented
schema (SSE events included), and a request that the schema rules out must be refused.

Run through schemathesis's CLI, as a user would run it, in its deterministic mode; the hook
in tests/schemathesis_hooks.py caps generated ``max_tokens``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from serverutil import TESTS, start_subprocess, wait_ready

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "negative_data_rejection")
MAX_EXAMPLES = 25  # per operation and phase: ~1,800 requests, ~15 s here


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama_dir: Path, index_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    proc, url = start_subprocess([
        "--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--api-key", KEY,
        "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
        "--index", str(index_dir), "--kernels", "step=eager",
        "--responses-store-persist", "false",  # fuzzed responses: not in ~/.cache
        "--store-dir", str(log.parent / "store"), "--max-upload-bytes", "65536"], log)
    try:
        wait_ready(url, AUTH, proc=proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)
        print(log.read_text()[-3000:])


def test_every_operation_conforms_to_its_schema(fuzz_server: str, tmp_path: Path):
    env = dict(os.environ, SCHEMATHESIS_HOOKS="schemathesis_hooks", PYTHONPATH=os.pathsep.join(
        filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{fuzz_server}/openapi.json",
         "--header", f"Authorization: Bearer {KEY}", "--checks", ",".join(CHECKS),
         "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic",
         "--request-timeout", "60", "--workers", "1", "--no-color", "--warnings", "off",
         "--report", "junit", "--report-dir", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    summary = proc.stdout[-6000:]
    assert proc.returncode == 0, summary
    assert "Selected: 39/39" in summary and "Tested: 39" in summary, summary
    print(summary)
