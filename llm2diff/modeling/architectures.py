"""Which stock Hugging Face causal LMs llm2diff drives (with masks, positions and caches only: no modeling copies)."""

from __future__ import annotations

SUPPORTED_MODEL_TYPES = {
    "llama": "Llama / Llama 2 / Llama 3 / SmolLM2 (LlamaForCausalLM)",
    "qwen2": "Qwen2 / Qwen2.5 (Qwen2ForCausalLM)",
    "qwen3": "Qwen3 (Qwen3ForCausalLM)",
}


def check_supported(model) -> str:
    """Return the model type, or raise a ValueError listing the supported families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        listed = "; ".join(f"{k}: {v}" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise ValueError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}). llm2diff supports stock causal LMs "
            f"of these families: {listed}."
        )
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
        raise ValueError(
            "sliding-window attention is enabled in this config; block-diffusion masks need full attention. "
            "Set use_sliding_window=False."
        )
    return model_type
