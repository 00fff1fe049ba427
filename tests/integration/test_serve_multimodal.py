"""Vision-language chats through a real `tristage serve`: images as data URLs, through the encode pool
(encode -> prefill -> decode over ZeroMQ) and colocated, token for token equal to the offline engine (PNG
images: decoded in full, as the offline engine takes them; JPEGs would be draft-decoded). A JPEG cut
short passes the gateway's header check and comes back from the encoder as a 400 naming it."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest

from services.engine import LLM, SamplingParams
from services.engine.multimodal import MultiModalProcessor
from tests.integration.cluster import ServeProcess, metric, wait_until_idle
from tests.vlm_models import build_vlm_dir, random_image

MAX_TOKENS = 8
# (width, height) of each request's images: Qwen2-VL grids of different sizes, and a repeated image
REQUESTS = [[(56, 84)], [(112, 112), (56, 84)]]


def data_url(image, fmt: str = "PNG", cut_to: float = 1.0) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    data = buffer.getvalue()[: int(len(buffer.getvalue()) * cut_to)]
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode()


def chat(sizes: list[tuple[int, int]], by_uuid: bool = False) -> list[dict]:
    """Each image sent with the uuid "w x h"; by_uuid: named by that uuid alone (sent before)."""
    parts = [
        {
            "type": "image_url",
            "uuid": f"{w}x{h}",
            "image_url": None if by_uuid else {"url": data_url(random_image(w, h, seed=w + h))},
        }
        for w, h in sizes
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe the picture."}]}]


def offline(model_dir: str, messages: list[dict], sizes) -> list[int]:
    """The same chat through the offline engine: the gateway's template and placeholders, greedy."""
    processor = MultiModalProcessor.from_model_dir(model_dir)
    # the gateway's rendering: each content part on its own line, an image as the model's placeholder
    template = [
        {"role": "user", "content": "\n".join([processor.image_placeholder] * len(sizes) + ["Describe the picture."])}
    ]
    prompt = processor.apply_chat_template(template)
    images = [random_image(w, h, seed=w + h) for w, h in sizes]
    llm = LLM(model_dir, device="cpu")
    [out] = llm.generate(
        {"prompt": prompt, "multi_modal_data": {"image": images}},
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
    )
    return out.outputs[0].token_ids


@pytest.mark.parametrize("family, mode", [("qwen2-vl", "disaggregated"), ("llava-clip-llama", "colocated")])
def test_image_chats_equal_the_offline_engine(tmp_path, family, mode):
    model_dir = str(build_vlm_dir(tmp_path / family, family))
    args = ["--model", model_dir, "--device", "cpu", "--served-model-name", "vlm", "--mode", mode]
    args += ["--encode", "1", "--prefill", "1", "--decode", "1"] if mode == "disaggregated" else ["--replicas", "1"]
    server = ServeProcess(*args, cache_dir=tmp_path / "cache")
    tokenizer = MultiModalProcessor.from_model_dir(model_dir).tokenizer
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        # the last request names its image by the uuid it was sent with, without uploading it again
        for sizes, by_uuid in [(sizes, False) for sizes in REQUESTS] + [(REQUESTS[1][:1], True)]:
            # special tokens kept: a random model emits some, and the text must show every token
            reply = client.chat.completions.create(
                model="vlm",
                messages=chat(sizes, by_uuid),
                max_tokens=MAX_TOKENS,
                temperature=0,
                extra_body={"ignore_eos": True, "skip_special_tokens": False},
            )
            assert reply.usage.completion_tokens == MAX_TOKENS
            assert reply.choices[0].message.content == tokenizer.decode(offline(model_dir, chat(sizes), sizes))
        with pytest.raises(openai.BadRequestError, match="image 1 names uuid 'unseen'"):
            client.chat.completions.create(
                model="vlm",
                max_tokens=2,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": None, "uuid": "unseen"}]}],
            )
        # a text-only question to the same model still works; a bad image is a 400
        reply = client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="image 1"):
            client.chat.completions.create(
                model="vlm",
                max_tokens=2,
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}],
                    }
                ],
            )
        wait_until_idle(server.base_url)
        text = httpx.get(server.base_url + "/metrics").text
        if mode == "disaggregated":  # the image of the first request came again twice: cache hits
            assert metric(text, "tristage:embedding_cache_queries_total") == 4
            assert metric(text, "tristage:embedding_cache_hits_total") == 2
            assert metric(text, "tristage:encode_latency_seconds_count") >= 1
            assert metric(text, "tristage:embedding_transfer_bytes_total") > 0
            assert metric(text, "tristage:kv_transfer_bytes_total") > 0
        # a JPEG cut in half: its header passes the gateway, the encoder's decode refuses it
        truncated = {"url": data_url(random_image(300, 200, seed=7), "JPEG", cut_to=0.5)}
        with pytest.raises(openai.BadRequestError, match="image 2 could not be encoded: it is truncated") as info:
            client.chat.completions.create(
                model="vlm",
                max_tokens=2,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_url(random_image(56, 84, seed=8))}},
                            {"type": "image_url", "image_url": truncated},
                        ],
                    }
                ],
            )
        assert (info.value.status_code, info.value.param, info.value.type) == (400, "messages", "invalid_request_error")
        wait_until_idle(server.base_url)  # nothing left running, no KV block held
    finally:
        assert server.stop() == 0
