"""Structured output, retries, cache and token accounting, driven by the scripted FakeLLM."""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import BaseModel, Field, ValidationError

from ehrflow.llm import LLM, ChatMessage, FakeLLM, LLMConfig, LLMOutputError, ResponseCache
from ehrflow.llm.base import GenerationRequest
from ehrflow.llm.structured import extract_json, json_schema_for, unbounded_paths


class Lab(BaseModel):
    name: str = Field(max_length=40)
    value: float


class Extraction(BaseModel):
    diagnoses: list[Annotated[str, Field(max_length=60)]] = Field(default_factory=list, max_length=6)
    labs: list[Lab] = Field(default_factory=list, max_length=6)


class Loose(BaseModel):
    items: list[str]
    note: str


ASK = [{"role": "user", "content": "Extract diagnoses and labs: sepsis, potassium 6.1"}]
GOOD = '{"diagnoses": ["sepsis"], "labs": [{"name": "potassium", "value": 6.1}]}'


def test_fake_implements_the_protocol():
    assert isinstance(FakeLLM(), LLM)


def test_structured_parses_a_valid_answer_first_time():
    llm = FakeLLM([GOOD])
    result = llm.structured(ASK, Extraction)
    assert result == Extraction(diagnoses=["sepsis"], labs=[Lab(name="potassium", value=6.1)])
    (request,) = llm.requests
    assert request.json_schema == json_schema_for(Extraction)
    assert request.messages[0].role == "system" and '"maxItems":6' in request.messages[0].content


def test_structured_retries_with_the_error_named_then_succeeds():
    llm = FakeLLM(['{"diagnoses": "sepsis"}', GOOD])
    result = llm.structured(ASK, Extraction)
    assert result.labs[0].name == "potassium"
    assert len(llm.requests) == 2
    note = llm.requests[1].messages[-1]
    assert note.role == "user" and "diagnoses" in note.content and "rejected" in note.content
    # The retry resends the original conversation, not the bad answer.
    assert all(m.role != "assistant" for m in llm.requests[1].messages)


def test_structured_gives_up_with_the_raw_text_and_the_error():
    bad = ["not json at all", '{"diagnoses": ["a","b","c","d","e","f","g"]}', '{"labs": [{"name": "K"}]}']
    llm = FakeLLM(bad)
    with pytest.raises(LLMOutputError) as info:
        llm.structured(ASK, Extraction)
    err = info.value
    assert err.attempts == 3 and len(llm.requests) == 3
    assert err.raw_text == bad[-1]
    assert isinstance(err.error, ValidationError)
    assert "labs.0.value" in str(err)


def test_retries_are_configurable():
    llm = FakeLLM(["nope"], config=LLMConfig(cache=False, retries=0))
    with pytest.raises(LLMOutputError) as info:
        llm.structured(ASK, Extraction)
    assert info.value.attempts == 1 and isinstance(info.value.error, ValueError)


def test_output_error_message_does_not_quote_the_answer():
    secret = "Patient John Doe, MRN 123456"
    llm = FakeLLM([f'{{"diagnoses": [{{"x": "{secret}"}}]}}'], config=LLMConfig(cache=False, retries=0))
    with pytest.raises(LLMOutputError) as info:
        llm.structured(ASK, Extraction)
    assert secret in info.value.raw_text
    assert "John Doe" not in str(info.value)


def test_extract_json_tolerates_fences_and_chatter():
    assert extract_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('Sure! {"a": [1, 2]} hope this helps') == {"a": [1, 2]}
    with pytest.raises(ValueError, match="no JSON object"):
        extract_json("plain words")
    with pytest.raises(ValueError, match="not valid JSON"):
        extract_json('{"a": [1, 2')


def test_unbounded_arrays_and_strings_are_found():
    assert unbounded_paths(json_schema_for(Extraction)) == []
    loose = unbounded_paths(Loose.model_json_schema())
    assert "properties.items" in loose and "properties.note" in loose


def test_cache_hit_returns_the_same_answer_without_calling_the_backend(tmp_path):
    path = tmp_path / "cache.sqlite"
    first = FakeLLM([GOOD], cache_path=path)
    answer = first.structured(ASK, Extraction)
    second = FakeLLM([], cache_path=path)  # would raise if it reached the "model"
    assert second.structured(ASK, Extraction) == answer
    assert second.requests == [] and second.usage.cache_hits == 1
    assert second.usage.calls == 0 and second.usage.completion_tokens == 0


def test_cache_key_covers_model_params_and_schema(tmp_path):
    path = tmp_path / "cache.sqlite"
    llm = FakeLLM(["a", "b", "c", "d"], cache_path=path)
    llm.complete(ASK)
    llm.complete(ASK)
    llm.complete(ASK, max_tokens=7)
    llm.complete(ASK, json_schema={"type": "object"})
    FakeLLM(["e"], cache_path=path, model="other-model").complete(ASK)
    assert len(llm.requests) == 3 and llm.usage.cache_hits == 1
    assert len(ResponseCache(path)) == 4


def test_cache_marks_hits_and_keeps_token_counts(tmp_path):
    path = tmp_path / "cache.sqlite"
    fresh = FakeLLM(["one two three"], cache_path=path).complete(ASK)
    hit = FakeLLM([], cache_path=path).complete(ASK)
    assert not fresh.cached and hit.cached
    assert (hit.text, hit.prompt_tokens, hit.completion_tokens) == ("one two three", 7, 3)


def test_token_accounting_per_call_and_cumulative():
    llm = FakeLLM(["a b", "c d e"])
    first = llm.complete([{"role": "user", "content": "one two three"}])
    second = llm.complete([ChatMessage(role="system", content="s"), {"role": "user", "content": "x y"}])
    assert (first.prompt_tokens, first.completion_tokens) == (3, 2)
    assert (second.prompt_tokens, second.completion_tokens) == (3, 3)
    assert llm.usage.calls == 2
    assert (llm.usage.prompt_tokens, llm.usage.completion_tokens) == (6, 5)
    assert llm.usage.wall_s == pytest.approx(first.wall_s + second.wall_s)
    assert llm.usage.wall_s > 0 and llm.usage.completion_tokens_per_s > 0


def test_messages_are_validated():
    llm = FakeLLM(["x"])
    with pytest.raises(ValidationError):
        llm.chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="at least one message"):
        llm.chat([])


def test_api_key_never_appears_in_repr_or_dumps(monkeypatch):
    monkeypatch.setenv("EHRFLOW_LLM_API_KEY", "sk-very-secret")
    config = LLMConfig(backend="openai", model="m")
    assert config.api_key is not None and config.api_key.get_secret_value() == "sk-very-secret"
    assert "sk-very-secret" not in repr(config) + config.model_dump_json() + str(config.model_dump())


def test_fake_request_is_what_the_cache_keys_on():
    llm = FakeLLM(["x"])
    llm.chat(ASK, temperature=0.5)
    (request,) = llm.requests
    assert isinstance(request, GenerationRequest)
    assert (request.temperature, request.max_tokens, request.seed) == (0.5, 512, 0)
