"""``build_llm(config)``: the one place that maps a backend name to its class.

Backend modules import their heavy dependencies (llama-cpp, vLLM) only when an instance is
built, so this registry is cheap to import.
"""

from __future__ import annotations

from typing import Any

from ehrflow.llm.base import BaseLLM, LLMConfig
from ehrflow.llm.local import LocalLLM
from ehrflow.llm.openai_compat import OpenAICompatLLM
from ehrflow.llm.vllm_engine import VLLMEngineLLM

BACKENDS: dict[str, type[BaseLLM]] = {
    "local": LocalLLM,
    "openai": OpenAICompatLLM,
    "vllm": VLLMEngineLLM,
}


def build_llm(config: LLMConfig | None = None, **overrides: Any) -> BaseLLM:
    """Build the configured backend; ``overrides`` replace config fields (``build_llm(backend="openai", ...)``)."""
    base = config or LLMConfig()
    config = LLMConfig.model_validate({**base.model_dump(), **overrides}) if overrides else base
    return BACKENDS[config.backend](config)
