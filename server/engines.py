"""The one place that names the engines: ``--engine`` -> an :class:`EngineClient`."""

from __future__ import annotations

from collections.abc import Callable

from server.config import ServerConfig
from server.engine import Engine
from server.engine_client import EngineClient, FailureCallback


def build_engine(config: ServerConfig, served_name: Callable[[], str],
                 on_failure: FailureCallback | None = None,
                 factory: Callable[[], Engine] | None = None) -> EngineClient:
    """The engine ``config.engine`` names, not started. ``served_name`` gives the ``model_name``
    metric label; ``factory`` replaces ragserve's model load (tests script the engine with it).
    Raises :class:`server.config.ConfigError` for settings the engine cannot take."""
    if config.engine == "vllm":
        from server.vllm_engine import VLLMEngine

        return VLLMEngine(config, on_failure=on_failure)
    return _ragserve_engine(config, served_name, on_failure, factory)


def _ragserve_engine(config: ServerConfig, served_name: Callable[[], str],
                     on_failure: FailureCallback | None,
                     factory: Callable[[], Engine] | None) -> EngineClient:
    from server.async_engine import AsyncEngine
    from server.metrics import EngineMetrics

    if factory is None and config.engine_process:
        from server.engine_process import ProcessEngine

        return ProcessEngine(config.engine_config(), observer=EngineMetrics(served_name),
                             on_failure=on_failure)

    def build() -> Engine:
        if factory is not None:
            return factory()
        return Engine.from_config(config.engine_config(), on_progress=client.report_load)

    client = AsyncEngine(build, observer=EngineMetrics(served_name), on_failure=on_failure)
    return client  # build() reads client: it runs later, on the engine thread
