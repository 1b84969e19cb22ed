"""Device backends behind one call: ``forward(input_ids, cache_ids, start_ids) -> logits``."""

from runtime.backends.base import Backend

__all__ = ["Backend"]
