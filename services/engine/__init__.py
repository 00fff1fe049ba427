"""The model runtime: paged KV cache with prefix caching, scheduler, model runner, sampler.

A library with no Ray and no ZeroMQ. Offline use::

    from services.engine import LLM, SamplingParams
    llm = LLM(model="/path/to/hf-dir")
    outputs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
"""

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.llm import LLM
from services.engine.outputs import CompletionOutput, Handoff, Logprob, RequestOutput, StepOutputs
from services.engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "Handoff",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "StepOutputs",
]
