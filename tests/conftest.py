"""Shared fixtures. Nothing here touches the network."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from helpers import (
    FACTS,
    LLAMA3_CHAT_TEMPLATE,
    LLAMA31_ROPE,
    llama3_tokenizer_model,
    make_tiny_llama_dir,
)
from serverutil import ENGINES, TEST_DTYPE, TEST_DTYPES

# imported by vLLM's engine (make test-vllm) and by schemathesis's CLI, never by pytest
collect_ignore = ["vllm_script.py", "schemathesis_hooks.py"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Llama 3 tokenizer as a Hugging Face tokenizer directory, with its chat template."""
    from llama_models.llama3.tokenizer import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    out = tmp_path_factory.mktemp("llama3-tokenizer")
    meta = Tokenizer(llama3_tokenizer_model())
    convert_tiktoken_to_fast(meta.model, str(out))
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(out / "tokenizer.json"),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )
    tok.save_pretrained(str(out))
    return out



@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, llama3_tokenizer_dir: Path) -> Path:
    """Tiny random Llama 3.1-style model (llama3 rope scaling, GQA), sharded safetensors."""
    out = make_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"), llama3_tokenizer_dir,
                              rope_scaling=LLAMA31_ROPE)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    return out


@pytest.fixture(scope="session")
def tiny_colbert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random ColBERT checkpoint (HF_ColBERT layout, BERT uncased vocabulary)."""
    from helpers import make_tiny_colbert_dir

    return make_tiny_colbert_dir(tmp_path_factory.mktemp("tiny-colbert"))


@pytest.fixture(scope="session")
def tiny_colbert(tiny_colbert_dir: Path):
    from retrieval.encoder import ColBERTEncoder

    return ColBERTEncoder(tiny_colbert_dir, name="tiny-colbert", dtype="float32")


@pytest.fixture(scope="session")
def docs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """helpers.FACTS as files of three formats."""
    d = tmp_path_factory.mktemp("docs")
    for name, text in FACTS.items():
        (d / name).write_text(text)
    return d


@pytest.fixture(scope="session")
def index_dir(docs_dir: Path, tiny_colbert_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built by the real CLI: `ragserve index build DOCS --out INDEX --retriever-model CKPT`."""
    from server.cli import main

    out = tmp_path_factory.mktemp("index") / "idx"
    assert main(["index", "build", str(docs_dir), "--out", str(out), "--retriever-model",
                 str(tiny_colbert_dir), "--chunk-tokens", "64", "--chunk-overlap", "8"]) == 0
    return out


# -- engines: the server tests run against each engine in RAGSERVE_TEST_ENGINES ---------------
# (and in RAGSERVE_TEST_DTYPE: serverutil.engine_flags)


def pytest_configure(config: pytest.Config) -> None:
    # servers built without --store-dir (most tests) keep uploads out of the user's cache;
    # tests of files and vector stores give each server a store directory of its own
    if "RAGSERVE_STORE_DIR" not in os.environ:
        import tempfile

        os.environ["RAGSERVE_STORE_DIR"] = tempfile.mkdtemp(prefix="ragserve-test-store-")
    if TEST_DTYPE and TEST_DTYPE not in TEST_DTYPES:
        raise pytest.UsageError(f"RAGSERVE_TEST_DTYPE must be one of {', '.join(TEST_DTYPES)} "
                                f"(or unset), got {TEST_DTYPE!r}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test (or module fixture) that takes ``engine_name`` runs once per engine under test,
    with one server per module and engine."""
    if "engine_name" in metafunc.fixturenames:
        metafunc.parametrize("engine_name", ENGINES, scope="module")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that take ``engine_name`` get the ``engines`` marker (``make test-vllm`` selects them);
    ``vllm`` tests skip where vLLM is not installed."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    for item in items:
        if getattr(item, "callspec", None) and "engine_name" in item.callspec.params:
            item.add_marker("engines")
        if item.get_closest_marker("vllm") is not None and not has_vllm:
            item.add_marker(pytest.mark.skip(reason="needs vLLM (`make test-vllm` runs it)"))
