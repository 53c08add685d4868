"""The in-process vLLM engine (GPU machines; the optional ``gpu`` extra).

Written against vLLM's documented offline API (>= 0.12): ``LLM.chat(messages, sampling_params)``
returning ``RequestOutput`` objects, and ``SamplingParams(structured_outputs=
StructuredOutputsParams(json=schema))`` for schema-constrained decoding. ``vllm`` is imported
only when this backend is built. On CPU machines run vLLM as a server and use the ``openai`` backend.
"""

from __future__ import annotations

import threading
from typing import Any

from ehrflow.llm.base import BaseLLM, GenerationRequest, LLMConfig, LLMUnavailableError, RawCompletion

_engines: dict[tuple[str, int, int], Any] = {}
_engines_lock = threading.Lock()


def _import_vllm() -> tuple[Any, Any, Any]:
    try:
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError as exc:
        raise LLMUnavailableError(
            f"the vllm backend needs vLLM >= 0.12 ({exc}): pip install 'ehrflow[gpu]' on a CUDA machine, "
            "or serve the model with `vllm serve` and use backend='openai'"
        ) from exc
    return LLM, SamplingParams, StructuredOutputsParams


class VLLMEngineLLM(BaseLLM):
    backend = "vllm"

    def __init__(self, config: LLMConfig):
        if not config.model:
            raise ValueError("LLMConfig.model: the vllm backend needs a model directory or hub id")
        engine_cls, self._sampling_params, self._structured_params = _import_vllm()
        super().__init__(config)
        key = (config.model, config.n_ctx, config.seed)
        with _engines_lock:
            if key not in _engines:
                _engines[key] = engine_cls(model=config.model, max_model_len=config.n_ctx, seed=config.seed)
            self._engine = _engines[key]

    @property
    def model_id(self) -> str:
        return str(self.config.model)

    def _generate(self, request: GenerationRequest) -> RawCompletion:
        structured = None if request.json_schema is None else self._structured_params(json=request.json_schema)
        params = self._sampling_params(
            temperature=request.temperature,
            max_tokens=request.max_tokens,
            seed=request.seed,
            structured_outputs=structured,
        )
        messages = [m.model_dump() for m in request.messages]
        (output,) = self._engine.chat(messages, sampling_params=params, use_tqdm=False)
        choice = output.outputs[0]
        return RawCompletion(choice.text, len(output.prompt_token_ids or ()), len(choice.token_ids))
