"""The OpenAI-compatible backend over real HTTP, against a scripted server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, Field

from ehrflow.llm import LLMConfig, LLMError, LLMUnavailableError, OpenAICompatLLM, build_llm


class Vitals(BaseModel):
    heart_rate: int
    rhythm: Annotated[str, Field(max_length=20)]


@dataclass
class ScriptedServer:
    """Answers each POST with the next (status, body) from ``replies``; records what it got."""

    url: str = ""
    replies: deque[tuple[int, dict[str, Any]]] = field(default_factory=deque)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    hang: threading.Event | None = None
    """When set, the server accepts requests but answers only once the event fires."""


def completion(text: str, prompt_tokens: int = 11, completion_tokens: int = 4) -> tuple[int, dict[str, Any]]:
    body = {
        "id": "cmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }
    return 200, body


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    state = ScriptedServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            state.requests.append(json.loads(self.rfile.read(length)))
            state.headers.append(dict(self.headers))
            if state.hang is not None:
                state.hang.wait(10)
            status, body = state.replies.popleft() if state.replies else (500, {"error": "no scripted reply"})
            if self.path != "/v1/chat/completions":
                status, body = 404, {"error": f"unknown path {self.path}"}
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    if state.hang is not None:
        state.hang.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def make_llm(url: str, **overrides: Any) -> OpenAICompatLLM:
    config = LLMConfig(backend="openai", model="served-model", base_url=url, cache=False, **overrides)
    return OpenAICompatLLM(config)


def test_chat_sends_the_openai_shape_and_counts_tokens(server, monkeypatch):
    monkeypatch.setenv("EHRFLOW_LLM_API_KEY", "sk-test")
    server.replies.append(completion("Hello there.", 12, 3))
    llm = build_llm(backend="openai", model="served-model", base_url=server.url, cache=False, max_tokens=64)
    assert isinstance(llm, OpenAICompatLLM)
    result = llm.complete([{"role": "user", "content": "hi"}])
    assert result.text == "Hello there." and (result.prompt_tokens, result.completion_tokens) == (12, 3)
    (body,) = server.requests
    assert body["model"] == "served-model" and body["messages"] == [{"role": "user", "content": "hi"}]
    assert (body["temperature"], body["max_tokens"], body["seed"]) == (0.0, 64, 0)
    assert "response_format" not in body
    assert server.headers[0]["Authorization"] == "Bearer sk-test"
    assert llm.usage.calls == 1 and llm.usage.completion_tokens == 3


def test_structured_asks_for_json_schema(server):
    server.replies.append(completion('{"heart_rate": 88, "rhythm": "sinus"}'))
    llm = make_llm(server.url)
    assert llm.structured([{"role": "user", "content": "HR 88, sinus"}], Vitals) == Vitals(
        heart_rate=88, rhythm="sinus"
    )
    fmt = server.requests[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Vitals"
    assert fmt["json_schema"]["schema"]["properties"]["rhythm"]["maxLength"] == 20


def test_server_without_json_schema_falls_back_to_json_mode_and_remembers(server):
    server.replies.extend(
        [
            (400, {"error": {"message": "response_format.type json_schema is not supported"}}),
            completion('{"heart_rate": 70, "rhythm": "sinus"}'),
            completion('{"heart_rate": 71, "rhythm": "sinus"}'),
        ]
    )
    llm = make_llm(server.url)
    assert llm.structured([{"role": "user", "content": "a"}], Vitals).heart_rate == 70
    assert llm.format_mode == "json_object"
    assert llm.structured([{"role": "user", "content": "b"}], Vitals).heart_rate == 71
    kinds = [r["response_format"]["type"] for r in server.requests]
    assert kinds == ["json_schema", "json_object", "json_object"]


def test_request_rejected_in_every_format_is_an_error_not_a_silent_downgrade(server):
    server.replies.extend([(400, {"error": "max_tokens too large"})] * 3)
    llm = make_llm(server.url)
    with pytest.raises(LLMError, match="HTTP 400"):
        llm.structured([{"role": "user", "content": "a"}], Vitals)
    assert llm.format_mode == "json_schema" and len(server.requests) == 3
    assert "response_format" not in server.requests[-1]


def test_server_error_is_retried(server):
    server.replies.extend([(503, {"error": "loading"}), completion("ok")])
    assert make_llm(server.url, connect_retries=1).chat([{"role": "user", "content": "a"}]) == "ok"
    assert len(server.requests) == 2


def test_persistent_server_error_is_unavailable(server):
    server.replies.extend([(500, {"error": "boom"})] * 2)
    with pytest.raises(LLMUnavailableError, match="after 2 attempt"):
        make_llm(server.url, connect_retries=1).chat([{"role": "user", "content": "a"}])


def test_unauthorised_names_the_setting_not_the_key(server):
    server.replies.append((401, {"error": "bad key"}))
    llm = make_llm(server.url, api_key="sk-should-not-leak")
    with pytest.raises(LLMError, match="EHRFLOW_LLM_API_KEY") as info:
        llm.chat([{"role": "user", "content": "a"}])
    assert not isinstance(info.value, LLMUnavailableError)
    assert "sk-should-not-leak" not in str(info.value)


def test_unreachable_server_fails_fast_with_one_clear_error():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    llm = make_llm(f"http://127.0.0.1:{port}/v1", connect_retries=2)
    start = time.perf_counter()
    with pytest.raises(LLMUnavailableError, match=f"127.0.0.1:{port}.*after 3 attempt"):
        llm.chat([{"role": "user", "content": "hello"}])
    assert time.perf_counter() - start < 10


def test_server_that_never_answers_times_out(server):
    server.hang = threading.Event()
    llm = make_llm(server.url, timeout_s=0.5, connect_retries=3)
    start = time.perf_counter()
    with pytest.raises(LLMUnavailableError, match="no answer within"):
        llm.chat([{"role": "user", "content": "hello"}])
    assert time.perf_counter() - start < 5
    assert len(server.requests) == 1  # a read timeout is not retried


def test_malformed_response_is_an_error(server):
    server.replies.append((200, {"choices": []}))
    with pytest.raises(LLMError, match="choices"):
        make_llm(server.url).chat([{"role": "user", "content": "a"}])


def test_openai_backend_needs_a_model_name():
    with pytest.raises(ValueError, match="model"):
        build_llm(backend="openai", cache=False)
