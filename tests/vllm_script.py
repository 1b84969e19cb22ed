"""A scripted model for vLLM: a logits processor that makes any model write a fixed answer.

The RAG tests need a model that writes citations; a tiny random model never does. With
ragserve's engine they script the backend; with vLLM's they load this class into the engine
(``--vllm-arg logits_processors='["vllm_script:ScriptedLogits"]'``, tests/ on PYTHONPATH).
Each request that joins the batch reads the token ids in the file ``$RAGSERVE_TEST_SCRIPT``
(a JSON list; missing or empty: the model runs unscripted) and is forced to emit them, then
<|eot_id|>. Everything else (vLLM's scheduler, sampler, detokenizer, our server) is real.
Written against vLLM's v1 ``LogitsProcessor`` interface (vllm/v1/sample/logits_processor/
interface.py, v0.32.0).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

EOT = 128009  # <|eot_id|>


def read_script() -> list[int]:
    path = os.environ.get("RAGSERVE_TEST_SCRIPT")
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return list(json.load(f))


class ScriptedLogits(LogitsProcessor):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[list[int], list[int]]] = {}  # batch row -> (script, output)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, _params, _prompt, output in batch_update.added:
            script = read_script()
            if script:
                self.rows[index] = (script, output)
            else:
                self.rows.pop(index, None)
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if direction == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (script, output) in self.rows.items():
            if index >= logits.shape[0]:
                continue
            j = len(output)
            logits[index] = float("-inf")
            logits[index, script[j] if j < len(script) else EOT] = 0.0
        return logits
