"""A scripted LLM for tests of parsing and control flow: it answers from a queue.

It goes through the same :class:`BaseLLM` path as the real backends (cache, token accounting,
structured-output retries), so what is tested with it is the production code. Token counts are
whitespace-separated words, deterministic and good enough to test the accounting.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from pathlib import Path

from ehrflow.llm.base import BaseLLM, GenerationRequest, LLMConfig, RawCompletion


class FakeLLM(BaseLLM):
    backend = "fake"

    def __init__(
        self,
        responses: Iterable[str] = (),
        *,
        config: LLMConfig | None = None,
        cache_path: str | Path | None = None,
        model: str = "fake-model",
    ):
        """No cache unless ``cache_path`` (or a ``config`` with ``cache=True``) is given."""
        if config is None:
            config = LLMConfig(cache=False) if cache_path is None else LLMConfig(cache_path=Path(cache_path))
        super().__init__(config)
        self._model = model
        self.responses: deque[str] = deque(responses)
        self.requests: list[GenerationRequest] = []
        """Every request that reached the 'model' (cache hits do not)."""

    @property
    def model_id(self) -> str:
        return self._model

    def queue(self, *responses: str) -> None:
        self.responses.extend(responses)

    def _generate(self, request: GenerationRequest) -> RawCompletion:
        self.requests.append(request)
        if not self.responses:
            raise AssertionError(f"FakeLLM ran out of scripted responses at request {len(self.requests)}")
        text = self.responses.popleft()
        prompt_tokens = sum(len(m.content.split()) for m in request.messages)
        return RawCompletion(text, prompt_tokens, len(text.split()))
