"""The LLM-deployment client: generation goes through the handle, cache and token counts stay local."""

from __future__ import annotations

from types import SimpleNamespace

from ehrflow.llm.base import LLMConfig
from ehrflow.llm.fake import FakeLLM


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return SimpleNamespace(result=lambda: self.fn(*args))


class FakeHandle:
    """Stands in for a ``DeploymentHandle`` to the ``LLM`` deployment."""

    def __init__(self, llm: FakeLLM):
        self.calls = 0
        self.model_id = _Call(lambda: llm.model_id)

        def generate(request):
            self.calls += 1
            return llm._generate(request)

        self.generate = _Call(generate)


def test_remote_llm_goes_through_the_handle_and_caches_locally(tmp_path):
    from ehrflow.serve.deployments import RemoteLLM

    handle = FakeHandle(FakeLLM(["the answer is four"], model="served-model"))
    llm = RemoteLLM(LLMConfig(cache_path=tmp_path / "cache.sqlite"), handle)
    assert llm.model_id == "served-model"
    question = [{"role": "user", "content": "what is two plus two?"}]
    assert llm.chat(question) == "the answer is four"
    assert llm.chat(question) == "the answer is four"  # the cache answers, not the deployment
    assert handle.calls == 1
    assert llm.usage.calls == 1 and llm.usage.cache_hits == 1 and llm.usage.completion_tokens == 4
