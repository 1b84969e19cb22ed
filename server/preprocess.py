"""OpenAI request -> prompt token ids and SamplingParams, or a 400 that names the problem.

Everything invalid stops here, before the queue: unknown or unsupported fields, prompts that do
not fit the model or the largest prefill graph, bad sampling values.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from engine.client import ModelInfo
from scheduler import RequestTooLongError, SamplingParams, StructuredOutput
from server.errors import APIError, bad_request
from server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    MessageToolCall,
)
from server.tools import check_tool_history

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


def message_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template sees them; only text content is supported."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.type if hasattr(part, "type") else part.get("type")
                if kind != "text":
                    raise bad_request(f"messages[{i}]: content of type {kind!r} is not "
                                      "supported (text only)", "messages")
                texts.append(part.text if hasattr(part, "text") else str(part.get("text", "")))
            content = "".join(texts)
        d: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls and m.role == "assistant":
            d["tool_calls"] = [_history_call(i, j, c) for j, c in enumerate(m.tool_calls)]
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    check_tool_history(out)
    return out


def _history_call(i: int, j: int, call: MessageToolCall) -> dict[str, Any]:
    """An earlier call as templates take it: ``arguments`` parsed (Hugging Face templates
    render them with ``tojson``)."""
    try:
        args = json.loads(call.function.arguments)
    except ValueError as e:
        raise bad_request(f"messages[{i}].tool_calls[{j}].function.arguments is not valid "
                          f"JSON: {e}", "messages") from None
    return {"id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": args}}


def chat_prompt_ids(tokenizer: Any, req: ChatCompletionRequest, default_template: str | None,
                    messages: list[dict[str, Any]] | None = None,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The chat prompt's token ids (``messages`` replaces the request's, e.g. with RAG;
    ``tools``: the functions the template shows the model, :mod:`server.tools`)."""
    template = req.chat_template or default_template or tokenizer.chat_template
    if template is None:
        raise bad_request("this model has no chat template: start the server with "
                          "--chat-template, or use /v1/completions", "messages")
    try:
        ids = tokenizer.apply_chat_template(
            message_dicts(req.messages) if messages is None else messages,
            chat_template=template, tokenize=True,
            add_generation_prompt=req.add_generation_prompt,
            **({"tools": tools} if tools else {}))
    except APIError:
        raise
    except Exception as e:  # a template that raises on these messages is the client's 400
        raise bad_request(f"chat template failed on these messages: {e}", "messages") from None
    if hasattr(ids, "get"):  # newer transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def completion_prompts(tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]]
                       ) -> list[list[int]]:
    """One token-id list per prompt (OpenAI allows a string, strings, ids or lists of ids)."""
    prompts = prompt_list(prompt)
    if not prompts:
        raise bad_request("prompt must not be empty", "prompt")
    vocab = len(tokenizer)
    out = []
    for p in prompts:
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise bad_request("prompt must contain at least one token", "prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                              "prompt")
        out.append(ids)
    return out


def prompt_list(prompt: str | list[str] | list[int] | list[list[int]]
                ) -> list[str | list[int]]:
    """The prompts of a completions request, one entry per prompt, as the client sent them.

    >>> prompt_list("hi"), prompt_list([1, 2]), prompt_list(["a", "b"])
    (['hi'], [[1, 2]], ['a', 'b'])
    """
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


def echo_texts(tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]]
               ) -> list[str]:
    """What ``echo`` returns for each prompt: a string exactly as sent (not the decoded ids,
    which would carry the BOS the server added), token ids decoded as they are."""
    return [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False)
            for p in prompt_list(prompt)]


def check_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """OpenAI fields ragserve cannot honour: a 400 saying so, never silently ignored."""
    if isinstance(req, ChatCompletionRequest):
        if req.tools and req.rag is not None:
            raise bad_request("tools cannot be combined with rag", "tools")
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    else:
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if req.best_of not in (None, 1, req.n):
            raise bad_request("best_of is not supported", "best_of")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo with logprobs is not supported (prompt logprobs are not "
                              "computed)", "echo")


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` (token ids as JSON object keys) as (id, bias) pairs, or a 400.

    >>> logit_bias({"15": -100, "7": 2.5}, 100)
    ((15, -100.0), (7, 2.5))
    """
    out = []
    for key, value in (bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise bad_request(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        if not 0 <= tok < vocab_size:
            raise bad_request(f"logit_bias token id {tok} is outside the vocabulary "
                              f"(0..{vocab_size - 1})", "logit_bias")
        out.append((tok, float(value)))
    return tuple(out)


def sampling_params(req: ChatCompletionRequest | CompletionRequest, prompt_len: int,
                    limits: ModelInfo, seed_offset: int = 0,
                    structured: StructuredOutput | None = None) -> SamplingParams:
    """SamplingParams for one choice; raises a 400 naming the field or the length limit.
    ``structured``: the output's constraint (checked by :mod:`server.structured`)."""
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    else:
        max_tokens = req.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        logprobs, max_param = req.logprobs, "max_tokens"
    try:
        max_tokens = limits.check_fits(prompt_len, max_tokens)
    except RequestTooLongError as e:
        prompt_param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        prompt_fits = e.prompt_len <= e.max_prompt_len and e.prompt_len < e.max_model_len
        raise bad_request(str(e), max_param if prompt_fits else prompt_param) from None
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            min_p=req.min_p or 0.0,
            seed=None if req.seed is None else req.seed + seed_offset,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop=tuple(stop),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            logit_bias=logit_bias(req.logit_bias, limits.vocab_size),
            structured=structured,
        )
    except ValueError as e:
        raise bad_request(str(e), str(e).split(" ", 1)[0]) from None
