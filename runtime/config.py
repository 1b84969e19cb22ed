"""ModelArgs: the Llama-family hyper-parameters ragserve's model is built from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.n_heads}) must be a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise NotImplementedError(
                f"rope_scaling type {self.rope_type!r} is not implemented "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """From a Hugging Face ``config.json`` of a Llama-architecture model."""
        model_type = cfg.get("model_type", "llama")
        if model_type != "llama":
            raise NotImplementedError(
                f"model_type {model_type!r} is not supported: ragserve runs Llama-architecture "
                "models (Llama 2/3/3.1/3.2, SmolLM2, ...)"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise NotImplementedError(f"{flag}=true is not supported by ragserve's Llama")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r} is not supported (Llama uses silu)")
        n_heads = cfg["num_attention_heads"]
        # transformers 5 writes one ``rope_parameters`` dict (rope_theta included); 4.x writes
        # ``rope_theta`` and ``rope_scaling`` (None for plain RoPE).
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            rope_factor=rope.get("factor", 1.0),
            rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
            rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
            rope_original_max_position=rope.get("original_max_position_embeddings", 8192),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    @property
    def num_parameters(self) -> int:
        d, hd = self.dim, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * d * self.intermediate_size
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * d) + emb + d
