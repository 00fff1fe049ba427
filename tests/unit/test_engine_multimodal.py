"""Vision-language models: greedy output equals transformers' `generate`, token for token.

Tiny random VLMs of four families (tests/vlm_models.py, fixture `vlm_dirs`) run through the processor, the vision
encoder and the paged engine, and through transformers with the same processed inputs. Also: prefix
caching keyed on image hashes, the encoder reading only vision tensors, M-RoPE positions against
transformers' `get_rope_index`, and bad input refused before anything is allocated.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from services.common.errors import InvalidRequestError
from services.engine import LLM, LLMEngine, SamplingParams
from services.engine.models.checkpoint import vision_name
from services.engine.models.llama import RotaryEmbedding
from services.engine.multimodal import (
    MultiModalFeature,
    MultiModalInputs,
    MultiModalProcessor,
    ProcessedPrompt,
    VisionEncoder,
    compute_mrope_positions,
    image_content_hash,
)
from services.engine.ops import TORCH_OPS
from tests.vlm_models import VLM_FAMILIES, placeholder, random_image

MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
FAMILIES = sorted(VLM_FAMILIES)
QWEN_FAMILIES = ["qwen2-vl", "qwen2.5-vl"]
# (width, height): Qwen turns them into 4x6, 8x8 and 2x8 patch grids (6, 16 and 4 tokens)
IMAGE_SIZES = [(56, 84), (112, 112), (112, 20)]


@pytest.fixture(scope="module")
def reference(vlm_dirs) -> Reference:
    return Reference(vlm_dirs)


class Reference:
    """transformers' models and our processors, loaded once per family."""

    def __init__(self, dirs: dict[str, str]) -> None:
        self.dirs = dirs
        self._models: dict[str, transformers.PreTrainedModel] = {}
        self._processors: dict[str, MultiModalProcessor] = {}

    def model(self, family: str) -> transformers.PreTrainedModel:
        if family not in self._models:
            model_class = getattr(transformers, VLM_FAMILIES[family][0])
            self._models[family] = model_class.from_pretrained(self.dirs[family], dtype=torch.float32).eval()
        return self._models[family]

    def processor(self, family: str) -> MultiModalProcessor:
        if family not in self._processors:
            self._processors[family] = MultiModalProcessor.from_model_dir(self.dirs[family])
        return self._processors[family]

    def inputs(self, family: str, processed: ProcessedPrompt) -> dict[str, torch.Tensor]:
        """transformers' model inputs for one processed prompt (the same pixels the engine's encoder gets)."""
        ids = torch.tensor([processed.prompt_token_ids])
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if not processed.images:
            return kwargs
        if family.startswith("llava"):
            kwargs["pixel_values"] = torch.stack([item.pixel_values for item in processed.images])
        else:
            kwargs["pixel_values"] = torch.cat([item.pixel_values for item in processed.images])
            kwargs["image_grid_thw"] = torch.tensor([item.image_grid_thw for item in processed.images])
            kwargs["mm_token_type_ids"] = (ids == self.processor(family).spec.image_token_id).int()
        return kwargs

    def greedy(self, family: str, processed: ProcessedPrompt, max_tokens: int = MAX_TOKENS) -> list[int]:
        with torch.no_grad():
            out = self.model(family).generate(
                **self.inputs(family, processed),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        return out[0, len(processed.prompt_token_ids) :].tolist()


def images(count: int, seed: int = 0) -> list:
    return [random_image(w, h, seed=seed + i) for i, (w, h) in enumerate(IMAGE_SIZES[:count])]


def image_prompts(family: str) -> list[tuple[str, list]]:
    """1, 2 (adjacent placeholders) and 3 images of different sizes, and a text-only prompt."""
    ph = placeholder(family)
    return [
        (f"Describe {ph} in a few words.", images(1)),
        (f"{ph}{ph} Which of the two pictures is brighter?", images(2, seed=10)),
        (f"A first picture {ph}, then a second {ph} and at last {ph}", images(3, seed=20)),
        ("Only text here, the same engine and batch.", []),
    ]


def request(prompt: str, image_list: list) -> dict:
    return {"prompt": prompt, "multi_modal_data": {"image": image_list}}


def assert_idle(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.num_free_blocks() == engine.num_usable_blocks()


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_with_chunked_prefill_matches_transformers(vlm_dirs, reference, family):
    prompts = image_prompts(family)
    processor = reference.processor(family)
    expected = [reference.greedy(family, processor.process(text, imgs)) for text, imgs in prompts]
    # a 10-token budget cuts every image's placeholder run across chunks, next to other requests' decodes
    llm = LLM(vlm_dirs[family], block_size=8, num_kv_blocks=96, max_num_batched_tokens=10)
    assert token_ids(llm.generate([request(t, i) for t, i in prompts], GREEDY)) == expected
    assert_idle(llm.engine)


def test_preempted_image_requests_recompute_with_their_embeddings(vlm_dirs, reference):
    family = "qwen2-vl"
    prompts = image_prompts(family)[:3]
    expected = [reference.greedy(family, reference.processor(family).process(t, i), 24) for t, i in prompts]
    # 11 usable blocks of 8 tokens cannot hold requests of 45, 69 and 76 tokens (6, 9 and 10 blocks) at once
    llm = LLM(vlm_dirs[family], block_size=8, num_kv_blocks=12)
    outputs = llm.generate(
        [request(t, i) for t, i in prompts], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    )
    assert llm.engine.scheduler_stats().num_preemptions > 0
    assert token_ids(outputs) == expected
    assert_idle(llm.engine)


def test_prompt_token_ids_form_equals_the_text_form(vlm_dirs, reference):
    family = "llava-clip-llama"
    text, imgs = image_prompts(family)[1]
    ids = reference.processor(family).tokenizer.encode(text)
    llm = LLM(vlm_dirs[family], block_size=8, num_kv_blocks=64)
    by_ids = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": imgs}}, GREEDY)
    by_text = llm.generate(request(text, imgs), GREEDY)
    assert token_ids(by_ids) == token_ids(by_text)
    assert by_ids[0].prompt_token_ids == by_text[0].prompt_token_ids
    assert_idle(llm.engine)


def test_kv_export_then_import_of_an_image_prompt_continues_like_colocated(vlm_dirs, reference):
    family = "qwen2-vl"  # decode positions continue at p + delta (delta < 0 here)
    text, imgs = image_prompts(family)[1]
    processed = reference.processor(family).process(text, imgs)
    multi_modal = processed.to_inputs(VisionEncoder.from_model_dir(vlm_dirs[family]).encode(processed.images))
    assert multi_modal.mrope_delta < 0
    ids, engine_args = processed.prompt_token_ids, dict(model=vlm_dirs[family], block_size=8, num_kv_blocks=64)

    prefill = LLMEngine(**engine_args)
    prefill.add_request("r", ids, SamplingParams(temperature=0, max_tokens=1), hold_kv=True, multi_modal=multi_modal)
    first_token = run_to_end(prefill)["r"].outputs[0].token_ids
    layers = [prefill.export_kv("r", layer) for layer in range(prefill.runner.model.spec.num_layers)]
    assert prefill.release_kv("r")

    decode = LLMEngine(**engine_args)
    decode.import_request("r", ids, first_token, GREEDY, multi_modal=multi_modal)
    for layer, kv in enumerate(layers):
        decode.import_kv("r", layer, kv)
    decode.commit_import("r")
    assert run_to_end(decode)["r"].outputs[0].token_ids == reference.greedy(family, processed)
    assert_idle(prefill)
    assert_idle(decode)


def run_to_end(engine: LLMEngine) -> dict:
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({out.request_id: out for out in engine.step() if out.finished})
    return finals


# ------------------------------------------------------------------------------------------------ prefix cache


@pytest.mark.parametrize("family", ["llava-siglip-qwen2", "qwen2-vl"])
def test_image_hashes_key_the_prefix_cache(vlm_dirs, reference, family):
    ph = placeholder(family)
    text = f"The quick brown fox jumps over the lazy dog. {ph} What changed?"
    llm = LLM(vlm_dirs[family], block_size=8, num_kv_blocks=64)
    first = llm.generate(request(text, images(1, seed=1)), GREEDY)[0]
    other_image = llm.generate(request(text, images(1, seed=2)), GREEDY)[0]
    same_again = llm.generate(request(text, images(1, seed=1)), GREEDY)[0]

    image_offset = first.prompt_token_ids.index(reference.processor(family).spec.image_token_id)
    num_tokens = len(first.prompt_token_ids)
    assert image_offset >= 8  # the text before the image fills a block, which both may share
    assert other_image.num_cached_tokens == image_offset // 8 * 8  # nothing from the image's first block on
    assert same_again.num_cached_tokens == (num_tokens - 1) // 8 * 8  # every full block but the last token's
    assert same_again.outputs[0].token_ids == first.outputs[0].token_ids
    processed = reference.processor(family).process(text, images(1, seed=2))
    assert other_image.outputs[0].token_ids == reference.greedy(family, processed)
    assert_idle(llm.engine)


def test_a_prefix_hit_may_end_inside_an_image(vlm_dirs):
    family = "llava-clip-llama"  # 16 tokens an image
    text = f"Look: {placeholder(family)}"  # the prompt ends with the image
    llm = LLM(vlm_dirs[family], block_size=8, num_kv_blocks=64)
    first = llm.generate(request(text, images(1)), GREEDY)[0]
    again = llm.generate(request(text, images(1)), GREEDY)[0]
    num_tokens = len(first.prompt_token_ids)
    assert first.prompt_token_ids[-1] == llm.vision.processor.spec.image_token_id
    # the hit stops a block short of the prompt's end: the last rows of the image are computed again
    assert again.num_cached_tokens == (num_tokens - 1) // 8 * 8 > num_tokens - 16
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert_idle(llm.engine)


def test_caller_content_hashes_are_what_the_cache_keys_on(vlm_dirs):
    family = "llava-siglip-qwen2"
    text = f"{placeholder(family)} and some words after the picture"
    llm = LLM(vlm_dirs[family], block_size=8, num_kv_blocks=64)
    tagged = {**request(text, images(1)), "multi_modal_uuids": {"image": ["photo-1"]}}
    llm.generate(tagged, GREEDY)
    assert llm.generate(request(text, images(1)), GREEDY)[0].num_cached_tokens == 0  # pixel hash != "photo-1"
    assert llm.generate(tagged, GREEDY)[0].num_cached_tokens > 0
    assert_idle(llm.engine)


# ------------------------------------------------------------------------------------------------ encoder


def expected_vision_parameters(family: str, model: transformers.PreTrainedModel) -> int:
    """Vision tower + projector, less what LLaVA never reads (CLIP's post-layernorm, SigLIP's pooling head)."""
    if family.startswith("llava"):
        tower = model.model.vision_tower
        unused = [getattr(tower, name, None) for name in ("post_layernorm", "head")]
        modules = [tower, model.model.multi_modal_projector]
        return sum(p.numel() for m in modules for p in m.parameters()) - sum(
            p.numel() for m in unused if m is not None for p in m.parameters()
        )
    return sum(p.numel() for p in model.model.visual.parameters())


def split_checkpoint(model_dir: str, out_dir: Path) -> Path:
    """A copy whose weights are two shards, vision.safetensors and language.safetensors, with an index."""
    out = Path(shutil.copytree(model_dir, out_dir))
    (out / "model.safetensors").unlink()
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    parts = {"vision.safetensors": {}, "language.safetensors": {}}
    for name, tensor in tensors.items():
        parts["vision.safetensors" if vision_name(name) else "language.safetensors"][name] = tensor
    for file_name, part in parts.items():
        save_file(part, str(out / file_name), metadata={"format": "pt"})
    weight_map = {name: file_name for file_name, part in parts.items() for name in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_reads_only_vision_tensors_and_equals_transformers(vlm_dirs, reference, tmp_path, family):
    split = split_checkpoint(vlm_dirs[family], tmp_path / "split")
    (split / "language.safetensors").write_bytes(b"not a safetensors file")  # never opened by the encoder
    encoder = VisionEncoder.from_model_dir(split)
    model = reference.model(family)
    assert encoder.num_parameters == expected_vision_parameters(family, model) < model.num_parameters() // 2

    processed = reference.processor(family).process(image_prompts(family)[2][0], images(3, seed=20))
    inputs = reference.inputs(family, processed)
    with torch.no_grad():
        kwargs = {"image_grid_thw": inputs["image_grid_thw"]} if "image_grid_thw" in inputs else {}
        expected = model.get_image_features(pixel_values=inputs["pixel_values"], **kwargs).pooler_output
    for rows, reference_rows in zip(encoder.encode(processed.images), expected, strict=True):
        torch.testing.assert_close(rows, reference_rows.reshape(rows.shape), rtol=0, atol=0)


def test_language_model_reads_no_vision_tensor(vlm_dirs, reference, tmp_path):
    family = "qwen2.5-vl"
    split = split_checkpoint(vlm_dirs[family], tmp_path / "split")
    (split / "vision.safetensors").write_bytes(b"not a safetensors file")
    engine = LLMEngine(model=str(split), block_size=8, num_kv_blocks=32)  # the LM alone, as a prefill worker has it
    text = "Only text here, the same engine and batch."
    engine.add_request("t", reference.processor(family).tokenizer.encode(text), GREEDY)
    assert run_to_end(engine)["t"].outputs[0].token_ids == reference.greedy(
        family, reference.processor(family).process(text, [])
    )
    assert_idle(engine)


@pytest.mark.parametrize("family", FAMILIES)
def test_in_memory_key_layout_loads_to_the_same_outputs(vlm_dirs, reference, tmp_path, family):
    """transformers 5 saves the Hub layout; the `model.language_model.` / `model.visual.` layout loads too."""
    out = Path(shutil.copytree(vlm_dirs[family], tmp_path / "layout"))
    state = {name: t.contiguous() for name, t in reference.model(family).state_dict().items()}
    assert any(name.startswith("model.language_model.") for name in state)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    text, imgs = image_prompts(family)[0]
    outputs = [
        LLM(str(d), block_size=8, num_kv_blocks=32).generate(request(text, imgs), GREEDY)
        for d in (vlm_dirs[family], out)
    ]
    assert token_ids(outputs[0]) == token_ids(outputs[1])


def test_flat_hub_style_qwen2_vl_config_loads_to_the_same_outputs(vlm_dirs, tmp_path):
    """Hub Qwen2-VL configs keep the LM fields at the top level, with rope_scaling {"type": "mrope", ...}."""
    family = "qwen2-vl"
    out = Path(shutil.copytree(vlm_dirs[family], tmp_path / "flat"))
    config = json.loads((out / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    text.pop("model_type")
    config.update(
        text, rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]}
    )
    (out / "config.json").write_text(json.dumps(config))
    text_prompt, imgs = image_prompts(family)[1]
    outputs = [
        LLM(str(d), block_size=8, num_kv_blocks=32).generate(request(text_prompt, imgs), GREEDY)
        for d in (vlm_dirs[family], out)
    ]
    assert token_ids(outputs[0]) == token_ids(outputs[1])


@pytest.mark.parametrize("family", ["llava-clip-llama", "qwen2.5-vl"])
def test_dummy_weights_in_bfloat16_have_the_real_shapes(vlm_dirs, family):
    text, imgs = image_prompts(family)[1]
    llm = LLM(vlm_dirs[family], load_format="dummy", dtype="bfloat16", block_size=8, num_kv_blocks=32)
    encoder = llm.vision.encoder
    assert {p.dtype for p in encoder.modules.parameters()} == {torch.bfloat16}  # not the checkpoint's float32
    processed = llm.vision.processor.process(text, imgs)
    rows = encoder.encode(processed.images)
    assert [(tuple(r.shape), r.dtype) for r in rows] == [((i.length, 64), torch.bfloat16) for i in processed.images]
    assert len(llm.generate(request(text, imgs), GREEDY)[0].outputs[0].token_ids) == MAX_TOKENS
    assert_idle(llm.engine)


# ------------------------------------------------------------------------------------------------ processor, M-RoPE


@pytest.mark.parametrize("family", FAMILIES)
def test_num_image_tokens_from_the_size_alone(reference, family):
    processor = reference.processor(family)
    for width, height in [*IMAGE_SIZES, (300, 40), (29, 29)]:
        processed = processor.process(processor.image_placeholder, [random_image(width, height)])
        assert processor.num_image_tokens(width, height) == processed.images[0].length


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_from_sizes_alone_equals_processing_the_pixels(reference, family):
    """What a gateway computes without pixels (token ids, placeholder runs, Qwen patch grids) is what
    the encoders' full processing gives."""
    processor = reference.processor(family)
    text, images = image_prompts(family)[2]
    processed = processor.process(text, images)
    token_ids, layout = processor.layout(processor.tokenizer.encode(text), [im.size for im in images])
    assert token_ids == processed.prompt_token_ids
    assert layout == [(i.offset, i.length, i.image_grid_thw) for i in processed.images]
    with pytest.raises(InvalidRequestError, match="placeholder"):
        processor.layout(processor.tokenizer.encode(text), [images[0].size])


def test_llava_expansion_equals_transformers_processor(vlm_dirs, reference):
    family = "llava-clip-llama"
    text, imgs = image_prompts(family)[2]
    hf_processor = transformers.AutoProcessor.from_pretrained(vlm_dirs[family])
    expected = hf_processor(text=text, images=imgs, return_tensors="pt")
    processed = reference.processor(family).process(text, imgs)
    assert processed.prompt_token_ids == expected["input_ids"][0].tolist()
    assert torch.equal(torch.stack([i.pixel_values for i in processed.images]), expected["pixel_values"])


def test_chat_template_and_content_hashes(reference):
    processor = reference.processor("qwen2-vl")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    rendered = processor.apply_chat_template(messages)
    assert rendered.count(processor.image_placeholder) == 1 and rendered.endswith("<|im_start|>assistant\n")
    image = random_image(40, 30, seed=3)
    assert image_content_hash(image) == image_content_hash(image.copy()) != image_content_hash(random_image(40, 30))
    assert len(image_content_hash(image)) == 32  # 128 bits, hex
    processed = processor.process(rendered, [image], content_hashes=["caller-hash"])
    assert processed.images[0].content_hash == "caller-hash"


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_mrope_positions_equal_transformers_get_rope_index(reference, family):
    processor = reference.processor(family)
    ph = processor.image_placeholder
    layouts = [
        (f"{ph} at the start", images(1)),
        (f"two {ph}{ph} side by side and text after", images(2)),
        (f"three {ph} images {ph} here {ph}", images(3)),
        (f"ends with an image {ph}", images(1, seed=2)),
    ]
    for text, imgs in layouts:
        processed = processor.process(text, imgs)
        inputs = reference.inputs(family, processed)
        expected, delta = reference.model(family).model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"]
        )
        positions, our_delta = compute_mrope_positions(
            processed.prompt_token_ids,
            [i.image_grid_thw for i in processed.images],
            image_token_id=processor.spec.image_token_id,
            spatial_merge_size=processor.spec.spatial_merge_size,
        )
        assert torch.equal(positions, expected[:, 0]) and torch.equal(processed.mrope_positions, positions)
        assert our_delta == processed.mrope_delta == int(delta)


def test_mrope_rotary_equals_transformers(reference):
    """The per-token cos/sin rows, through the reference rotary op, equal transformers' M-RoPE exactly."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VLRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    model = reference.model("qwen2-vl")
    text_config = model.config.text_config
    engine = LLMEngine(model=reference.dirs["qwen2-vl"], num_kv_blocks=8)
    ours = RotaryEmbedding(engine.runner.model.spec, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 300, (3, 7), generator=generator)  # [3, T], components all different
    q = torch.randn(7, 4, 16, generator=generator)
    k = torch.randn(7, 2, 16, generator=generator)
    tables = ours.tables(positions)
    actual_q, actual_k = TORCH_OPS.rotary(q.clone(), k.clone(), tables.cos, tables.sin, tables.positions)
    cos, sin = Qwen2VLRotaryEmbedding(text_config)(q, positions[:, None, :])  # [1, T, D]
    expected_q, expected_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    assert torch.equal(actual_q, expected_q[0].transpose(0, 1))
    assert torch.equal(actual_k, expected_k[0].transpose(0, 1))


# ------------------------------------------------------------------------------------------------ bad input


def test_images_for_a_text_only_model_are_refused(llama_dir):
    llm = LLM(llama_dir, block_size=8, num_kv_blocks=16)
    with pytest.raises(InvalidRequestError, match="text-only") as info:
        llm.generate(request("hello <image>", [random_image(28, 28)]), GREEDY)
    assert info.value.param == "multi_modal_data"
    feature = MultiModalFeature("h", 0, 2, torch.zeros(2, 64))
    with pytest.raises(InvalidRequestError, match="text-only"):
        llm.engine.add_request("x", [5, 6, 7], GREEDY, multi_modal=MultiModalInputs((feature,)))
    assert_idle(llm.engine)


@pytest.mark.parametrize("family", ["llava-clip-llama", "qwen2-vl"])
def test_mismatched_images_and_placeholders_are_refused(vlm_dirs, reference, family):
    llm = LLM(vlm_dirs[family], block_size=8, num_kv_blocks=32)
    ph = placeholder(family)
    with pytest.raises(InvalidRequestError, match="2 image placeholder"):
        llm.generate(request(f"{ph} and {ph}", images(1)), GREEDY)
    with pytest.raises(InvalidRequestError, match="only 'image'"):
        llm.generate({"prompt": ph, "multi_modal_data": {"image": images(1), "video": [1]}}, GREEDY)

    processed = reference.processor(family).process(f"a {ph} b", images(1))
    good = processed.to_inputs(llm.vision.encoder.encode(processed.images))
    feature = good.features[0]
    bad_inputs = {
        "start at": MultiModalInputs(
            (MultiModalFeature("h", feature.offset + 1, feature.length, feature.embeddings),), good.mrope_positions
        ),
        "need": MultiModalInputs(
            (MultiModalFeature("h", feature.offset, feature.length - 1, feature.embeddings[1:]),), good.mrope_positions
        ),
        "shape": MultiModalInputs(
            (MultiModalFeature("h", feature.offset, feature.length, feature.embeddings[:, :8]),), good.mrope_positions
        ),
    }
    if family == "qwen2-vl":
        bad_inputs["M-RoPE positions"] = MultiModalInputs(good.features)
    for message, bad in bad_inputs.items():
        with pytest.raises(InvalidRequestError, match=message):
            llm.engine.add_request("bad", processed.prompt_token_ids, GREEDY, multi_modal=bad)
    with pytest.raises(InvalidRequestError, match="placeholder tokens"):  # image tokens but no image
        llm.engine.add_request("bad", processed.prompt_token_ids, GREEDY)
    assert_idle(llm.engine)
