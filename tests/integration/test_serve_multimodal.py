"""Vision-language chats through a real `tristage serve`: images as data URLs, through an encode pool of
three (encode -> prefill -> decode over ZeroMQ) and colocated, token for token equal to the offline engine
(PNG images: decoded in full, as the offline engine takes them; JPEGs would be draft-decoded). A request
with three new images is split over the three encoders, one image each (counted by each encoder's
embedding-cache lookups), gathered by the prefill worker, and answered as transformers answers it. A JPEG
cut short passes the gateway's header check and comes back from the encoder as a 400 naming it."""

from __future__ import annotations

import base64
import io
import re

import httpx
import openai
import pytest

from services.engine import LLM, SamplingParams
from services.engine.multimodal import MultiModalProcessor
from tests.integration.cluster import ServeProcess, metric, wait_until_idle
from tests.unit.test_engine_multimodal import Reference
from tests.vlm_models import build_vlm_dir, random_image

MAX_TOKENS = 8
NUM_ENCODERS = 3
# (width, height) of each request's images: Qwen2-VL grids of different sizes, and a repeated image
REQUESTS = [[(56, 84)], [(112, 112), (56, 84)]]
SPLIT_REQUEST = [(56, 56), (84, 56), (112, 84)]  # three images no encoder has seen: one on each


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


TTFT_LINE = re.compile(
    r"request (\S+) ttft ([\d.]+) ms: queue ([\d.]+) image_wait ([\d.]+) \(encoder queue ([\d.]+), "
    r"decode ([\d.]+), encode ([\d.]+), transfer ([\d.]+)\) prefill_queue ([\d.]+) prefill ([\d.]+) "
    r"other ([\d.]+)"
)
TTFT_FIELDS = ("total", "queue", "image_wait", "encoder_queue", "decode", "encode", "transfer")
TTFT_FIELDS += ("prefill_queue", "prefill", "other")


def check_ttft_breakdowns(log: list[str]) -> list[dict[str, float]]:
    """The gateway's TTFT breakdown lines (services.gateway.ttft): each request's parts add up to its
    measured TTFT within 5 %; returns them (ms)."""
    found = [dict(zip(TTFT_FIELDS, map(float, m.groups()[1:]))) for m in map(TTFT_LINE.search, log) if m]
    assert found, "no TTFT breakdown in the gateway's log"
    for parts in found:
        added = sum(parts[name] for name in ("queue", "image_wait", "prefill_queue", "prefill", "other"))
        assert added == pytest.approx(parts["total"], rel=0.05), parts
        assert parts["prefill"] > 0, parts
    return found


def per_worker(text: str, name: str) -> dict[str, float]:
    """A metric's samples in Prometheus' text format, by their `worker` label."""
    pattern = rf'^{re.escape(name)}{{[^}}]*worker="([^"]+)"[^}}]*}} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def gateway_prompt(processor: MultiModalProcessor, sizes) -> tuple[str, list]:
    """The chat's prompt as the gateway renders it (each content part on its own line, an image as the
    model's placeholder), and its images."""
    template = [
        {"role": "user", "content": "\n".join([processor.image_placeholder] * len(sizes) + ["Describe the picture."])}
    ]
    return processor.apply_chat_template(template), [random_image(w, h, seed=w + h) for w, h in sizes]


def offline(model_dir: str, messages: list[dict], sizes) -> list[int]:
    """The same chat through the offline engine: the gateway's template and placeholders, greedy."""
    prompt, images = gateway_prompt(MultiModalProcessor.from_model_dir(model_dir), sizes)
    llm = LLM(model_dir, device="cpu")
    [out] = llm.generate(
        {"prompt": prompt, "multi_modal_data": {"image": images}},
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
    )
    return out.outputs[0].token_ids


def transformers_greedy(model_dir: str, family: str, sizes) -> list[int]:
    """The same chat through transformers' model (all its images in one vision-tower call), greedy."""
    processor = MultiModalProcessor.from_model_dir(model_dir)
    prompt, images = gateway_prompt(processor, sizes)
    return Reference({family: model_dir}).greedy(family, processor.process(prompt, images), MAX_TOKENS)


def check_chat(client: openai.OpenAI, tokenizer, model_dir: str, sizes, by_uuid: bool = False) -> str:
    """The chat's reply equals the offline engine's, token for token; returns it."""
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
    return reply.choices[0].message.content


@pytest.mark.parametrize("family, mode", [("qwen2-vl", "disaggregated"), ("llava-clip-llama", "colocated")])
def test_image_chats_equal_the_offline_engine(tmp_path, family, mode):
    model_dir = str(build_vlm_dir(tmp_path / family, family))
    args = ["--model", model_dir, "--device", "cpu", "--served-model-name", "vlm", "--mode", mode]
    args += (
        ["--encode", str(NUM_ENCODERS), "--prefill", "1", "--decode", "1"]
        if mode == "disaggregated"
        else ["--replicas", "1"]
    )
    server = ServeProcess(*args, cache_dir=tmp_path / "cache")
    tokenizer = MultiModalProcessor.from_model_dir(model_dir).tokenizer
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        # the last request names its image by the uuid it was sent with, without uploading it again
        for sizes, by_uuid in [(sizes, False) for sizes in REQUESTS] + [(REQUESTS[1][:1], True)]:
            check_chat(client, tokenizer, model_dir, sizes, by_uuid)
        # where their TTFT went: new images were waited for, and decoded by an encoder (or the colocated worker)
        breakdowns = check_ttft_breakdowns(server.log)
        assert any(parts["image_wait"] > 0 and parts["decode"] > 0 for parts in breakdowns), breakdowns
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
            # the decode worker's KV transfer, reported after the first token (services.gateway.ttft)
            assert any(re.search(r"request \S+ kv_transfer [\d.]+ ms", line) for line in server.log)
            # intra-request parallelism (EPD): the three new images of one request, one on each encoder
            before = per_worker(text, "tristage:embedding_cache_queries_total")
            reply = check_chat(client, tokenizer, model_dir, SPLIT_REQUEST)
            assert reply == tokenizer.decode(transformers_greedy(model_dir, family, SPLIT_REQUEST))
            after = per_worker(httpx.get(server.base_url + "/metrics").text, "tristage:embedding_cache_queries_total")
            assert len(after) == NUM_ENCODERS
            assert {w: after[w] - before.get(w, 0) for w in after} == dict.fromkeys(after, 1)
        # n > 1 is served whole by one worker, in disaggregated mode a decode worker: its images go there
        reply = client.chat.completions.create(
            model="vlm", messages=chat(REQUESTS[0]), max_tokens=4, n=2, temperature=0, extra_body={"ignore_eos": True}
        )
        assert [c.finish_reason for c in reply.choices] == ["length", "length"]
        assert reply.choices[0].message.content == reply.choices[1].message.content
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
