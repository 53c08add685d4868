"""Any OpenAI-compatible chat-completions server over HTTP: vLLM, Ray Serve LLM, hosted providers.

Failure is fast and single: a server that cannot be reached gives one ``LLMUnavailableError``
after ``connect_retries`` short retries (connect timeout ``connect_timeout_s``), never a hang.
Structured output asks for ``response_format: json_schema`` first; a server that rejects it
(HTTP 400/422) is asked for plain JSON mode, then for no response format at all. The step that
worked is remembered per instance; validation in ``structured.py`` applies in every case.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx

from ehrflow.llm.base import BaseLLM, GenerationRequest, LLMConfig, LLMError, LLMUnavailableError, RawCompletion

log = logging.getLogger(__name__)

_FORMAT_MODES = ("json_schema", "json_object", "none")
_BACKOFF_S = 0.5


class _FormatRejected(LLMError):
    """The server answered 400/422: the request shape (often ``response_format``) is not accepted."""


class OpenAICompatLLM(BaseLLM):
    backend = "openai"

    def __init__(self, config: LLMConfig, *, transport: httpx.BaseTransport | None = None):
        if not config.model:
            raise ValueError("LLMConfig.model: the openai backend needs the served model name")
        super().__init__(config)
        headers = {"Authorization": f"Bearer {config.api_key.get_secret_value()}"} if config.api_key else {}
        self._client = httpx.Client(
            base_url=config.base_url.rstrip("/"),
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            headers=headers,
            transport=transport,
        )
        self._format_mode = _FORMAT_MODES[0]

    @property
    def model_id(self) -> str:
        return str(self.config.model)

    @property
    def format_mode(self) -> str:
        """How structured output is requested from this server now (after any fallback)."""
        return self._format_mode

    def close(self) -> None:
        self._client.close()

    def _generate(self, request: GenerationRequest) -> RawCompletion:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": [m.model_dump() for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "seed": request.seed,
        }
        if request.json_schema is None:
            return _parse_response(self._post(body), self.config.base_url)
        start = _FORMAT_MODES.index(self._format_mode)
        rejected: _FormatRejected | None = None
        for mode in _FORMAT_MODES[start:]:
            try:
                data = self._post({**body, **_response_format(mode, request.json_schema)})
            except _FormatRejected as exc:
                rejected = exc
                continue
            if mode != self._format_mode:
                log.info("%s rejects response_format=%s; using %s", self.config.base_url, self._format_mode, mode)
                self._format_mode = mode
            return _parse_response(data, self.config.base_url)
        # Rejected even without a response format: the request itself is wrong, not the format.
        assert rejected is not None
        raise LLMError(str(rejected)) from rejected

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.config.base_url.rstrip('/')}/chat/completions"
        attempts = self.config.connect_retries + 1
        problem = ""
        for attempt in range(1, attempts + 1):
            try:
                response = self._client.post("/chat/completions", json=body)
            except httpx.ReadTimeout:
                # The server took the request and is still working: retrying would only double the wait.
                raise LLMUnavailableError(f"{url}: no answer within timeout_s={self.config.timeout_s}") from None
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status < 300:
                    try:
                        return response.json()
                    except ValueError:
                        raise LLMError(f"{url}: HTTP {status} but the body is not JSON") from None
                detail = response.text[:300]
                if status in (400, 422):
                    raise _FormatRejected(f"{url}: HTTP {status}: {detail}")
                if status in (401, 403):
                    raise LLMError(f"{url}: HTTP {status}, not authorised (is EHRFLOW_LLM_API_KEY set?)")
                if status != 429 and status < 500:
                    raise LLMError(f"{url}: HTTP {status}: {detail}")
                problem = f"HTTP {status}: {detail}"
            if attempt < attempts:
                time.sleep(_BACKOFF_S * 2 ** (attempt - 1))
        raise LLMUnavailableError(f"{url}: unavailable after {attempts} attempt(s): {problem}")


def _response_format(mode: str, schema: dict[str, Any]) -> dict[str, Any]:
    if mode == "json_schema":
        name = str(schema.get("title", "output"))[:64]
        return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}}
    if mode == "json_object":
        return {"response_format": {"type": "json_object"}}
    return {}


def _parse_response(data: dict[str, Any], base_url: str) -> RawCompletion:
    try:
        text = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise LLMError(f"{base_url}: the response has no choices[0].message.content") from None
    if not isinstance(text, str):
        raise LLMError(f"{base_url}: choices[0].message.content is {type(text).__name__}, not text")
    usage = data.get("usage") or {}
    return RawCompletion(text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
