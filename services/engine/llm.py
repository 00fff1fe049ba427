"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import fields

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine, Prompt
from services.engine.outputs import RequestOutput
from services.engine.sampling_params import SamplingParams

_CONFIG_FIELDS = {f.name for f in fields(EngineConfig)}


class LLM:
    """Runs the engine to completion over a list of prompts.

    A prompt is a string, a list of token ids, or `{"prompt_token_ids": [...]}`. Keyword arguments are
    EngineConfig fields (model, dtype, device, block_size, max_num_batched_tokens, max_num_seqs,
    enable_prefix_caching, ...).
    """

    def __init__(self, model: str | None = None, **kwargs) -> None:
        unknown = set(kwargs) - _CONFIG_FIELDS
        if unknown:
            raise TypeError(f"unknown LLM arguments: {sorted(unknown)}; accepted: {sorted(_CONFIG_FIELDS)}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in the prompts' order."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling parameter sets")
        request_ids = []
        try:
            for prompt, p in zip(prompts, params_list):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, p)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:  # a bad prompt leaves nothing queued behind it
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """Apply the model's chat template to one conversation and generate the assistant's reply."""
        token_ids = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                              return_dict=False)
        return self.generate({"prompt_token_ids": list(token_ids)}, sampling_params)[0]

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        while len(finished) < len(request_ids):
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[r] for r in request_ids]
