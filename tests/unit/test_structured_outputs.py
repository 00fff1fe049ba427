"""Structured outputs in the engine (services/engine/structured.py, services/common/structured.py):
every constrained output follows its constraint, the masked path equals the plain one where the mask
allows everything, and the engine's other orders (asynchronous scheduling, a request resumed on
another engine after its first token) give the same tokens."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from services.common.errors import InvalidRequestError
from services.common.messages import StructuredSpec
from services.common.structured import GrammarError, check_compiles
from services.engine import LLMEngine, SamplingParams
from services.engine.request import Request
from services.engine.sampler import Sampler, _apply_token_bitmask

ENGINE = dict(block_size=8, num_kv_blocks=128, max_num_batched_tokens=64)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
LIST_GRAMMAR = 'start: "[" N ("," N)* "]"\nN: /[1-9][0-9]?/'


def json_spec(schema: dict) -> StructuredSpec:
    return StructuredSpec(kind="json", value=json.dumps(schema))


def spec(kind: str, value: str) -> StructuredSpec:
    return StructuredSpec(kind=kind, value=value)


def run(engine: LLMEngine, requests: dict[str, tuple[str, SamplingParams]]) -> dict[str, tuple[list[int], str, str]]:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                if out.finished:
                    done[f"{out.request_id}/{c.index}"] = (list(c.token_ids), c.text, c.finish_reason)
    return done


def test_the_bitmask_clears_exactly_the_tokens_whose_bit_is_clear():
    vocab = 70  # not a multiple of 32: the last word's upper bits are past the vocabulary
    gen = torch.Generator().manual_seed(0)
    allowed = torch.rand(3, vocab, generator=gen) < 0.3
    words = torch.zeros(3, 3, dtype=torch.int64)
    for row, token in allowed.nonzero().tolist():
        words[row, token // 32] |= 1 << (token % 32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # bit 31 is the sign bit
    logits = torch.randn(3, vocab, generator=gen)
    masked = logits.clone()
    _apply_token_bitmask(masked, bitmask)
    assert torch.equal(masked, torch.where(allowed, logits, torch.tensor(float("-inf"))))


@pytest.mark.parametrize(
    "spec, message",
    [
        (json_spec({"type": "object", "properties": {"a": {"type": "nosuch"}}}), "nosuch"),
        (StructuredSpec(kind="regex", value="[a-"), "regex"),
        (StructuredSpec(kind="choice", value="[]"), "non-empty"),
        (StructuredSpec(kind="grammar", value="start: ("), "Expected"),
        (StructuredSpec(kind="xml"), "unknown"),
    ],
)
def test_a_constraint_that_does_not_compile_is_refused_by_name(llama_dir, spec, message):
    with pytest.raises(GrammarError, match=message):
        check_compiles(spec)
    engine = LLMEngine(model=llama_dir, **ENGINE)
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("r", "hello", SamplingParams(structured=spec))
    assert info.value.param == "response_format"
    assert not engine.has_unfinished_requests() and engine.kv_cache.usage() == 0.0


def test_every_output_follows_its_constraint(llama_dir):
    engine = LLMEngine(model=llama_dir, **ENGINE)
    sampled = dict(temperature=1.0, max_tokens=200)
    done = run(
        engine,
        {
            "json": ("a person:", SamplingParams(n=3, seed=1, structured=json_spec(PERSON), **sampled)),
            "object": ("any:", SamplingParams(seed=2, structured=StructuredSpec(kind="json_object"), **sampled)),
            "regex": ("a code:", SamplingParams(seed=3, structured=spec("regex", "[0-9]{3}-[a-z]{2}"), **sampled)),
            "choice": ("pick:", SamplingParams(seed=4, structured=spec("choice", '["yes", "no way"]'), **sampled)),
            "lark": ("list:", SamplingParams(seed=5, structured=spec("grammar", LIST_GRAMMAR), **sampled)),
            "free": ("free text:", SamplingParams(seed=6, **sampled)),
        },
    )  # fmt: skip
    for index in range(3):
        _, text, reason = done[f"json/{index}"]
        assert reason == "stop", text  # the object closed well within max_tokens, and nothing followed it
        jsonschema.validate(json.loads(text), PERSON)
        assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)  # compact
    _, text, reason = done["object/0"]  # any object: random weights may nest past max_tokens
    assert text.startswith("{") and (reason == "length" or isinstance(json.loads(text), dict))
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", done["regex/0"][1])
    assert done["choice/0"][1] in ("yes", "no way")
    assert re.fullmatch(r"\[[1-9][0-9]?(,[1-9][0-9]?)*\]", done["lark/0"][1])
    assert engine.kv_cache.usage() == 0.0  # everything freed


def test_a_mask_that_allows_everything_leaves_the_tokens_alone():
    """The masked sampling path against the plain one, greedy, seeded and with logprobs."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 100, generator=gen)
    results = []
    for bitmask in (None, torch.full((3, 4), -1, dtype=torch.int32)):
        requests = [
            Request(str(i), [1, 2], SamplingParams(temperature=t, seed=5, logprobs=2), None, 8, generator=g)
            for i, (t, g) in enumerate([(0.0, None), (0.9, torch.Generator().manual_seed(5)), (1.0, None)])
        ]
        torch.manual_seed(3)  # the unseeded row's draw
        out = Sampler().sample(logits, requests, token_bitmask=bitmask).resolve()
        results.append((out.token_ids, out.logprobs))
    assert results[0] == results[1]


def test_asynchronous_scheduling_gives_the_plain_order_s_tokens_with_constraints(llama_dir):
    requests = {
        "json": ("a person:", SamplingParams(seed=1, temperature=1.0, max_tokens=60, structured=json_spec(PERSON))),
        "free": ("free:", SamplingParams(seed=2, temperature=1.0, max_tokens=60, ignore_eos=True)),
        "greedy": ("x", SamplingParams(temperature=0, max_tokens=30, structured=spec("regex", "[a-z ]+"))),
    }  # fmt: skip
    plain = run(LLMEngine(model=llama_dir, overlap_outputs=False, **ENGINE), requests)
    launched_ahead = run(LLMEngine(model=llama_dir, async_scheduling=True, **ENGINE), requests)
    assert launched_ahead == plain


def test_a_request_resumed_after_its_first_token_elsewhere_follows_the_same_grammar(llama_dir):
    """Disaggregated order: a prefill-only engine samples the first token under the constraint; the
    next engine's matcher catches up on it before masking its first step."""
    spec = json_spec(PERSON)
    params = SamplingParams(temperature=0, max_tokens=80, structured=spec)
    whole = run(LLMEngine(model=llama_dir, **ENGINE), {"r": ("a person:", params)})["r/0"]
    prefill = LLMEngine(model=llama_dir, **ENGINE)
    prefill.add_request("r", "a person:", params, prefill_only=True)
    first: list[int] = []
    while prefill.has_unfinished_requests():
        for out in prefill.step():
            first = list(out.outputs[0].token_ids)
    decode = LLMEngine(model=llama_dir, **ENGINE)
    decode.add_request("r", "a person:", params, output_token_ids=first)
    rest = run(decode, {})
    assert first == whole[0][:1]
    assert rest["r/0"][0] == whole[0] and rest["r/0"][2] == whole[2] == "stop"  # the replayed token included
    # the import path (KV moved, not recomputed) builds the same matcher
    assert decode.import_request("i", [5, 6, 7], first, params) is not None
    assert decode._children["i"].request.grammar is not None
