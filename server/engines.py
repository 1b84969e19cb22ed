"""The one place that names the engines: ``--engine`` -> an :class:`EngineClient`."""

from __future__ import annotations

from collections.abc import Callable

from engine.client import EngineClient, FailureCallback
from engine.core import Engine, ProgressCallback
from server.config import ServerConfig


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
    from server.metrics import EngineMetrics

    observer = EngineMetrics(served_name)
    if factory is None and config.engine_process:
        from engine.process import ProcessEngine

        return ProcessEngine(config.engine_config(), observer=observer, on_failure=on_failure)
    from engine.thread import ThreadEngine

    def build(progress: ProgressCallback) -> Engine:
        if factory is not None:
            return factory()
        return Engine.from_config(config.engine_config(), on_progress=progress)

    return ThreadEngine(build, observer=observer, on_failure=on_failure)
