"""POST /v1/retrieve (ragserve's): the retriever's passages for a query, without generating."""

from __future__ import annotations

from server.protocol import RetrievedPassage, RetrieveRequest, RetrieveResponse
from server.rag import RAGService
from server.serving_models import OpenAIServingModels


class ServingRetrieval:
    def __init__(self, models: OpenAIServingModels, rag: RAGService) -> None:
        self.models = models
        self.rag = rag

    async def retrieve(self, req: RetrieveRequest) -> RetrieveResponse:
        if req.model is not None:
            self.models.check_model(req.model)
        hits = await self.rag.search(req.query, req.k, req.mode)
        return RetrieveResponse(model=self.rag.index.encoder.name, data=[
            RetrievedPassage(chunk_id=p.chunk_id, doc_id=p.doc_id, text=p.text, score=p.score,
                             scores=p.scores, source=p.source, page=p.page, start=p.start,
                             end=p.end)
            for p in hits])
