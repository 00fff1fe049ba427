"""Prompt logprobs and `echo`, end to end: the engine's values against a plain transformers forward
(chunked prefill, preemption, asynchronous scheduling, n > 1), sent once whether the prompt ran on a
colocated or a prefill worker, and through the gateway in vLLM's and OpenAI's shapes."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.codec import MessageCodec
from services.common.messages import (
    CompletionDelta,
    GenerateRequest,
    OutputBatch,
    RankedLogprob,
    RequestDelta,
    RequestError,
    SamplingSpec,
    WorkerInbound,
)
from services.engine import LLM, LLMEngine, SamplingParams
from services.engine.prompt_logprobs import PromptLogprobRows, compute_prompt_logprobs
from services.engine.request import Request
from services.gateway.app import create_app
from services.gateway.backend import ClusterStats
from services.gateway.config import GatewayConfig
from services.gateway.generation import merge_deltas
from services.workers import wire
from tests.unit.test_disaggregation import ENGINE as DISAGGREGATED_ENGINE
from tests.unit.test_disaggregation import Cluster
from tests.unit.test_gateway import running_server

MODEL = "tiny"


def random_prompts(lengths, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 900) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def reference(llama_dir):
    """prompt -> transformers' log_softmax at each position [len(prompt), vocab] (row p predicts p + 1)."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()

    def log_softmax(prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)

    return log_softmax


def assert_matches(prompt_logprobs, prompt, ref, num_top):
    """Every position's prompt token, logprob, rank and top alternatives equal the reference's."""
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for position in range(1, len(prompt)):
        entry, row, token_id = prompt_logprobs[position], ref[position - 1], prompt[position]
        assert next(iter(entry)) == token_id  # the prompt token first
        assert entry[token_id].logprob == pytest.approx(row[token_id].item(), abs=1e-4)
        assert entry[token_id].rank == 1 + int((row > row[token_id]).sum())
        top = row.topk(num_top).indices.tolist()
        assert set(entry) == {token_id, *top}
        assert [entry[t].rank for t in top] == list(range(1, num_top + 1))
        assert all(entry[t].decoded_token is not None for t in entry)


# ----------------------------------------------------------------------------------------------
# Engine


def test_prompt_logprobs_equal_transformers_across_chunks_and_skip_the_prefix_cache(llama_dir, reference):
    # a 16-token budget cuts the 45-token prompt into three chunks; block size 8
    llm = LLM(llama_dir, block_size=8, max_num_batched_tokens=16, num_kv_blocks=64)
    one, short, long = random_prompts([1, 13, 45], seed=1)
    plain = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    warm = llm.generate({"prompt_token_ids": long}, plain)[0]  # its blocks are cached now
    asked = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=3)
    outputs = llm.generate([{"prompt_token_ids": p} for p in (one, short, long)], asked)
    assert outputs[0].prompt_logprobs == [None]
    assert_matches(outputs[1].prompt_logprobs, short, reference(short), 3)
    assert_matches(outputs[2].prompt_logprobs, long, reference(long), 3)
    assert outputs[2].num_cached_tokens == 0  # cached blocks have no logits: none adopted
    assert outputs[2].outputs[0].token_ids == warm.outputs[0].token_ids
    again = llm.generate({"prompt_token_ids": long}, plain)[0]
    assert again.num_cached_tokens == 40 and again.prompt_logprobs is None  # a plain request hits the cache
    zero = llm.generate({"prompt_token_ids": short}, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert [list(entry) for entry in zero.prompt_logprobs[1:]] == [[t] for t in short[1:]]


def test_prompt_logprobs_come_once_in_the_first_output_under_preemption_and_async_scheduling(llama_dir, reference):
    # 12 usable blocks of 8 cannot hold four ~50-token requests at once: requests are preempted, one of
    # them ("3#0") mid-prompt, its prompt logprobs half computed
    engine = LLMEngine(
        model=llama_dir, block_size=8, num_kv_blocks=13, max_num_batched_tokens=16, async_scheduling=True
    )
    prompts = random_prompts([30, 34, 27, 38], seed=2)
    params = [
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(temperature=0.8, seed=4, n=2, max_tokens=16, ignore_eos=True, prompt_logprobs=1),
    ]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params[i % 2])
    carried: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert out.request_id not in carried, "prompt logprobs sent twice"
                carried[out.request_id] = out.prompt_logprobs
            if any(c.delta_token_ids for c in out.outputs):
                assert out.request_id in carried, "a token before its prompt logprobs"
    assert engine.scheduler_stats().num_preemptions > 0
    assert engine.num_free_blocks() == engine.num_usable_blocks()
    for i, prompt in enumerate(prompts):
        assert_matches(carried[str(i)], prompt, reference(prompt), params[i % 2].prompt_logprobs)


def test_a_resumed_request_sends_no_prompt_logprobs_and_may_use_the_cache(llama_dir):
    engine = LLMEngine(model=llama_dir, block_size=8, num_kv_blocks=64)
    prompt = random_prompts([20], seed=3)[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2)
    engine.add_request("a", prompt, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    engine.add_request("b", prompt, params, output_token_ids=outputs[-1].outputs[0].token_ids[:2])
    resumed = []
    while engine.has_unfinished_requests():
        resumed += engine.step()
    assert [o.prompt_logprobs is not None for o in outputs] == [True] + [False] * (len(outputs) - 1)
    assert all(o.prompt_logprobs is None for o in resumed)
    assert resumed[0].num_cached_tokens == 16


def test_sliced_logits_give_the_same_prompt_logprobs():
    torch.manual_seed(0)
    hidden, weight = torch.randn(12, 8), torch.randn(50, 8)
    requests = [
        Request(f"r{i}", list(range(i, i + 9)), SamplingParams(prompt_logprobs=k), None, 4) for i, k in ((1, 3), (2, 0))
    ]
    rows = PromptLogprobRows()
    rows.add(requests[0], first_row=0, chunk_start=0, chunk_end=6)  # positions 1..6 from rows 0..5
    rows.add(requests[1], first_row=6, chunk_start=3, chunk_end=9)  # positions 4..8 from rows 6..10
    assert [(s.first_position, s.num_positions) for s in rows.spans] == [(1, 6), (4, 5)]
    whole = compute_prompt_logprobs(lambda h: h @ weight.T, hidden, rows, vocab_size=50)
    sliced = compute_prompt_logprobs(lambda h: h @ weight.T, hidden, rows, vocab_size=50, max_slice_bytes=2 * 4 * 50)
    for span in rows.spans:  # the same up to rounding (a matmul of other shapes)
        for got, expected in zip(sliced.entries(span), whole.entries(span), strict=True):
            assert list(got) == list(expected)
            assert all(got[t][1] == expected[t][1] and got[t][0] == pytest.approx(expected[t][0]) for t in got)
    ref = torch.log_softmax(hidden @ weight.T, dim=-1)
    second = whole.entries(rows.spans[1])
    assert [next(iter(e)) for e in second] == list(range(6, 11))
    assert second[0][6][0] == pytest.approx(ref[6, 6].item(), abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Disaggregated: computed on the prefill worker, sent once, as colocated


def test_disaggregated_prompt_logprobs_equal_colocated_and_come_once(llama_dir):
    prompts = random_prompts([40, 9], seed=5)
    spec = SamplingSpec(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2)
    colocated = LLM(llama_dir, **DISAGGREGATED_ENGINE).generate(
        [{"prompt_token_ids": p} for p in prompts], wire.sampling_params(spec)
    )
    cluster = Cluster(llama_dir)
    try:
        codec = MessageCodec(WorkerInbound)
        for i, prompt in enumerate(prompts):
            request = GenerateRequest(
                request_id=str(i),
                prompt_token_ids=prompt,
                sampling=spec,
                reply_to=cluster.reply_to,
                kv_target=cluster.target,
            )
            cluster.to_prefill.send_multipart(codec.encode(request))
        deltas: dict[str, list] = {str(i): [] for i in range(len(prompts))}
        outputs = MessageCodec(OutputBatch)
        while not all(d and d[-1].finished for d in deltas.values()):
            assert cluster.results.poll(30000), "no output"
            for item in outputs.decode(cluster.results.recv_multipart()).items:
                assert not isinstance(item, RequestError), item
                deltas[item.request_id].append(item)
        assert cluster.prefill.transfer_stats.transfers_completed == len(prompts)
    finally:
        cluster.close()
    for i, output in enumerate(colocated):
        carrying = [d for d in deltas[str(i)] if d.prompt_logprobs is not None]
        assert len(carrying) == 1 and carrying[0].completions[0].start_index == 0  # with the first token
        got, expected = carrying[0].prompt_logprobs, wire.to_delta(output).prompt_logprobs
        assert [_ids_and_ranks(p) for p in got] == [_ids_and_ranks(p) for p in expected]
        assert np.allclose(_values(got), _values(expected), atol=1e-5)
        assert [t for d in deltas[str(i)] for c in d.completions for t in c.token_ids] == output.outputs[0].token_ids


def _ids_and_ranks(position):
    return None if position is None else [(t.token_id, t.token, t.rank) for t in position]


def _values(positions):
    return [t.logprob for position in positions[1:] for t in position]


# ----------------------------------------------------------------------------------------------
# Through the gateway: vLLM's prompt_logprobs, and echo (lm-evaluation-harness's loglikelihood requests)


class EngineBackend:
    """The engine in the gateway's process, one request at a time, stepped on the event loop."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.model_name = MODEL
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.tokenizer = engine.tokenizer
        self.processor = None
        self._lock = asyncio.Lock()

    def is_ready(self) -> bool:
        return True

    async def generate(self, request_id, prompt_token_ids, sampling, cache_salt=None, images=()):
        async with self._lock:
            self.engine.add_request(request_id, prompt_token_ids, wire.sampling_params(sampling))
            while True:
                for output in self.engine.step():
                    yield wire.to_delta(output, sampling.logprobs or 0)
                    if output.finished:
                        return
                await asyncio.sleep(0)

    async def abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)

    async def snapshot(self) -> list:
        return []

    def cluster_stats(self) -> ClusterStats:
        return ClusterStats()


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def http(llama_dir):
    engine = LLMEngine(model=llama_dir, block_size=8, num_kv_blocks=64, max_num_batched_tokens=16)
    app = create_app(GatewayConfig(served_model_name=MODEL), EngineBackend(engine))
    with running_server(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def assert_offsets_follow_tokens(logprobs):
    offsets, tokens = logprobs["text_offset"], logprobs["tokens"]
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], tokens))


def test_echo_with_logprobs_covers_the_prompt_tokens_the_first_null(http, reference, tokenizer):
    # what lm-evaluation-harness's local-completions sends for loglikelihood: token ids, one token
    prompts = random_prompts([21, 6], seed=6)
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    for prompt, choice in zip(prompts, sorted(reply.json()["choices"], key=lambda c: c["index"])):
        logprobs, ref = choice["logprobs"], reference(prompt)
        assert "prompt_logprobs" not in choice  # not asked
        assert len(logprobs["tokens"]) == len(prompt) + 1  # the prompt's, then the one generated
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        for position in range(1, len(prompt)):
            token_logprob, top = logprobs["token_logprobs"][position], logprobs["top_logprobs"][position]
            assert token_logprob == pytest.approx(ref[position - 1, prompt[position]].item(), abs=1e-4)
            assert max(top.values()) == pytest.approx(ref[position - 1].max().item(), abs=1e-4)  # greedy test
            assert logprobs["tokens"][position] == tokenizer.decode([prompt[position]])
        assert logprobs["token_logprobs"][-1] == pytest.approx(ref[-1].max().item(), abs=1e-4)  # greedy token
        assert choice["text"].startswith(tokenizer.decode(prompt))
        assert_offsets_follow_tokens(logprobs)


def test_a_streamed_echo_puts_the_prompt_in_each_choice_s_first_chunk(http, tokenizer):
    prompt = "Hello world, this is"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "logprobs": 0, "echo": True, "n": 2, "stream": True}
    chunks = []
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line.removeprefix("data: ")))
    prompt_ids = tokenizer.encode(prompt)
    for index in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["text"].startswith(prompt) and not any(c["text"].startswith(prompt) for c in mine[1:])
        first = mine[0]["logprobs"]  # the prompt's tokens, and the output's that came with them
        assert "".join(first["tokens"][: len(prompt_ids)]) == prompt and first["token_logprobs"][0] is None
        assert None not in first["token_logprobs"][1:]
        offsets = [o for c in mine if c["logprobs"] for o in c["logprobs"]["text_offset"]]
        tokens = [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]]
        assert_offsets_follow_tokens({"text_offset": offsets, "tokens": tokens})
        assert len(tokens) == len(prompt_ids) + 3


def test_prompt_logprobs_in_vllm_s_shape_on_both_endpoints(http, reference, tokenizer):
    prompt = random_prompts([11], seed=7)[0]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "prompt_logprobs": 2}
    [choice] = http.post("/v1/completions", json=body).json()["choices"]
    ref = reference(prompt)
    answer = choice["prompt_logprobs"]
    assert len(answer) == len(prompt) and answer[0] is None and choice["logprobs"] is None
    for position in range(1, len(prompt)):
        entry, row = answer[position], ref[position - 1]
        assert next(iter(entry)) == str(prompt[position])
        assert set(entry) == {str(prompt[position]), *map(str, row.topk(2).indices.tolist())}
        for token_id, value in entry.items():
            assert value["logprob"] == pytest.approx(row[int(token_id)].item(), abs=1e-4)
            assert value["rank"] == 1 + int((row > row[int(token_id)]).sum())
            assert value["decoded_token"] == tokenizer.decode([int(token_id)])
    messages = [{"role": "user", "content": "Say hello"}]
    chat = http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1, "prompt_logprobs": 0}
    )
    chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    answer = chat.json()["prompt_logprobs"]
    assert [None if e is None else list(e) for e in answer] == [None] + [[str(t)] for t in chat_ids[1:]]
    plain = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1}).json()
    assert "prompt_logprobs" not in plain


def test_prompt_logprobs_are_not_streamed(http):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "prompt_logprobs": 1, "stream": True}
    reply = http.post("/v1/completions", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt_logprobs"


def test_merged_deltas_keep_the_prompt_logprobs():
    position = [RankedLogprob(5, "a", -0.5, 1)]
    first = RequestDelta(
        request_id="r",
        completions=[CompletionDelta(index=0, token_ids=[1], text="x")],
        finished=False,
        num_prompt_tokens=2,
        prompt_logprobs=[None, position],
    )
    later = RequestDelta(
        request_id="r",
        completions=[CompletionDelta(index=0, token_ids=[2], text="y", start_index=1)],
        finished=True,
        num_prompt_tokens=2,
    )
    assert merge_deltas(first, later).prompt_logprobs == [None, position]
    assert merge_deltas(later, first).prompt_logprobs == [None, position]
