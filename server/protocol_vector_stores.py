"""OpenAI's Files (``/v1/files``) and Vector Stores (``/v1/vector_stores``) APIs: request and
response models, in the shapes of the openai SDK's types (``openai.types.file_object``,
``openai.types.vector_store*``, ``openai.types.vector_stores.*``) so that ``client.files``,
``client.vector_stores``, ``.files.upload_and_poll`` and ``.file_batches`` read what the server
sends. Requests are strict (an unknown field is a 400 naming it).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from server.protocol import RETRIEVAL_MODE_DOC, RetrievalMode, Strict

# -- files ---------------------------------------------------------------------------------------

PURPOSES = ("assistants", "user_data")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# -- attributes, chunking, expiry --------------------------------------------------------------

Attributes = dict[str, str | float | bool]


def check_attributes(value: Attributes | None) -> Attributes | None:
    """OpenAI's limits: at most 16 keys of <= 64 characters, strings of <= 512."""
    if value is None:
        return None
    if len(value) > 16:
        raise ValueError("attributes may hold at most 16 keys")
    for k, v in value.items():
        if len(k) > 64:
            raise ValueError(f"attribute key {k[:20]!r}... is longer than 64 characters")
        if isinstance(v, str) and len(v) > 512:
            raise ValueError(f"attribute {k!r} is longer than 512 characters")
    return value


class StaticChunking(Strict):
    max_chunk_size_tokens: int = Field(ge=100, le=4096)
    chunk_overlap_tokens: int = Field(ge=0)


class StaticChunkingStrategy(Strict):
    type: Literal["static"]
    static: StaticChunking

    @field_validator("static")
    @classmethod
    def _overlap(cls, v: StaticChunking) -> StaticChunking:
        if v.chunk_overlap_tokens > v.max_chunk_size_tokens // 2:
            raise ValueError("chunk_overlap_tokens must not exceed half of "
                             "max_chunk_size_tokens")
        return v


class AutoChunkingStrategy(Strict):
    type: Literal["auto"]


ChunkingStrategy = Annotated[AutoChunkingStrategy | StaticChunkingStrategy,
                             Field(discriminator="type")]


class ExpiresAfter(Strict):
    anchor: Literal["last_active_at"]
    days: int = Field(ge=1, le=365)


class StaticChunkingOut(BaseModel):
    max_chunk_size_tokens: int
    chunk_overlap_tokens: int


class ChunkingOut(BaseModel):
    """What a store's file was chunked with (``auto`` is reported as the static values it
    means, as OpenAI does)."""

    type: Literal["static"] = "static"
    static: StaticChunkingOut


# -- vector stores -------------------------------------------------------------------------------


class FileCounts(BaseModel):
    in_progress: int = 0
    completed: int
    failed: int = 0
    cancelled: int = 0
    total: int


class VectorStore(BaseModel):
    id: str
    object: Literal["vector_store"] = "vector_store"
    created_at: int
    name: str
    status: Literal["expired", "in_progress", "completed"]
    usage_bytes: int
    file_counts: FileCounts
    last_active_at: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    expires_after: dict[str, Any] | None = None
    expires_at: int | None = None
    description: str | None = None


class VectorStoreList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VectorStore]
    first_id: str | None
    last_id: str | None
    has_more: bool = False


class VectorStoreDeleted(BaseModel):
    id: str
    object: Literal["vector_store.deleted"] = "vector_store.deleted"
    deleted: bool = True


def _metadata(v: dict[str, str] | None) -> dict[str, str] | None:
    if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512
                                             for k, x in v.items())):
        raise ValueError("metadata holds at most 16 keys of <= 64 characters, values of <= "
                         "512")
    return v


class VectorStoreCreateRequest(Strict):
    name: str = Field(default="", max_length=256)
    description: str | None = Field(default=None, max_length=512)
    file_ids: list[str] = Field(default_factory=list)
    chunking_strategy: ChunkingStrategy | None = None
    expires_after: ExpiresAfter | None = None
    metadata: dict[str, str] | None = None

    _check_metadata = field_validator("metadata")(_metadata)


class VectorStoreModifyRequest(Strict):
    name: str | None = Field(default=None, max_length=256)
    expires_after: ExpiresAfter | None = None
    metadata: dict[str, str] | None = None

    _check_metadata = field_validator("metadata")(_metadata)


class LastError(BaseModel):
    code: Literal["server_error", "unsupported_file", "invalid_file"]
    message: str


class VectorStoreFile(BaseModel):
    id: str
    object: Literal["vector_store.file"] = "vector_store.file"
    created_at: int
    vector_store_id: str
    status: Literal["in_progress", "completed", "cancelled", "failed"]
    usage_bytes: int
    last_error: LastError | None = None
    attributes: Attributes | None = None
    chunking_strategy: ChunkingOut | None = None


class VectorStoreFileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VectorStoreFile]
    first_id: str | None
    last_id: str | None
    has_more: bool = False


class VectorStoreFileDeleted(BaseModel):
    id: str
    object: Literal["vector_store.file.deleted"] = "vector_store.file.deleted"
    deleted: bool = True


class VectorStoreFileCreateRequest(Strict):
    file_id: str = Field(min_length=1)
    attributes: Attributes | None = None
    chunking_strategy: ChunkingStrategy | None = None

    _check = field_validator("attributes")(check_attributes)


class VectorStoreFileUpdateRequest(Strict):
    attributes: Attributes | None

    _check = field_validator("attributes")(check_attributes)


class BatchFile(Strict):
    file_id: str = Field(min_length=1)
    attributes: Attributes | None = None
    chunking_strategy: ChunkingStrategy | None = None

    _check = field_validator("attributes")(check_attributes)


class FileBatchCreateRequest(Strict):
    file_ids: list[str] | None = None
    files: list[BatchFile] | None = None
    attributes: Attributes | None = None
    chunking_strategy: ChunkingStrategy | None = None

    _check = field_validator("attributes")(check_attributes)


class VectorStoreFileBatch(BaseModel):
    id: str
    object: Literal["vector_store.files_batch"] = "vector_store.files_batch"
    created_at: int
    vector_store_id: str
    status: Literal["in_progress", "completed", "cancelled", "failed"]
    file_counts: FileCounts


# -- search --------------------------------------------------------------------------------------


class SearchRankingOptions(Strict):
    ranker: Literal["none", "auto", "default-2024-11-15"] | None = None
    score_threshold: float | None = Field(default=None, ge=0, le=1)


class VectorStoreSearchRequest(Strict):
    query: str | list[str] = Field(description="a query, or several (their passages merged)")
    max_num_results: int = Field(default=10, ge=1, le=50)
    rewrite_query: bool = Field(default=False, description="false only")
    filters: dict[str, Any] | None = Field(
        default=None, description="a comparison ({type: eq|ne|gt|gte|lt|lte|in|nin, key, "
                                  "value}) or compound ({type: and|or, filters}) filter on the "
                                  "files' attributes")
    ranking_options: SearchRankingOptions | None = Field(
        default=None, description="score_threshold: drop results scoring below it (scores are "
                                  "normalized to 0..1 per mode: see the search's docs)")
    retrieval: RetrievalMode | None = Field(default=None, description="ragserve extension: "
                                            + RETRIEVAL_MODE_DOC)


class SearchContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class VectorStoreSearchResult(BaseModel):
    file_id: str
    filename: str
    score: float
    attributes: dict[str, str | float | bool] = Field(default_factory=dict)
    content: list[SearchContent]


class VectorStoreSearchPage(BaseModel):
    object: Literal["vector_store.search_results.page"] = "vector_store.search_results.page"
    search_query: list[str]
    data: list[VectorStoreSearchResult]
    has_more: bool = False
    next_page: str | None = None
