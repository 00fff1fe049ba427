"""Vision-language models on the GPU fast path (Triton ops and decode kernel, SDPA prefill, CUDA graphs).

Decode steps of an M-RoPE request run plain rotary at p + delta, so they go through the captured
graphs; prefill chunks with image rows and [3, T] positions run eagerly. Both against the plain-torch
reference path on the same GPU, and the bf16 fast path against transformers' own bf16 model.
"""

import pytest
import torch
import transformers

from services.engine import LLM, SamplingParams
from tests.unit.test_engine_multimodal import (
    FAMILIES,
    Reference,
    image_prompts,
    request,
    token_ids,
)
from tests.vlm_models import VLM_FAMILIES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_matches_reference_in_float32(vlm_dirs, family):
    prompts = [request(text, images) for text, images in image_prompts(family)]
    common = dict(device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=24, num_kv_blocks=64)
    reference = LLM(vlm_dirs[family], attention_backend="reference", enable_cuda_graphs=False, **common)
    fast = LLM(vlm_dirs[family], attention_backend="triton", enable_cuda_graphs=True, **common)
    assert token_ids(fast.generate(prompts, GREEDY)) == token_ids(reference.generate(prompts, GREEDY))
    assert fast.engine.num_free_blocks() == fast.engine.num_usable_blocks()


@pytest.mark.parametrize("family", ["llava-clip-llama", "qwen2-vl"])
def test_bfloat16_fast_path_tracks_transformers(vlm_dirs, family):
    llm = LLM(vlm_dirs[family], device="cuda", dtype="bfloat16", block_size=16)
    reference = Reference(vlm_dirs)
    model = (
        getattr(transformers, VLM_FAMILIES[family][0])
        .from_pretrained(vlm_dirs[family], dtype=torch.bfloat16)
        .cuda()
        .eval()
    )
    for text, images in image_prompts(family)[:3]:
        out = llm.generate(
            request(text, images), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
        )[0]
        processed = reference.processor(family).process(text, images)
        inputs = {k: v.cuda() for k, v in reference.inputs(family, processed).items()}
        num_prompt = len(processed.prompt_token_ids)
        inputs["input_ids"] = torch.tensor([out.prompt_token_ids + out.outputs[0].token_ids], device="cuda")
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == reference.processor(family).spec.image_token_id).int()
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
        ref = torch.log_softmax(logits, dim=-1)[num_prompt - 1 : -1]
        chosen = torch.tensor(out.outputs[0].token_ids, device="cuda")
        # bf16: every token we chose is (near) the top of transformers' distribution at that step
        gap = ref.max(dim=-1).values - ref.gather(1, chosen[:, None]).squeeze(1)
        assert gap.max().item() < 0.1
