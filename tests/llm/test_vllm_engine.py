"""The vLLM backend: a clear error without vLLM, and the documented call shape with a stand-in module.

vLLM cannot be installed on CPU machines; the stand-in records what the backend passes to
``LLM.chat`` / ``SamplingParams`` / ``StructuredOutputsParams`` so a typo or a wrong argument
name in the backend fails here. The real engine is exercised only on a GPU machine.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, Field

from ehrflow.llm import LLMConfig, LLMUnavailableError, VLLMEngineLLM, build_llm, vllm_engine


class Triage(BaseModel):
    level: int = Field(ge=1, le=5)
    reason: Annotated[str, Field(max_length=40)]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_gives_a_clear_error():
    with pytest.raises(LLMUnavailableError, match=r"ehrflow\[gpu\]"):
        build_llm(backend="vllm", model="some/model", cache=False)


@pytest.fixture
def stand_in_vllm(monkeypatch) -> dict[str, Any]:
    seen: dict[str, Any] = {"engines": []}

    class StructuredOutputsParams:
        def __init__(self, *, json: dict[str, Any] | None = None):
            self.json = json

    class SamplingParams:
        def __init__(self, *, temperature: float, max_tokens: int, seed: int, structured_outputs: Any = None):
            self.kwargs = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}
            self.structured_outputs = structured_outputs

    class LLM:
        def __init__(self, *, model: str, max_model_len: int, seed: int):
            seen["engines"].append({"model": model, "max_model_len": max_model_len, "seed": seed})

        def chat(self, messages: list[dict[str, str]], sampling_params: SamplingParams, use_tqdm: bool) -> list[Any]:
            seen["messages"], seen["params"] = messages, sampling_params
            choice = types.SimpleNamespace(text='{"level": 2, "reason": "chest pain"}', token_ids=[1, 2, 3, 4])
            return [types.SimpleNamespace(prompt_token_ids=list(range(9)), outputs=[choice])]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.StructuredOutputsParams = StructuredOutputsParams
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling)
    monkeypatch.setattr(vllm_engine, "_engines", {})  # no stand-in engine outlives the test
    return seen


def test_structured_call_uses_guided_json(stand_in_vllm):
    config = LLMConfig(backend="vllm", model="org/stand-in-model", cache=False, n_ctx=4096, seed=3)
    llm = build_llm(config)
    assert isinstance(llm, VLLMEngineLLM)
    assert llm.structured([{"role": "user", "content": "chest pain"}], Triage) == Triage(level=2, reason="chest pain")
    params = stand_in_vllm["params"]
    assert params.structured_outputs.json["properties"]["level"]["maximum"] == 5
    assert params.kwargs == {"temperature": 0.0, "max_tokens": 512, "seed": 3}
    assert stand_in_vllm["messages"][-1] == {"role": "user", "content": "chest pain"}
    assert (llm.usage.prompt_tokens, llm.usage.completion_tokens) == (9, 4)
    # The engine is built once per process and model.
    build_llm(config).chat([{"role": "user", "content": "again"}])
    assert stand_in_vllm["engines"] == [{"model": "org/stand-in-model", "max_model_len": 4096, "seed": 3}]
    assert stand_in_vllm["params"].structured_outputs is None
