"""POST /tokenize and /detokenize (vLLM's): the served model's tokenizer and chat template,
no engine request."""

from __future__ import annotations

from server.errors import bad_request
from server.preprocess import chat_prompt_ids
from server.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from server.serving_models import OpenAIServingModels


class OpenAIServingTokenization:
    def __init__(self, models: OpenAIServingModels) -> None:
        self.models = models

    def create_tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        info = self.models.admit(req.model)
        if req.messages is not None:
            chat = ChatCompletionRequest.model_construct(  # messages are validated already
                messages=req.messages, add_generation_prompt=req.add_generation_prompt,
                chat_template=None)
            ids = chat_prompt_ids(info.tokenizer, chat, self.models.chat_template)
        else:
            ids = info.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=info.max_model_len, tokens=ids)

    def create_detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        info = self.models.admit(req.model)
        bad = [t for t in req.tokens if not 0 <= t < info.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary "
                              f"(0..{info.vocab_size - 1})", "tokens")
        return DetokenizeResponse(prompt=info.tokenizer.decode(req.tokens))
