"""One LLM protocol (chat messages in; text or a validated pydantic model out) and its backends:
``local`` (GGUF via llama.cpp), ``openai`` (any OpenAI-compatible server), ``vllm`` (in-process)."""

from ehrflow.llm.base import (
    LLM,
    BaseLLM,
    ChatMessage,
    Completion,
    LLMConfig,
    LLMContextError,
    LLMError,
    LLMOutputError,
    LLMUnavailableError,
    Usage,
)
from ehrflow.llm.cache import ResponseCache
from ehrflow.llm.factory import BACKENDS, build_llm
from ehrflow.llm.fake import FakeLLM
from ehrflow.llm.local import LocalLLM, default_model_path
from ehrflow.llm.openai_compat import OpenAICompatLLM
from ehrflow.llm.structured import json_schema_for, parse_output
from ehrflow.llm.vllm_engine import VLLMEngineLLM

__all__ = [
    "BACKENDS",
    "LLM",
    "BaseLLM",
    "ChatMessage",
    "Completion",
    "FakeLLM",
    "LLMConfig",
    "LLMContextError",
    "LLMError",
    "LLMOutputError",
    "LLMUnavailableError",
    "LocalLLM",
    "OpenAICompatLLM",
    "ResponseCache",
    "Usage",
    "VLLMEngineLLM",
    "build_llm",
    "default_model_path",
    "json_schema_for",
    "parse_output",
]
