"""The served model: its name and state (the checks every endpoint makes before it works),
/v1/models, /ready and /v1/buckets (its bucket lists and the lengths it has served)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from bucketing.planner import padding_ratio
from bucketing.sample import LengthSample
from engine.client import EngineClient, EngineState, ModelInfo
from server.config import ServerConfig
from server.errors import (
    LOADING_RETRY_SECONDS,
    APIError,
    engine_unavailable,
    model_loading,
    retry_after,
)
from server.metrics import LOADING_MODEL_NAME
from server.protocol import (
    BucketsResponse,
    LengthCounts,
    ModelCard,
    ModelList,
    PaddingRatios,
    PrefillTiming,
    ReadyResponse,
)
from server.rag import RAGService
from server.structured import StructuredChecker


class OpenAIServingModels:
    """The model one engine serves (either engine: see :mod:`engine.client`), under its
    served name, with the retriever next to it."""

    def __init__(self, engine: EngineClient, config: ServerConfig, rag: RAGService) -> None:
        self.engine = engine
        self.config = config
        self.rag = rag
        self.chat_template = config.chat_template_text()
        #: finished requests' lengths, for GET /v1/buckets (bucket planning)
        self.lengths = LengthSample()
        #: compiles structured-output constraints before they are queued (either engine)
        self.structured = StructuredChecker()

    @property
    def model_name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        info = self.engine.info
        return info.name if info is not None else LOADING_MODEL_NAME

    @property
    def info(self) -> ModelInfo:
        """The loaded model (call after :meth:`check_ready`)."""
        info = self.engine.info
        if info is None:  # ready implies loaded; a race with a failing engine lands here
            raise engine_unavailable()
        return info

    def check_ready(self) -> None:
        if self.engine.state == EngineState.READY:
            return
        if self.engine.state == EngineState.LOADING:
            raise model_loading()
        raise engine_unavailable(self.engine.error or "stopped")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist (this server serves "
                                f"`{self.model_name}`).", param="model", code="model_not_found")

    def admit(self, model: str | None) -> ModelInfo:
        """Ready and the right model name, or the error that says which is not."""
        self.check_ready()
        self.check_model(model)
        return self.info

    # -- routes --------------------------------------------------------------------------

    def show_available_models(self) -> ModelList:
        info = self.engine.info
        return ModelList(data=[ModelCard(
            id=self.model_name, root=info.name if info else None,
            max_model_len=info.max_model_len if info else None, engine=self.engine.name,
            retriever=self.rag.info())])

    def readiness(self) -> JSONResponse:
        """200 once the model (and the index, with --index) is ready; 503 before, with
        ``Retry-After`` while either is still loading."""
        engine, rag = self.engine, self.rag
        body = ReadyResponse(status=engine.state.value, engine=engine.name,
                             load_seconds=engine.load_seconds, error=engine.error,
                             retriever=rag.info())
        if engine.ready and rag.enabled and rag.state != "ready":
            body.status = "loading" if rag.state == "loading" else "failed"
            body.error = rag.error
        elif engine.ready and engine.info is not None:
            info = engine.info
            body.model = self.model_name
            body.context_encoding_buckets = list(info.context_encoding_buckets) or None
            body.token_generation_buckets = list(info.token_generation_buckets) or None
            return JSONResponse(body.model_dump(exclude_none=True))
        loading = body.status == "loading"
        if engine.state == EngineState.LOADING and engine.load_status is not None:  # Neuron
            body.status = "compiling" if engine.load_status == "compiling" else "loading"
            body.phase = engine.load_status
            body.progress = round(engine.load_progress or 0.0, 3)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503,
                            headers=retry_after(LOADING_RETRY_SECONDS if loading else None))

    def buckets(self) -> BucketsResponse:
        """The bucket lists, their padding on the lengths served so far, a uniform sample of
        those lengths and the mean time of one-prompt prefills per bucket."""
        info = self.engine.info
        ce = list(info.context_encoding_buckets) if info is not None else []
        tg = list(info.token_generation_buckets) if info is not None else []
        sample = self.lengths.to_json()
        prompts, contexts = sample["prompt_lengths"], sample["context_lengths"]

        def ratio(lengths: list[int], lists: list[int]) -> float | None:
            fit = [n for n in lengths if lists and n <= lists[-1]]
            return round(padding_ratio(fit, lists), 4) if fit else None

        return BucketsResponse(
            context_encoding_buckets=ce or None, token_generation_buckets=tg or None,
            max_model_len=info.max_model_len if info is not None else None,
            sample_size=LengthCounts(prompt=len(prompts), context=len(contexts)),
            seen=LengthCounts(**sample["seen"]),
            padding_ratio=PaddingRatios(context_encoding=ratio(prompts, ce),
                                        token_generation=ratio(contexts, tg)),
            prompt_lengths=prompts, context_lengths=contexts, device=self.config.device,
            prefill_seconds_by_bucket={b: PrefillTiming(**t) for b, t in
                                       self.engine.prefill_times.to_json().items()})
