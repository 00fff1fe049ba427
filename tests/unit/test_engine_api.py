"""The step-level engine API: bad input, abort, n > 1, stops, seeds, KV export and import."""

import pytest
import torch

from services.common.errors import InvalidRequestError
from services.engine import LLM, LLMEngine, SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(llama_dir):
    return LLMEngine(model=llama_dir, block_size=8, num_kv_blocks=64, max_num_batched_tokens=32)


def run_to_end(engine):
    finals = {}
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            return finals
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    raise AssertionError("the engine did not finish")


def assert_idle(engine):
    assert not engine.has_unfinished_requests()
    assert engine.num_free_blocks() == engine.num_usable_blocks()


def prompt(n, start=10):
    return [start + i for i in range(n)]


@pytest.mark.parametrize(
    "prompt_ids, params, param",
    [
        ([], SamplingParams(), "prompt"),
        ([5, 100000], SamplingParams(), "prompt"),
        ([5, -1], SamplingParams(), "prompt"),
        (prompt(511), SamplingParams(), "prompt"),  # the pool holds 63 blocks of 8 = 504 tokens
        (prompt(500), SamplingParams(max_tokens=10), "max_tokens"),
        (prompt(5), SamplingParams(temperature=-1), "temperature"),
        (prompt(5), SamplingParams(top_p=0), "top_p"),
        (prompt(5), SamplingParams(logprobs=21), "logprobs"),
        (prompt(5), SamplingParams(max_tokens=0), "max_tokens"),
        (prompt(5), SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
    ],
)
def test_bad_input_raises_naming_the_parameter_before_allocating(engine, prompt_ids, params, param):
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad", prompt_ids, params)
    assert info.value.param == param
    assert_idle(engine)


def test_bad_cache_salt_and_duplicate_ids_are_refused(engine):
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("s", prompt(5), SamplingParams(), cache_salt="")
    assert info.value.param == "cache_salt"
    engine.add_request("dup", prompt(5), SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError):
        engine.add_request("dup", prompt(5), SamplingParams())
    run_to_end(engine)
    assert_idle(engine)


def test_a_bad_prompt_in_a_list_leaves_nothing_queued(llama_dir):
    llm = LLM(llama_dir, num_kv_blocks=64, block_size=8)
    with pytest.raises(InvalidRequestError):
        llm.generate([prompt(5), []], SamplingParams(max_tokens=3))
    assert_idle(llm.engine)


@pytest.mark.parametrize("abort_after_steps", [0, 1, 2, 4, 9])
def test_abort_at_any_moment_frees_everything(engine, abort_after_steps):
    # 60-token prompt with a 32-token budget: step 1 and 2 are prefill chunks, later steps decode
    engine.add_request("victim", prompt(60), SamplingParams(max_tokens=20, **GREEDY))
    engine.add_request("other", prompt(9, 300), SamplingParams(max_tokens=20, **GREEDY))
    for _ in range(abort_after_steps):
        engine.step()
    assert engine.abort_request("victim")
    assert not engine.abort_request("victim")
    finals = run_to_end(engine)
    assert "victim" not in finals and len(finals["other"].outputs[0].token_ids) == 20
    assert_idle(engine)


def test_n_shares_the_prompt_blocks(engine):
    engine.add_request("n3", prompt(40), SamplingParams(n=3, max_tokens=4, **GREEDY))
    engine.step()  # the first 32-token chunk of child 0; children 1 and 2 wait for budget
    engine.step()
    pool = engine.kv_cache.pool
    # 40 tokens = 5 full blocks of 8; the children share them rather than holding 15
    shared = [b for b in pool.blocks if b.ref_cnt == 3]
    assert len(shared) >= 4
    out = run_to_end(engine)["n3"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == out.outputs[2].token_ids  # greedy
    assert_idle(engine)


def test_seeded_sampling_is_reproducible_across_batch_compositions(engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    engine.add_request("alone", prompt(7), params)
    alone = run_to_end(engine)["alone"].outputs[0].token_ids
    engine.add_request("noise-a", prompt(30, 200), SamplingParams(temperature=1.0, max_tokens=15))
    engine.add_request("crowd", prompt(7), params)
    engine.add_request("noise-b", prompt(3, 400), SamplingParams(temperature=0.5, seed=9, max_tokens=5))
    crowd = run_to_end(engine)["crowd"].outputs[0].token_ids
    assert alone == crowd
    engine.add_request(
        "other-seed", prompt(7), SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=12, ignore_eos=True)
    )
    assert run_to_end(engine)["other-seed"].outputs[0].token_ids != alone
    assert_idle(engine)


def test_n_with_a_seed_gives_distinct_reproducible_samples(engine):
    params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    engine.add_request("a", prompt(6), params)
    first = [c.token_ids for c in run_to_end(engine)["a"].outputs]
    engine.add_request("b", prompt(6), params)
    second = [c.token_ids for c in run_to_end(engine)["b"].outputs]
    assert first == second and first[0] != first[1]


def greedy_text(engine, ids, max_tokens=24):
    engine.add_request("probe", ids, SamplingParams(max_tokens=max_tokens, **GREEDY))
    return run_to_end(engine)["probe"].outputs[0]


def test_stop_string_cuts_the_text_and_is_never_emitted(engine):
    full = greedy_text(engine, prompt(5))
    # a 3-character stop string whose first occurrence is in the middle of the text
    cut = next(
        p
        for p in range(8, len(full.text) - 3)
        if full.text.find(full.text[p : p + 3]) == p and "\ufffd" not in full.text[p : p + 3]
    )
    stop = full.text[cut : cut + 3]
    engine.add_request("s", prompt(5), SamplingParams(max_tokens=24, stop=[stop], **GREEDY))
    pieces, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces.append(out.outputs[0].delta_text)
            final = out
    completion = final.outputs[0]
    assert completion.text == full.text[:cut] == "".join(pieces)
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert_idle(engine)


def test_stop_token_ids_min_tokens_and_max_tokens(engine):
    full = greedy_text(engine, prompt(5))
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    engine.add_request("t", prompt(5), SamplingParams(max_tokens=24, stop_token_ids=[stop_id], **GREEDY))
    out = run_to_end(engine)["t"].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
    # min_tokens masks the stop token until 6 tokens exist
    engine.add_request("m", prompt(5), SamplingParams(max_tokens=24, min_tokens=6, stop_token_ids=[stop_id], **GREEDY))
    out = run_to_end(engine)["m"].outputs[0]
    assert len(out.token_ids) >= 6 and stop_id not in out.token_ids[:5]
    engine.add_request("l", prompt(5), SamplingParams(max_tokens=7, **GREEDY))
    out = run_to_end(engine)["l"].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (7, "length")
    assert_idle(engine)


def test_kv_export_then_import_continues_exactly_like_colocated(llama_dir):
    ids = prompt(29)
    colocated = LLMEngine(model=llama_dir, block_size=8, num_kv_blocks=64)
    colocated.add_request("c", ids, SamplingParams(max_tokens=10, **GREEDY))
    expected = run_to_end(colocated)["c"].outputs[0].token_ids

    prefill = LLMEngine(model=llama_dir, block_size=8, num_kv_blocks=64)
    prefill.add_request("r", ids, SamplingParams(max_tokens=1, **GREEDY), hold_kv=True)
    first_token = run_to_end(prefill)["r"].outputs[0].token_ids
    num_layers = prefill.runner.model.spec.num_layers
    layers = [prefill.export_kv("r", layer) for layer in range(num_layers)]
    assert prefill.release_kv("r")
    assert_idle(prefill)

    decode = LLMEngine(model=llama_dir, block_size=8, num_kv_blocks=64)
    decode.add_request("warm", prompt(20, 500), SamplingParams(max_tokens=3, **GREEDY))  # occupy other blocks
    block_ids = decode.import_request("r", ids, first_token, SamplingParams(max_tokens=10, **GREEDY))
    for layer, kv in enumerate(layers):
        decode.import_kv("r", layer, kv)
    for layer, kv in enumerate(layers):  # what decode holds equals, byte for byte, what prefill computed
        assert torch.equal(decode.export_kv("r", layer), kv)
    assert len(block_ids) == 4  # 29 tokens in blocks of 8
    decode.commit_import("r")
    assert run_to_end(decode)["r"].outputs[0].token_ids == expected
    assert_idle(decode)


def test_a_prefill_only_request_ends_in_a_handoff_with_its_kv_held(llama_dir):
    ids = prompt(29)
    engine = LLMEngine(model=llama_dir, block_size=8, num_kv_blocks=64)
    engine.add_request("h", ids, SamplingParams(max_tokens=10, **GREEDY), prefill_only=True)
    step = engine.step()
    while not step.handoffs:
        assert not step, "the prompt's chunks produce no output"
        step = engine.step()
    (handoff,) = step.handoffs
    (output,) = step
    assert handoff.request_id == output.request_id == "h" and handoff.output_token_ids == output.outputs[0].token_ids
    assert len(handoff.output_token_ids) == 1
    # the client's stream goes on elsewhere: not finished, no finish reason ("length" would end it)
    assert not output.finished and output.outputs[0].finish_reason is None
    assert not engine.has_unfinished_requests()
    assert engine.num_free_blocks() == engine.num_usable_blocks() - 4  # 29 tokens in blocks of 8, held
    assert len(engine.export_kv("h", 0)[0]) == 4
    assert engine.release_kv("h")
    assert_idle(engine)


@pytest.mark.parametrize("stop", ["stop token", "max_tokens"])
def test_a_prefill_only_request_that_really_ends_at_its_first_token_hands_nothing_off(llama_dir, stop):
    ids = prompt(12)
    engine = LLMEngine(model=llama_dir, block_size=8, num_kv_blocks=64)
    first = LLM(model=llama_dir).generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, **GREEDY))
    first_token = first[0].outputs[0].token_ids[0]
    params = (
        SamplingParams(max_tokens=5, stop_token_ids=[first_token], **GREEDY)
        if stop == "stop token"
        else SamplingParams(max_tokens=1, **GREEDY)
    )
    engine.add_request("s", ids, params, prefill_only=True)
    outputs, handoffs = [], []
    while engine.has_unfinished_requests():
        step = engine.step()
        outputs += step
        handoffs += step.handoffs
    assert handoffs == []
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == (
        "stop" if stop == "stop token" else "length"
    )
    assert_idle(engine)


def test_prefill_only_needs_a_single_completion(engine):
    with pytest.raises(InvalidRequestError) as exc:
        engine.add_request("n2", prompt(5), SamplingParams(n=2, max_tokens=4), prefill_only=True)
    assert exc.value.param == "n"
    assert_idle(engine)


def test_import_refused_when_the_cache_is_full_and_mismatched_kv_rejected(llama_dir):
    decode = LLMEngine(model=llama_dir, block_size=8, num_kv_blocks=8)  # 7 usable blocks
    decode.add_request("warm", prompt(40, 300), SamplingParams(max_tokens=2, **GREEDY))
    decode.step()  # "warm" holds 5 blocks, 2 are left
    assert decode.import_request("big", prompt(30), [7], SamplingParams(max_tokens=1)) is None
    assert decode.import_request("ok", prompt(10), [7], SamplingParams(max_tokens=3)) is not None
    with pytest.raises(ValueError):
        decode.import_kv("ok", 0, torch.zeros(2, 1, 8, 2, 16))
    assert decode.abort_request("ok")
    run_to_end(decode)
    assert_idle(decode)


@pytest.mark.parametrize("start", [10, 200, 450, 700])
def test_a_resumed_request_streams_exactly_the_rest_of_the_text(engine, start):
    engine.add_request("full", prompt(6, start), SamplingParams(max_tokens=30, **GREEDY))
    deltas, tokens = [], []  # one step, one token: what a client had after each token
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].delta_text)
            tokens += out.outputs[0].delta_token_ids
    full_text = "".join(deltas)
    for cut in range(1, 30):  # every cut, also inside a character whose bytes span several tokens
        engine.add_request(
            "resume", prompt(6, start), SamplingParams(max_tokens=30, **GREEDY), output_token_ids=tokens[:cut]
        )
        rest_text, rest_tokens = [], []
        while engine.has_unfinished_requests():
            for out in engine.step():
                rest_text.append(out.outputs[0].delta_text)
                rest_tokens += out.outputs[0].delta_token_ids
        assert tokens[:cut] + rest_tokens == tokens
        assert "".join(deltas[:cut]) + "".join(rest_text) == full_text, cut
    assert_idle(engine)


def test_logit_bias_is_honoured_and_checked(engine):
    favourite = 123
    params = SamplingParams(max_tokens=5, logit_bias={favourite: 100.0}, **GREEDY)
    engine.add_request("biased", prompt(7), params)
    finals = run_to_end(engine)
    assert finals["biased"].outputs[0].token_ids == [favourite] * 5
    with pytest.raises(InvalidRequestError) as refused:
        engine.add_request("bad", prompt(7), SamplingParams(logit_bias={10**6: 1.0}))
    assert refused.value.param == "logit_bias"
    assert_idle(engine)


def test_finished_requests_phases_are_counted_and_aborted_ones_are_not(llama_dir):
    engine = LLMEngine(model=llama_dir, block_size=8, num_kv_blocks=64, max_num_batched_tokens=32)
    engine.add_request("done", prompt(20), SamplingParams(max_tokens=4, **GREEDY))
    engine.add_request("gone", prompt(9, 300), SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    engine.abort_request("gone")
    run_to_end(engine)
    phases = engine.scheduler_stats().phase_seconds
    assert sorted(phases) == ["decode", "inference", "prefill", "queue"]
    assert all(phases[p].count == 1 for p in phases)  # "done" alone
    assert phases["inference"].sum_s >= phases["decode"].sum_s >= 0
