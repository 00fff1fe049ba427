"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`.

Vision-language models take `{"prompt": text, "multi_modal_data": {"image": image or [images]}}` (or
`"prompt_token_ids"` instead of `"prompt"`), the prompt holding the model's image placeholder once per
image; optional `"multi_modal_uuids": {"image": [...]}` names the images' content hashes. The
processor and the vision encoder run in this process, then the engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, cast

from services.common.errors import InvalidRequestError
from services.engine.config import EngineConfig
from services.engine.default_model import default_model_path
from services.engine.engine import LLMEngine, Prompt
from services.engine.models.hub import with_local_files
from services.engine.models.loader import read_model_config
from services.engine.multimodal.encoder import VisionEncoder
from services.engine.multimodal.inputs import MultiModalInputs
from services.engine.multimodal.processor import MultiModalProcessor
from services.engine.multimodal.spec import VisionLanguageSpec
from services.engine.outputs import PromptLogprobs, RequestOutput
from services.engine.sampling_params import SamplingParams

_CONFIG_FIELDS = {f.name for f in fields(EngineConfig)}


class LLM:
    """Runs the engine to completion over a list of prompts.

    A prompt is a string, a list of token ids, or `{"prompt_token_ids": [...]}` (with
    `"multi_modal_data"` for vision-language models, see the module docstring). Keyword arguments are
    EngineConfig fields (model: a directory or a Hugging Face Hub id, revision, download_dir, tokenizer,
    dtype, device, block_size, max_num_batched_tokens, max_num_seqs, enable_prefix_caching, ...).
    """

    def __init__(self, model: str | None = None, **kwargs) -> None:
        unknown = set(kwargs) - _CONFIG_FIELDS
        if unknown:
            raise TypeError(f"unknown LLM arguments: {sorted(unknown)}; accepted: {sorted(_CONFIG_FIELDS)}")
        # a Hub id is fetched once here; the vision side and the engine then read the same directory
        config = with_local_files(EngineConfig(model=model, **kwargs).resolved())
        # the vision side first: on a GPU the engine sizes its KV cache from the memory left after it
        self.vision = OfflineVision.create(config)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in the prompts' order."""
        # cast: mypy does not narrow on the first item's type; a str, a dict or a list of token ids is one
        # prompt, anything else a list of prompts
        prompt_list: Sequence[Prompt]
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompt_list = [cast(Prompt, prompts)]
        else:
            prompt_list = cast(Sequence[Prompt], prompts)
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompt_list)
        if len(params_list) != len(prompt_list):
            raise ValueError(f"{len(prompt_list)} prompts but {len(params_list)} sampling parameter sets")
        request_ids = []
        try:
            for prompt, p in zip(prompt_list, params_list):
                request_id = str(next(self._ids))
                prompt, multi_modal = self._encode_images(prompt)
                self.engine.add_request(request_id, prompt, p, multi_modal=multi_modal)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:  # a bad prompt leaves nothing queued behind it
                self.engine.abort_request(request_id)
            raise
        return self._run(request_ids)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """Apply the model's chat template to one conversation and generate the assistant's reply."""
        token_ids = self.engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return self.generate({"prompt_token_ids": list(token_ids)}, sampling_params)[0]

    def _encode_images(self, prompt: Prompt) -> tuple[Prompt, MultiModalInputs | None]:
        if not (isinstance(prompt, dict) and "multi_modal_data" in prompt):
            return prompt, None
        if self.vision is None:
            raise InvalidRequestError("this model takes no images (it is a text-only model)", param="multi_modal_data")
        return self.vision.prepare(prompt)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        prompt_logprobs: dict[str, PromptLogprobs] = {}  # in a request's first output with tokens: for its final
        while len(finished) < len(request_ids):
            for output in self.engine.step():
                if output.prompt_logprobs is not None:
                    prompt_logprobs[output.request_id] = output.prompt_logprobs
                if output.finished:
                    output.prompt_logprobs = prompt_logprobs.pop(output.request_id, None)
                    finished[output.request_id] = output
        return [finished[r] for r in request_ids]


class OfflineVision:
    """The processor and the vision encoder of a vision-language model, run in the caller's process."""

    def __init__(self, processor: MultiModalProcessor, encoder: VisionEncoder) -> None:
        self.processor = processor
        self.encoder = encoder

    @classmethod
    def create(cls, config: EngineConfig) -> OfflineVision | None:
        """None for a text-only model. `config` must be resolved (device and dtype known)."""
        model_dir = str(config.model or default_model_path())
        if VisionLanguageSpec.from_hf_config(read_model_config(model_dir)) is None:
            return None
        encoder = VisionEncoder.from_model_dir(
            model_dir, config.device, config.torch_dtype, config.load_format, config.seed
        )
        return cls(MultiModalProcessor.from_model_dir(model_dir), encoder)

    def prepare(self, prompt: dict[str, Any]) -> tuple[dict[str, Any], MultiModalInputs]:
        """An image prompt -> (the engine's prompt with expanded token ids, its images' inputs)."""
        data = dict(prompt["multi_modal_data"])
        images = data.pop("image", [])
        if data:
            raise InvalidRequestError(
                f"unsupported modalities {sorted(data)}; only 'image' is", param="multi_modal_data"
            )
        images = images if isinstance(images, (list, tuple)) else [images]
        hashes = (prompt.get("multi_modal_uuids") or {}).get("image")
        text_or_ids = prompt["prompt"] if "prompt" in prompt else prompt["prompt_token_ids"]
        processed = self.processor.process(text_or_ids, images, content_hashes=hashes)
        embeddings = self.encoder.encode(processed.images)
        engine_prompt = {"prompt": processed.prompt, "prompt_token_ids": processed.prompt_token_ids}
        return engine_prompt, processed.to_inputs(embeddings)
