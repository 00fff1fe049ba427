"""Sampler: greedy, raw logprobs, min_tokens, penalties, filters, seeded reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from services.engine.request import Request
from services.engine.sampler import Sampler, _apply_penalties
from services.engine.sampling_params import SamplingParams

VOCAB_SIZE = 32


def make_request(
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos_token_id: int | None = None,
) -> Request:
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    return Request(
        request_id="r",
        prompt_token_ids=list(prompt or [0]),
        sampling_params=params,
        eos_token_id=eos_token_id,
        max_output_tokens=64,
        generator=generator,
        output_token_ids=list(output or []),
    )


def logits_from_probs(probs: list[float], num_rows: int = 1) -> torch.Tensor:
    return torch.tensor(probs).log().repeat(num_rows, 1)  # [num_rows, len(probs)]


def test_greedy_takes_argmax_of_each_row():
    logits = torch.randn(5, VOCAB_SIZE, generator=torch.Generator().manual_seed(0))
    requests = [make_request(SamplingParams(temperature=0.0)) for _ in range(5)]
    assert Sampler()(logits, requests).token_ids == logits.argmax(dim=-1).tolist()


def test_low_precision_logits_are_accepted():
    logits = torch.randn(3, VOCAB_SIZE, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    requests = [make_request(SamplingParams(temperature=0.0)) for _ in range(3)]
    assert Sampler()(logits, requests).token_ids == logits.float().argmax(dim=-1).tolist()


def test_logprobs_come_from_raw_logits_with_top_ids_and_ranks():
    logits = torch.randn(3, VOCAB_SIZE, generator=torch.Generator().manual_seed(2))
    requests = [
        # processing (penalty, temperature, top-k) must not leak into the reported logprobs
        make_request(
            SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5, logprobs=5, seed=3), prompt=[1, 2, 3]
        ),
        make_request(SamplingParams(temperature=0.0)),
        make_request(SamplingParams(temperature=0.0, logprobs=0)),
    ]
    out = Sampler()(logits, requests)
    raw = torch.log_softmax(logits, dim=-1)

    assert out.logprobs[1] is None
    assert list(out.logprobs[2]) == [out.token_ids[2]]  # logprobs=0: the sampled token only
    assert out.logprobs[2][out.token_ids[2]] == (pytest.approx(raw[2, out.token_ids[2]].item()), 1)

    entry = out.logprobs[0]
    top_ids = raw[0].topk(5).indices.tolist()
    assert set(entry) == set(top_ids) | {out.token_ids[0]}
    for token_id, (logprob, rank) in entry.items():
        assert logprob == pytest.approx(raw[0, token_id].item(), abs=1e-6)
        assert rank == 1 + int((raw[0] > raw[0, token_id]).sum())
    assert [entry[t][1] for t in top_ids] == [1, 2, 3, 4, 5]


def test_logprob_ranks_share_a_rank_on_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    out = Sampler()(logits, [make_request(SamplingParams(temperature=0.0, logprobs=3))])
    assert sorted(rank for _, rank in out.logprobs[0].values()) == [1, 1, 3]


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.zeros(1, VOCAB_SIZE)
    logits[0, 3], logits[0, 5], logits[0, 7] = 9.0, 8.0, 7.0  # eos, stop id, runner-up
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5])
    early = make_request(params, output=[11], eos_token_id=3)
    enough = make_request(params, output=[11, 12], eos_token_id=3)
    assert Sampler()(logits.repeat(2, 1), [early, enough]).token_ids == [7, 3]


def test_min_tokens_without_eos_id_masks_stop_ids_only():
    logits = torch.zeros(1, VOCAB_SIZE)
    logits[0, 5], logits[0, 7] = 9.0, 8.0
    request = make_request(SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[7]), eos_token_id=None)
    assert Sampler()(logits, [request]).token_ids == [5]


# Hand-computed penalties on a 6-token vocabulary. Prompt [0, 1], output [2, 2, 3]:
#   seen (prompt + output) = {0, 1, 2, 3}; output counts = {2: 2, 3: 1}.
PENALTY_LOGITS = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]


@pytest.mark.parametrize(
    "params, expected",
    [
        # repetition 2: positive seen logits halved, negative seen logits doubled, unseen (4, 5) untouched
        (SamplingParams(repetition_penalty=2.0), [1.0, -2.0, 0.25, 1.5, -2.0, 1.0]),
        # frequency 0.5 × count over output tokens only
        (SamplingParams(frequency_penalty=0.5), [2.0, -1.0, -0.5, 2.5, -2.0, 1.0]),
        # presence 0.25 once per distinct output token
        (SamplingParams(presence_penalty=0.25), [2.0, -1.0, 0.25, 2.75, -2.0, 1.0]),
        # negative presence rewards repeats
        (SamplingParams(presence_penalty=-1.0), [2.0, -1.0, 1.5, 4.0, -2.0, 1.0]),
        # all three: repetition first, then frequency and presence
        (
            SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
            [1.0, -2.0, 0.25 - 1.0 - 0.25, 1.5 - 0.5 - 0.25, -2.0, 1.0],
        ),
    ],
)
def test_each_penalty_changes_exactly_the_expected_logits(params, expected):
    logits = torch.tensor([PENALTY_LOGITS, PENALTY_LOGITS])
    requests = [
        make_request(params, prompt=[0, 1], output=[2, 2, 3]),
        make_request(SamplingParams(), prompt=[0, 1], output=[2, 2, 3]),
    ]  # neutral row
    _apply_penalties(logits, requests)
    assert logits[0].tolist() == pytest.approx(expected)
    assert logits[1].tolist() == PENALTY_LOGITS


def test_penalties_handle_rows_without_output():
    logits = torch.tensor([PENALTY_LOGITS])
    _apply_penalties(logits, [make_request(SamplingParams(frequency_penalty=1.0), prompt=[0])])
    assert logits[0].tolist() == PENALTY_LOGITS


def test_top_k_one_equals_greedy():
    logits = torch.randn(64, VOCAB_SIZE, generator=torch.Generator().manual_seed(4))
    requests = [make_request(SamplingParams(temperature=1.5, top_k=1)) for _ in range(64)]
    assert Sampler()(logits, requests).token_ids == logits.argmax(dim=-1).tolist()


NUM_DRAWS = 4000
FILTER_PROBS = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(top_p=0.75), {0, 1}),  # 0.5 < 0.75 <= 0.8
        (SamplingParams(top_p=0.1), {0}),  # the top token is always kept
        (SamplingParams(min_p=0.2), {0, 1, 2}),  # threshold 0.2 × 0.5 = 0.1
        (SamplingParams(min_p=0.7), {0}),
        (SamplingParams(top_k=3), {0, 1, 2}),
        (SamplingParams(top_p=0.82), {0, 1, 2}),  # 0.8 < 0.82
        # top-p runs on the renormalised top-3 [0.53, 0.32, 0.16]: 0.84 >= 0.82 cuts token 2
        (SamplingParams(top_k=3, top_p=0.82), {0, 1}),
    ],
)
def test_filters_never_sample_an_excluded_token(params, allowed):
    torch.manual_seed(5)
    requests = [make_request(params) for _ in range(NUM_DRAWS)]
    token_ids = Sampler()(logits_from_probs(FILTER_PROBS, NUM_DRAWS), requests).token_ids
    assert set(token_ids) == allowed


def test_seeded_rows_do_not_depend_on_the_batch():
    seeded_a = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    seeded_b = SamplingParams(temperature=1.2, top_k=5, min_p=0.05, seed=11)
    others = [SamplingParams(temperature=1.0, repetition_penalty=1.3), SamplingParams(temperature=0.0)]
    steps = [torch.randn(4, VOCAB_SIZE, generator=torch.Generator().manual_seed(s)) for s in range(8)]

    alone_a, alone_b = make_request(seeded_a), make_request(seeded_b)
    batched = [make_request(others[0]), make_request(seeded_b), make_request(others[1]), make_request(seeded_a)]
    sampler = Sampler()
    for step_logits in steps:
        # row 0 of the step belongs to request a, row 1 to request b; the batch puts them elsewhere
        token_a = sampler(step_logits[0:1], [alone_a]).token_ids[0]
        token_b = sampler(step_logits[1:2], [alone_b]).token_ids[0]
        batch_logits = step_logits[[2, 1, 3, 0]]
        out = sampler(batch_logits, batched).token_ids
        assert (out[3], out[1]) == (token_a, token_b)


def test_same_seed_gives_the_same_tokens():
    logits = torch.zeros(1, VOCAB_SIZE)  # uniform: every draw depends on the generator alone
    params = SamplingParams(seed=123)
    first, second = make_request(params), make_request(params)
    sampler = Sampler()
    tokens_first = [sampler(logits, [first]).token_ids[0] for _ in range(20)]
    tokens_second = [sampler(logits, [second]).token_ids[0] for _ in range(20)]
    assert tokens_first == tokens_second
    assert len(set(tokens_first)) > 1


def test_unseeded_sampling_follows_the_distribution():
    torch.manual_seed(6)
    probs = [0.1, 0.2, 0.3, 0.4]
    num_draws = 20000
    requests = [make_request(SamplingParams()) for _ in range(num_draws)]
    token_ids = torch.tensor(Sampler()(logits_from_probs(probs, num_draws), requests).token_ids)
    frequencies = torch.bincount(token_ids, minlength=4).float() / num_draws
    # 4 standard errors of a binomial proportion at n = 20000 is about 0.014
    for observed, expected in zip(frequencies.tolist(), probs):
        assert observed == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / num_draws))


def test_temperature_sharpens_the_distribution():
    torch.manual_seed(7)
    num_draws = 4000
    requests = [make_request(SamplingParams(temperature=0.25)) for _ in range(num_draws)]
    token_ids = Sampler()(logits_from_probs([0.4, 0.6], num_draws), requests).token_ids
    # p ∝ [0.4^4, 0.6^4] = [0.165, 0.835]
    assert sum(token_ids) / num_draws == pytest.approx(0.835, abs=0.03)


def test_logit_bias_moves_greedy_and_random_choices_but_not_the_reported_logprobs():
    logits = torch.randn(2, VOCAB_SIZE, generator=torch.Generator().manual_seed(9))
    favourite = int(logits[0].argmin())
    forced = make_request(SamplingParams(temperature=0.0, logit_bias={favourite: 100.0}, logprobs=0))
    banned_top = int(logits[1].argmax())
    banned = make_request(SamplingParams(temperature=1.0, seed=4, logit_bias={banned_top: -100.0}))
    out = Sampler()(logits, [forced, banned])
    assert out.token_ids[0] == favourite
    assert out.token_ids[1] != banned_top
    raw = torch.log_softmax(logits[0], dim=-1)[favourite].item()
    assert out.logprobs[0][favourite][0] == pytest.approx(raw, abs=1e-5)  # logprobs are of the raw logits
