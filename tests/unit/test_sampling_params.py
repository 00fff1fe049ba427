"""SamplingParams.validate: every out-of-range field raises InvalidRequestError naming it."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidRequestError
from services.engine.sampling_params import MAX_LOGPROBS, SamplingParams

VOCAB_SIZE = 100

INVALID = [
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"n": 1.5}, "n"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 100.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.01}, "min_p"),
    ({"presence_penalty": -2.1}, "presence_penalty"),
    ({"presence_penalty": 2.1}, "presence_penalty"),
    ({"frequency_penalty": -2.1}, "frequency_penalty"),
    ({"frequency_penalty": 2.1}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 2.1}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
    ({"seed": "7"}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": [3]}, "stop"),
    ({"stop_token_ids": [VOCAB_SIZE]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
]


@pytest.mark.parametrize("fields, param", INVALID, ids=[f"{p}={f}" for f, p in INVALID])
def test_out_of_range_field_is_named(fields, param):
    with pytest.raises(InvalidRequestError) as excinfo:
        SamplingParams(**fields).validate(VOCAB_SIZE)
    assert excinfo.value.param == param


VALID = [
    {},
    {"temperature": 0.0},
    {"temperature": 100.0, "top_p": 1.0, "top_k": -1, "min_p": 1.0},
    {"presence_penalty": -2.0, "frequency_penalty": 2.0, "repetition_penalty": 2.0},
    {"max_tokens": None, "min_tokens": 1000},
    {"max_tokens": 4, "min_tokens": 4},
    {"logprobs": 0},
    {"logprobs": MAX_LOGPROBS},
    {"seed": 0},
    {"stop": ["x"] * 16, "stop_token_ids": [0, VOCAB_SIZE - 1]},
]


@pytest.mark.parametrize("fields", VALID, ids=[str(f) for f in VALID])
def test_boundary_values_are_accepted(fields):
    SamplingParams(**fields).validate(VOCAB_SIZE)


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
