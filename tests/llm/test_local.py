"""The real local backend: SmolLM2-135M-Instruct (GGUF) through llama.cpp, on the CPU.

A 135M model's JSON is poor, so the structured test asserts the type contract: a validated
object or an ``LLMOutputError`` carrying the raw text, and real tokens spent either way.
"""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import BaseModel, Field

from ehrflow.llm import LLMConfig, LLMOutputError, LocalLLM, build_llm, default_model_path

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (extra 'local-llm')")


class Finding(BaseModel):
    name: Annotated[str, Field(max_length=20)]
    abnormal: bool


@pytest.fixture
def config(tmp_path) -> LLMConfig:
    # One thread: on a shared 2-core machine a second llama.cpp thread mostly waits at barriers.
    return LLMConfig(backend="local", cache=False, n_ctx=1024, n_threads=1, max_tokens=32)


def test_default_model_ships_in_the_wheel():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_plain_chat_completes_and_counts_tokens(config):
    llm = build_llm(config)
    assert isinstance(llm, LocalLLM)
    result = llm.complete([{"role": "user", "content": "Name one symptom of the flu."}], max_tokens=8)
    assert result.text.strip()
    assert result.prompt_tokens > 5 and 0 < result.completion_tokens <= 8
    assert llm.usage.completion_tokens == result.completion_tokens and llm.usage.wall_s > 0


def test_bounded_schema_gives_a_model_or_a_typed_failure(config):
    llm = LocalLLM(config.model_copy(update={"max_tokens": 40, "retries": 0}))
    messages = [{"role": "user", "content": "Potassium 6.1 mmol/L (reference 3.5-5.0). Report the finding."}]
    try:
        result = llm.structured(messages, Finding)
    except LLMOutputError as exc:
        assert exc.attempts == 1 and isinstance(exc.raw_text, str)
    else:
        assert isinstance(result, Finding) and len(result.name) <= 20
    assert llm.usage.calls == 1 and llm.usage.completion_tokens > 0


def test_model_is_loaded_once_per_process(config):
    first, second = LocalLLM(config), LocalLLM(config.model_copy(update={"temperature": 0.7}))
    assert first.llama is second.llama


def test_cached_answer_is_reused(config, tmp_path):
    cached = config.model_copy(update={"cache": True, "cache_path": tmp_path / "llm.sqlite"})
    first = LocalLLM(cached).complete([{"role": "user", "content": "Say hi."}], max_tokens=4)
    again = LocalLLM(cached)
    second = again.complete([{"role": "user", "content": "Say hi."}], max_tokens=4)
    assert second.cached and second.text == first.text and again.usage.calls == 0


def test_missing_model_file_is_named(config, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.gguf"):
        LocalLLM(config.model_copy(update={"model": str(tmp_path / "no-such.gguf")}))
