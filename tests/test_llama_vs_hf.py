"""ragserve's runtime + scheduler against Hugging Face ``LlamaForCausalLM`` (fp32, greedy).

A tiny random Llama 3.1-style model (GQA, ``llama3`` rope scaling, sharded safetensors) with the
real Llama 3 tokenizer and chat template.
"""

from pathlib import Path

import pytest
import torch
from helpers import LLAMA3_EOS, bf16_kernels, check_against_hf_bf16, llama3_tokenizer_model

from engine.core import Engine, EngineConfig
from scheduler import FinishReason, SamplingParams

CE_BUCKETS = (16, 32, 64, 128)
TG_BUCKETS = (32, 64, 128, 256)

TEXT = (
    "Continuous batching lets requests join and leave the running batch at every step. "
    "Static shapes mean one compiled graph per bucket, so prompts are padded to the smallest "
    "bucket that fits them and decode reads only as much of the KV cache as it needs. "
) * 8


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


#: Every selectable implementation runs the whole module (runtime.kernels): whichever this
#: machine would pick, each must stay token-identical to Hugging Face.
KERNELS = [
    "linear=packed,attention=matmul,step=eager",
    "linear=plain,attention=sdpa,step=eager",
    "prefill_linear=plain,decode_linear=packed,attention=grouped,step=compiled",
    "linear=plain,attention=matmul,step=compiled",
]


@pytest.fixture(scope="module", params=KERNELS)
def engine(tiny_llama_dir: Path, request) -> Engine:
    return Engine.from_config(EngineConfig(
        model=str(tiny_llama_dir), dtype="float32", max_model_len=256, max_num_seqs=4,
        context_encoding_buckets=CE_BUCKETS, token_generation_buckets=TG_BUCKETS,
        kernels=request.param,
    ))


@pytest.fixture(scope="module")
def hf_bf16(tiny_llama_dir: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("kernels", bf16_kernels(
    "prefill_linear=plain,decode_linear=packed,attention=grouped,step=compiled"))
def test_bf16_follows_hf_bf16(tiny_llama_dir: Path, hf_bf16, kernels: str):
    """Within bf16's rounding of HF's bf16 (helpers.BF16_TIE), not token for token: the random
    model's logits, wide against float32's rounding, tie exactly in bf16 at some steps."""
    engine = Engine.from_config(EngineConfig(
        model=str(tiny_llama_dir), dtype="bfloat16", max_model_len=256, max_num_seqs=4,
        context_encoding_buckets=CE_BUCKETS, token_generation_buckets=TG_BUCKETS,
        kernels=kernels))
    text_ids = engine.tokenizer.encode(TEXT, add_special_tokens=False)
    chat = [{"role": "user", "content": "Tell me about buckets."}]
    prompts = [engine.encode_prompt(chat, chat=True), [128000, *text_ids[:60]],
               [128000, *text_ids[7:12]]]
    outs = engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0,
                                                   ignore_eos=True, logprobs=5))
    check_against_hf_bf16(hf_bf16, prompts, outs)


def hf_greedy(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_chat_template_matches_metas_formatter(engine: Engine):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is a KV cache? Explain in één zin. 你好"}]
    meta = ChatFormat(Tokenizer(llama3_tokenizer_model())).encode_dialog_prompt(
        [RawMessage(role=m["role"], content=m["content"]) for m in messages])
    assert engine.encode_prompt(messages, chat=True) == meta.tokens


def test_eos_ids_come_from_generation_config(engine: Engine):
    assert engine.scheduler.eos_token_ids == set(LLAMA3_EOS)
    assert engine.tokenizer.convert_tokens_to_ids("<|eot_id|>") == 128009


def test_single_request_matches_hf(engine: Engine, hf_model):
    ids = engine.encode_prompt([{"role": "user", "content": "Tell me about buckets."}], chat=True)
    [out] = engine.generate([ids], greedy(40))  # crosses decode buckets 32 -> 64
    assert list(out.token_ids) == hf_greedy(hf_model, ids, 40)
    assert out.finish_reason == FinishReason.LENGTH
    assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_eight_requests_join_and_leave_mid_flight(engine: Engine, hf_model):
    text_ids = engine.tokenizer.encode(TEXT, add_special_tokens=False)
    # One prompt at each edge of every prefill bucket (exact fits included).
    lengths = [5, 16, 17, 32, 40, 64, 90, 128]
    max_tokens = [30, 12, 45, 20, 8, 50, 25, 40]
    prompts = [[128000, *text_ids[i * 7 : i * 7 + n - 1]] for i, n in enumerate(lengths)]
    arrivals = {0: [0, 1, 2], 3: [3], 5: [4, 5], 9: [6], 20: [7]}  # step -> requests joining

    tokens: dict[str, list[int]] = {}
    rid_of = {}
    phases = []
    max_running = 0
    step_no = 0
    while step_no <= max(arrivals) or engine.has_unfinished():
        for i in arrivals.get(step_no, []):
            rid_of[engine.add_request(prompts[i], greedy(max_tokens[i]))] = i
        if engine.has_unfinished():
            running_before = len(engine.scheduler.running)
            outs = engine.step()
            it = engine.scheduler.last_iteration
            phases.append((it.phase, it.bucket, running_before))
            max_running = max(max_running, len(engine.scheduler.running))
            for o in outs:
                tokens[o.request_id] = list(o.token_ids)
        step_no += 1

    assert len(tokens) == 8
    for rid, i in rid_of.items():
        assert tokens[rid] == hf_greedy(hf_model, prompts[i], max_tokens[i]), f"prompt {i}"
    prefill_lens = {int(b.split("x")[1][:-1]) for p, b, _ in phases if p != "decode"}
    decode_lens = {int(b.split("x")[1][:-1]) for p, b, _ in phases if p == "decode"}
    # a step's label is its longest prompt's bucket (exact shapes: nothing is padded to it)
    assert max(prefill_lens) == CE_BUCKETS[-1] and prefill_lens <= set(CE_BUCKETS)
    assert len(decode_lens) >= 3  # the decode context bucket changed as sequences grew
    assert max_running == 4  # the batch was full, so later requests had to wait for a slot
    # prompts joined mid-flight, inside the running requests' decode steps (mixed steps)
    assert any(p == "mixed" and running > 0 for p, _, running in phases)
    assert all(p != "prefill" or running == 0 for p, _, running in phases)


def test_stop_token_id_and_stop_string_end_to_end(engine: Engine, hf_model):
    ids = engine.encode_prompt("Buckets and slots", chat=False)
    ref = hf_greedy(hf_model, ids, 12)
    [out] = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0,
                                                   stop_token_ids=(ref[5],)))
    first = ref.index(ref[5])
    assert list(out.token_ids) == ref[: first + 1]
    assert (out.finish_reason, out.stop_reason) == (FinishReason.STOP, ref[5])

    full = engine.tokenizer.decode(ref, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    [out] = engine.generate([ids], SamplingParams(max_tokens=12, temperature=0, stop=(stop,)))
    assert out.finish_reason == FinishReason.STOP and out.stop_reason == stop
    assert out.text == full[: full.index(stop)]
    assert not engine.has_unfinished() and engine.scheduler.slots.num_free == 4


def test_logprobs_match_hf(engine: Engine, hf_model):
    ids = engine.encode_prompt("Logprobs please", chat=False)
    [out] = engine.generate([ids], SamplingParams(max_tokens=3, temperature=0, logprobs=5))
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids + list(out.token_ids[:2])])).logits[0, len(ids) - 1 :]
    ref = logits.log_softmax(-1)
    for t, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[t]
        assert lp.rank == 1
        assert lp.logprob == pytest.approx(ref[t, lp.token_id].item(), abs=1e-4)
        top_ids = [i for i, _ in lp.top]
        assert top_ids == ref[t].topk(5).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(ref[t].topk(5).values.tolist(), abs=1e-4)


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine: Engine):
    ids = engine.encode_prompt("Sample me", chat=False)
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234,
                       ignore_eos=True)
    [alone] = engine.generate([ids], p)
    others = [SamplingParams(max_tokens=20, temperature=0.8, seed=None, ignore_eos=True)] * 3
    crowd = engine.generate([ids, "a", "b c", "d e f"], [p, *others])
    assert crowd[0].token_ids == alone.token_ids
    [other_seed] = engine.generate([ids], SamplingParams(max_tokens=16, temperature=1.0,
                                                         seed=99, ignore_eos=True))
    assert other_seed.token_ids != alone.token_ids


def test_prompt_too_long_is_rejected_with_the_limit(engine: Engine):
    with pytest.raises(ValueError, match=r"prompt has 200 tokens; the largest prefill bucket is "
                                         r"128 tokens and max_model_len is 256"):
        engine.add_request(list(range(200)), greedy(4))
    assert not engine.has_unfinished()


def test_the_pinned_kernels_are_the_ones_that_ran(engine: Engine):
    from runtime.kernels import Kernels, parse_kernels

    backend = engine.runner.backend
    spec = KERNELS[[Kernels(**parse_kernels(k)) for k in KERNELS].index(backend.kernels)]
    assert backend.kernels == Kernels(**parse_kernels(spec))
    assert backend.step_settled.is_set() and not backend.step_pending
    assert (backend._decode_compiled is not None) == (backend.kernels.decode_step == "compiled")
    assert backend.graphs == {} and not backend.pads_to_buckets  # exact shapes, no bucket graphs
    if backend.kernels.decode_step == "compiled":  # the warm-up covered every decode shape
        with torch.inference_mode(), torch.compiler.set_stance("fail_on_recompile"):
            for rows, ctx in [(1, 2), (1, 255), (2, 33), (4, 256), (3, 100)]:
                backend._spare_decode(backend.compiled_decode, rows, ctx)
    linear = engine.runner.backend.model.layers[0].feed_forward.w13
    assert (linear.packed is not None) == ("packed" in spec)
    assert (linear.weight is not None) == ("plain" in spec)
