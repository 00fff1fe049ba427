"""A real `tristage serve` (Ray, worker actors, ZeroMQ, the gateway) driven by the official OpenAI client."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.integration.cluster import ServeProcess, wait_until_idle

MODEL = "tristage-tiny"


@pytest.fixture
def server(colocated_server):
    return colocated_server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, content, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/ready").status_code == 200


def test_chat_non_streaming_with_usage_n_and_logprobs(client):
    out = chat(
        client,
        "Hello there",
        max_tokens=8,
        temperature=0,
        n=2,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    assert len(out.choices) == 2 and out.choices[0].message.content == out.choices[1].message.content
    assert out.usage.completion_tokens == 16 and out.usage.prompt_tokens > 0
    content = out.choices[0].logprobs.content
    assert len(content) == 8 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob for t in content)


def test_chat_streaming_matches_non_streaming_and_reports_usage(client):
    kwargs = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = chat(client, "Stream me", **kwargs).choices[0].message.content
    chunks = list(chat(client, "Stream me", stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completions_with_token_ids_stop_and_seed(client):
    base = client.completions.create(
        model=MODEL, prompt=[10, 11, 12, 13], max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    text = base.choices[0].text
    stop = next(
        text[p : p + 2]
        for p in range(3, len(text) - 2)
        if text.find(text[p : p + 2]) == p and "\ufffd" not in text[p : p + 2]
    )
    cut = client.completions.create(
        model=MODEL, prompt=[10, 11, 12, 13], max_tokens=16, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    seeded = [
        client.completions.create(
            model=MODEL, prompt="once upon", max_tokens=10, temperature=1.0, seed=42, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_errors_surface_as_the_clients_own_exceptions(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "x", temperature=5)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "x", max_tokens=10**6)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        chat(client, [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}])


def test_async_client_and_64_concurrent_streams_equal_the_same_request_alone(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        prompts = [f"request number {i}" for i in range(64)]
        kwargs = dict(model=MODEL, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})

        async def stream(p):
            parts = []
            async for chunk in await client.chat.completions.create(
                messages=[{"role": "user", "content": p}], stream=True, **kwargs
            ):
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
            return "".join(parts)

        together = await asyncio.gather(*(stream(p) for p in prompts))
        alone = []
        for p in prompts[:8]:
            out = await client.chat.completions.create(messages=[{"role": "user", "content": p}], **kwargs)
            alone.append(out.choices[0].message.content)
        await client.close()
        return together, alone

    together, alone = asyncio.run(run())
    assert len(together) == 64 and all(together)
    assert together[:8] == alone


def test_disconnect_mid_stream_frees_everything(server, client):
    stream = chat(
        client, "a long answer please", max_tokens=2000, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()  # the client goes away mid-stream
    wait_until_idle(server.base_url)


def test_sigterm_drains_requests_then_leaves_no_process(tmp_path):
    proc = ServeProcess("--drain-timeout", "30", cache_dir=tmp_path)
    client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    results: list[str] = []

    def one(i):
        out = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"drain {i}"}],
            max_tokens=60,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        results.append(out.choices[0].finish_reason)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the requests are running
    try:
        assert proc.stop(signal.SIGTERM) == 0
        for t in threads:
            t.join(60)
        assert results == ["length"] * 4  # every request in flight finished in full
        assert proc.leftover_processes() == []
    finally:
        proc.kill_all()


def test_loadgen_run_against_the_real_cluster(server, tmp_path):
    import json

    from loadgen.cli import main as loadgen_main

    out = tmp_path / "run"
    code = loadgen_main(
        [
            "run",
            "--base-url",
            server.base_url,
            "--workload",
            "shared-prefix",
            "--num-groups",
            "3",
            "--prefix-len",
            "40",
            "--suffix-len",
            "8",
            "--output-len",
            "6",
            "--num-requests",
            "24",
            "--rate",
            "50",
            "--slo",
            "ttft=10s,tpot=1s",
            "--time-limit",
            "120",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 24 and not any(summary["errors"].values())
    for key in ("ttft", "itl", "tpot", "e2e"):
        assert {"mean", "p50", "p90", "p99"} <= set(summary[key]) and summary[key]["mean"] > 0
    assert summary["goodput"] > 0 and summary["output_token_throughput"] > 0
    assert (out / "latency_cdf.png").exists()
