"""POST /v1/embeddings (OpenAI's), /v1/rerank, /v2/rerank and /v1/score (vLLM's) from the
in-process retriever encoder (:meth:`server.rag.RAGService.encoder`), all its work on the
retriever's thread (:meth:`server.rag.RAGService.run`), never on the event loop.

Embeddings are **mean pooling**: BERT's last hidden state over ``[CLS] text [SEP]``, averaged
over the attention mask, through the encoder's ``linear`` projection, L2-normalized
(``settings.dim`` floats). For the offline default encoder (all-MiniLM-L6-v2, identity
projection) that is exactly all-MiniLM-L6-v2's sentence embedding, what the model was trained
for; for a ColBERT checkpoint it is the normalized mean of its (unnormalized) token vectors, the
projection being linear. No ColBERT marker, no punctuation mask. Token-id input is the encoder
tokenizer's ids of a text without ``[CLS]``/``[SEP]``: the server adds them, so ids and their
text give the same vector.

Rerank and score are ColBERT **late interaction**: the query as ``encode_queries`` encodes it,
each document as ``encode_documents`` (the index's own encodings), scored by MaxSim divided by
the number of query vectors: the mean over the query's token vectors of the best cosine with
the document's, in -1..1, comparable across queries. Rerank and score share the rule.

Limits, each a 400 naming it: an empty text; a token id outside the vocabulary; more texts (or
documents, or pairs) than ``--max-embedding-batch``; a text longer than the encoder reads
(embeddings: ``max_position_embeddings`` less ``[CLS]``/``[SEP]``; queries and documents:
ColBERT's ``query_maxlen`` / ``doc_maxlen`` less ``[CLS]``, the marker and ``[SEP]``). Nothing
is truncated unless the request sets vLLM's ``truncate_prompt_tokens``: -1 cuts each text at
its limit (as an index build does), k >= 1 keeps a text's first k tokens.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from server.errors import APIError, bad_request
from server.protocol import Usage
from server.protocol_pooling import (
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
)
from server.rag import RAGService
from server.serving_models import OpenAIServingModels

if TYPE_CHECKING:
    import torch

    from retrieval.encoder import ColBERTEncoder

#: texts per forward pass of the embedding pooler (sorted by length: little padding)
POOL_BATCH = 32
#: ColBERT's additions to a text: [CLS], the [Q] / [D] marker, [SEP]
MARKERS = 3


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden: [B, T, D]`` over the positions where ``mask: [B, T]`` is 1.

    >>> import torch
    >>> h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    >>> mean_pool(h, torch.tensor([[1, 1, 0]])).tolist()
    [[2.0, 3.0]]
    """
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def mean_maxsim(query: torch.Tensor, doc: torch.Tensor) -> float:
    """MaxSim over the number of query vectors (zero rows, a batch's padding, not counted).

    >>> import torch
    >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> mean_maxsim(q, torch.tensor([[1.0, 0.0], [0.6, 0.8]]))  # (1 + .8) / 2
    0.9
    """
    from retrieval.maxsim import maxsim

    n = int((query.norm(dim=-1) > 0).sum())
    return round(maxsim(query, doc) / max(n, 1), 6)


def paired(text_1: str | list[str], text_2: str | list[str]) -> tuple[list[str], list[str]]:
    """vLLM's score pairing: one text_1 against each text_2 (1:1, 1:N) or text_1[i] against
    text_2[i] (N:N); anything else is a 400.

    >>> paired("q", ["a", "b"])
    (['q'], ['a', 'b'])
    """
    queries = [text_1] if isinstance(text_1, str) else text_1
    docs = [text_2] if isinstance(text_2, str) else text_2
    if not queries or not docs:
        raise bad_request("text_1 and text_2 need at least one text each",
                          "text_1" if not queries else "text_2")
    if len(queries) > 1 and len(queries) != len(docs):
        raise bad_request(f"text_1 has {len(queries)} texts and text_2 {len(docs)}: pairs are "
                          "1:1, 1:N or N:N", "text_2")
    return queries, docs


def names(param: str, value: str | list) -> list[str]:
    """How an error names each text of a field: ``query`` or ``documents[3]``."""
    return [param] if isinstance(value, str) else [f"{param}[{i}]" for i in range(len(value))]


def kept(n: int, limit: int, truncate: int | None, name: str, why: str) -> int:
    """How many of a text's ``n`` tokens the encoder reads: all within ``limit``; with
    ``truncate_prompt_tokens``, at most it (-1: the limit); a 400 for an empty text or, without
    truncation, one over the limit."""
    param = name.split("[")[0]
    if n == 0:
        raise bad_request(f"{name} is empty (no tokens)", param)
    if truncate is not None:
        return min(n, limit if truncate == -1 else truncate, limit)
    if n > limit:
        raise bad_request(f"{name} has {n} tokens, more than the {limit} this encoder reads "
                          f"({why}); shorten it, or set truncate_prompt_tokens (-1: cut at the "
                          "limit)", param)
    return n


def b64(vector: torch.Tensor) -> str:
    """OpenAI's ``encoding_format: base64``: the little-endian float32 bytes."""
    return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()


class ServingPooling:
    def __init__(self, models: OpenAIServingModels, rag: RAGService, max_batch: int) -> None:
        self.models = models
        self.rag = rag
        self.max_batch = max_batch

    # -- checks ------------------------------------------------------------------------------

    async def _encoder(self, model: str | None, count: int, param: str,
                       what: str) -> ColBERTEncoder:
        """The encoder, once the request's size and model name pass."""
        if count > self.max_batch:
            raise bad_request(f"{count} {what}, more than --max-embedding-batch "
                              f"({self.max_batch}) per request", param)
        from retrieval.encoder import EncoderError

        try:
            encoder = await self.rag.run(self.rag.encoder)
        except EncoderError as e:  # no --index and --retriever-model (or the default) unusable
            raise APIError(503, f"the retriever encoder is not available: {e}",
                           code="encoder_unavailable") from None
        if model not in (None, encoder.name, self.models.model_name):
            raise APIError(404, f"The model `{model}` does not exist (this server serves "
                                f"`{self.models.model_name}`, with the retriever encoder "
                                f"`{encoder.name}`).", param="model", code="model_not_found")
        return encoder

    @staticmethod
    def _check_truncate(truncate: int | None, limit: int) -> None:
        if truncate == 0:
            raise bad_request("truncate_prompt_tokens must be -1 (the encoder's limit) or at "
                              "least 1", "truncate_prompt_tokens")
        if truncate is not None and truncate > limit:
            raise bad_request(f"truncate_prompt_tokens ({truncate}) is more than the {limit} "
                              "tokens this encoder reads", "truncate_prompt_tokens")

    # -- /v1/embeddings ----------------------------------------------------------------------

    async def create_embedding(self, req: EmbeddingRequest) -> EmbeddingResponse:
        inputs = req.input
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]  # type: ignore[list-item]
        if not inputs:
            raise bad_request("input is empty", "input")
        encoder = await self._encoder(req.model, len(inputs), "input", "inputs")
        dim = encoder.settings.dim
        if req.dimensions is not None and req.dimensions != dim:
            raise bad_request(f"dimensions: this encoder's embeddings have {dim} dimensions, "
                              f"the only value `dimensions` may take", "dimensions")
        self._check_truncate(req.truncate_prompt_tokens, self._embedding_limit(encoder))
        vectors, tokens = await self.rag.run(self._embed, encoder, inputs,
                                             req.truncate_prompt_tokens)
        data = [Embedding(index=i, embedding=b64(v) if req.encoding_format == "base64"
                          else v.tolist()) for i, v in enumerate(vectors)]
        return EmbeddingResponse(data=data, model=encoder.name, usage=EmbeddingUsage(
            prompt_tokens=tokens, total_tokens=tokens))

    @staticmethod
    def _embedding_limit(encoder: ColBERTEncoder) -> int:
        return encoder.bert.config.max_position_embeddings - 2

    def _embed(self, encoder: ColBERTEncoder, inputs: Sequence[str | list[int]],
               truncate: int | None) -> tuple[torch.Tensor, int]:
        """``[len(inputs), dim]`` pooled vectors and the tokens read (on the retriever's
        thread)."""
        limit = self._embedding_limit(encoder)
        vocab = encoder.bert.config.vocab_size
        why = f"max_position_embeddings {limit + 2} less [CLS] and [SEP]"
        ids = []
        for i, item in enumerate(inputs):
            name = f"input[{i}]" if len(inputs) > 1 else "input"
            if isinstance(item, str):
                item = encoder.tokenizer(item, add_special_tokens=False)["input_ids"]
            elif any(not 0 <= t < vocab for t in item):
                bad = next(t for t in item if not 0 <= t < vocab)
                raise bad_request(f"{name}: token id {bad} is outside the encoder's vocabulary "
                                  f"(0..{vocab - 1})", "input")
            ids.append(item[:kept(len(item), limit, truncate, name, why)])
        return self._pool(encoder, ids), sum(len(x) + 2 for x in ids)

    @staticmethod
    def _pool(encoder: ColBERTEncoder, ids: list[list[int]]) -> torch.Tensor:
        import torch

        tok = encoder.tokenizer
        linear = encoder.linear.float()
        out = torch.empty(len(ids), linear.shape[0])
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for b in range(0, len(order), POOL_BATCH):
            idx = order[b:b + POOL_BATCH]
            batch = torch.full((len(idx), max(len(ids[i]) for i in idx) + 2), tok.pad_token_id)
            mask = torch.zeros_like(batch)
            for row, i in enumerate(idx):
                seq = [tok.cls_token_id, *ids[i], tok.sep_token_id]
                batch[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            with torch.inference_mode():
                hidden = encoder.bert(input_ids=batch, attention_mask=mask).last_hidden_state
                pooled = mean_pool(hidden.float(), mask) @ linear.T  # [B, dim]
                out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return out

    # -- /v1/rerank, /v2/rerank, /v1/score -----------------------------------------------------

    async def rerank(self, req: RerankRequest) -> RerankResponse:
        if not req.documents:
            raise bad_request("documents is empty", "documents")
        encoder = await self._encoder(req.model, len(req.documents), "documents", "documents")
        scores, tokens = await self.rag.run(
            self._late_interaction, encoder, [req.query], req.documents, ["query"],
            names("documents", req.documents), req.truncate_prompt_tokens)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        results = [RerankResult(index=i, relevance_score=scores[i], document=RerankDocument(
            text=req.documents[i]) if req.return_documents else None)
            for i in order[:req.top_n or None]]
        return RerankResponse(id=f"rerank-{uuid.uuid4().hex}", model=encoder.name,
                              usage=RerankUsage(prompt_tokens=tokens, total_tokens=tokens),
                              results=results)

    async def score(self, req: ScoreRequest) -> ScoreResponse:
        queries, docs = paired(req.text_1, req.text_2)
        encoder = await self._encoder(req.model, len(docs), "text_2", "pairs")
        scores, tokens = await self.rag.run(
            self._late_interaction, encoder, queries, docs, names("text_1", req.text_1),
            names("text_2", req.text_2), req.truncate_prompt_tokens)
        return ScoreResponse(id=f"score-{uuid.uuid4().hex}", model=encoder.name,
                             data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
                             usage=Usage(prompt_tokens=tokens, completion_tokens=0,
                                         total_tokens=tokens))

    def _late_interaction(self, encoder: ColBERTEncoder, queries: list[str], docs: list[str],
                          query_names: list[str], doc_names: list[str],
                          truncate: int | None) -> tuple[list[float], int]:
        """Each document's score against its query (the one query, or the i-th) and the tokens
        read, each text once (on the retriever's thread)."""
        s = encoder.settings
        q_limit, d_limit = s.query_maxlen - MARKERS, s.doc_maxlen - MARKERS
        self._check_truncate(truncate, max(q_limit, d_limit))
        queries, q_tokens = self._cut(encoder, queries, q_limit, truncate, query_names,
                                      f"query_maxlen {s.query_maxlen} less [CLS], [Q], [SEP]")
        docs, d_tokens = self._cut(encoder, docs, d_limit, truncate, doc_names,
                                   f"doc_maxlen {s.doc_maxlen} less [CLS], [D], [SEP]")
        q_vectors = encoder.encode_queries(queries)  # [Q, q, dim]
        d_vectors = encoder.encode_documents(docs)
        scores = [mean_maxsim(q_vectors[i if len(queries) > 1 else 0], d)
                  for i, d in enumerate(d_vectors)]
        return scores, q_tokens + d_tokens

    @staticmethod
    def _cut(encoder: ColBERTEncoder, texts: list[str], limit: int, truncate: int | None,
             text_names: list[str], why: str) -> tuple[list[str], int]:
        """The texts as the encoder will read them (cut after the tokens :func:`kept` keeps)
        and their tokens, markers included."""
        out, tokens = [], 0
        for text, name in zip(texts, text_names):
            enc = encoder.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            n = len(enc["input_ids"])
            keep = kept(n, limit, truncate, name, why)
            out.append(text if keep == n else text[:enc["offset_mapping"][keep - 1][1]])
            tokens += keep + MARKERS
        return out, tokens
