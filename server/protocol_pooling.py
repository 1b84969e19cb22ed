"""Pooling endpoints' request and response models: OpenAI's ``/v1/embeddings`` (what
``client.embeddings.create`` sends and reads) and vLLM's ``/v1/rerank``, ``/v2/rerank``
(Jina's and Cohere's shape) and ``/v1/score`` (``vllm/entrypoints/pooling/score/protocol.py``).

Requests are strict as :mod:`server.protocol`'s: an unknown field is a 400 naming it. What the
schema cannot say (an empty text, a token id outside the vocabulary, a text over the encoder's
limit, more texts than ``--max-embedding-batch``) is a 400 from :mod:`server.serving_pooling`.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from server.protocol import Strict, Usage

TRUNCATE_DOC = ("vLLM's: -1 cuts each text to the encoder's limit, k >= 1 to its first k "
                "tokens (k at most the limit); absent: a text over the limit is a 400")
MAXSIM_DOC = ("ColBERT MaxSim divided by the number of query vectors: the mean, over the "
              "query's token vectors, of the best cosine with any of the document's; in -1..1")

# -- /v1/embeddings ------------------------------------------------------------------------


class EmbeddingRequest(Strict):
    model: str | None = Field(default=None, description="the served model's name or the "
                                                        "retriever encoder's")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, texts, or the encoder tokenizer's ids of one text (or of several) "
                    "without [CLS] and [SEP], which the server adds")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: the little-endian float32 bytes, as OpenAI's")
    dimensions: int | None = Field(default=None, ge=1,
                                   description="only the encoder's own size is served")
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1, description=TRUNCATE_DOC)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or their base64 (float32, "
                                                     "little-endian) with encoding_format base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = Field(description="tokens the encoder read, [CLS] and [SEP] included")
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# -- /v1/rerank, /v2/rerank ----------------------------------------------------------------


class RerankRequest(Strict):
    model: str | None = None
    query: str
    documents: list[str]
    top_n: int | None = Field(default=None, ge=0,
                              description="the best n results; 0 or absent: all")
    return_documents: bool = Field(default=True, description="each result's document text")
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1, description=TRUNCATE_DOC)


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="the document's position in the request")
    document: RerankDocument | None = Field(default=None,
                                            description="null with return_documents false")
    relevance_score: float = Field(description=MAXSIM_DOC)


class RerankUsage(BaseModel):
    prompt_tokens: int = Field(description="tokens the encoder read: the query's and each "
                                           "document's, markers included, each text once")
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult] = Field(description="best first")


# -- /v1/score -----------------------------------------------------------------------------


class ScoreRequest(Strict):
    """vLLM's pairing: one ``text_1`` against every ``text_2`` (1:1, 1:N), or ``text_1[i]``
    against ``text_2[i]`` (N:N)."""

    model: str | None = None
    text_1: str | list[str] = Field(description="the queries")
    text_2: str | list[str] = Field(description="the documents")
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1, description=TRUNCATE_DOC)


class ScoreData(BaseModel):
    index: int = Field(description="the pair's position")
    object: Literal["score"] = "score"
    score: float = Field(description=MAXSIM_DOC)


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreData]
    usage: Usage
