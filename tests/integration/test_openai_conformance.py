"""The API surface OpenAI-API clients and agents rely on, as they use it, against a real `tristage serve`
(colocated, the embedded default model: random weights, so every guarantee here comes from the
server, not from the model): structured outputs, tool calling, echo and prompt logprobs, logit_bias,
/tokenize, /detokenize, /version, /v1/models/{id} and /v1/responses, through the official `openai`
client and LangChain's ChatOpenAI."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

MODEL = "tristage-tiny"

# Bounded fields, so a random model's output always ends within max_tokens: structured outputs
# guarantee the shape, not that an unbounded string ever closes.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Lima", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture
def server(colocated_server):
    return colocated_server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


# ----------------------------------------------------------------------------------------------
# structured outputs


@pytest.mark.parametrize("stream", [False, True])
def test_a_json_schema_answer_always_parses_and_validates(client, stream):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        kwargs = dict(model=MODEL, messages=user("Describe someone"), response_format=response_format, max_tokens=256)
        if stream:
            chunks = client.chat.completions.create(**kwargs, temperature=1.0, seed=seed, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            text = client.chat.completions.create(**kwargs, temperature=1.0, seed=seed).choices[0].message.content
        jsonschema.validate(json.loads(text), PERSON)


def test_vllm_s_constraint_fields_on_both_endpoints(client):
    choice = client.completions.create(
        model=MODEL, prompt="Pick one:", max_tokens=20, extra_body={"guided_choice": ["red", "green blue"]}
    )
    assert choice.choices[0].text in ("red", "green blue")
    regex = client.chat.completions.create(
        model=MODEL,
        messages=user("A code"),
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}},
    )
    assert len(regex.choices[0].message.content) == 6 and regex.choices[0].message.content[2] == "-"
    obj = client.completions.create(
        model=MODEL, prompt="JSON:", max_tokens=200, temperature=0, extra_body={"guided_json": PERSON}
    )
    jsonschema.validate(json.loads(obj.choices[0].text), PERSON)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=user("x"),
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nosuch"}}},
        )
    assert info.value.body["param"] == "response_format"


# ----------------------------------------------------------------------------------------------
# tool calling


def _check_weather_call(call) -> None:
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


def test_a_named_or_required_tool_call_always_has_valid_arguments(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        out = client.chat.completions.create(
            model=MODEL,
            messages=user("Weather?"),
            tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice=named,
            seed=seed,
            temperature=1.0,
            max_tokens=100,
        )
        assert out.choices[0].finish_reason == "stop"  # OpenAI's for a named function
        _check_weather_call(out.choices[0].message.tool_calls[0])
    required = client.chat.completions.create(
        model=MODEL,
        messages=user("Weather?"),
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
    )
    assert required.choices[0].finish_reason == "tool_calls"
    [call] = required.choices[0].message.tool_calls
    _check_weather_call(call)


def test_streamed_tool_call_deltas_add_up_to_the_whole_answer(client):
    kwargs = dict(
        model=MODEL,
        messages=user("Weather?"),
        tools=[WEATHER_TOOL],
        tool_choice="required",
        temperature=0,
        max_tokens=100,
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole
    ]


def test_tool_history_renders_and_auto_without_a_parser_is_refused_by_name(client):
    history = user("Weather in Oslo?") + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=4
    )
    assert out.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError) as info:  # the default model's template has no tool-call format
        client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL], max_tokens=4)
    assert info.value.body["param"] == "tool_choice"


# ----------------------------------------------------------------------------------------------
# echo, prompt logprobs, logit_bias, tokenization


def test_echo_with_logprobs_as_lm_evaluation_harness_asks(client):
    prompt = "The quick brown fox"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, logprobs=1, echo=True, temperature=0)
    choice = choice_ = out.choices[0]
    assert choice.text.startswith(prompt)
    logprobs = choice_.logprobs
    assert logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens) == choice.text and logprobs.text_offset[0] == 0
    with_prompt = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    positions = with_prompt.choices[0].model_extra["prompt_logprobs"]
    assert positions[0] is None and len(positions) == len(logprobs.tokens) - 1
    assert [max(v["logprob"] for v in p.values() if v["rank"] > 0) <= 0 for p in positions[1:]]


def test_logit_bias_tokenize_detokenize_version_and_model(server, client):
    base = server.base_url
    tokens = httpx.post(base + "/tokenize", json={"model": MODEL, "prompt": "hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert (
        httpx.post(base + "/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}).json()["prompt"]
        == "hello world"
    )
    assert httpx.get(base + "/version").json()["version"]
    assert client.models.retrieve(MODEL).id == MODEL
    forced = tokens["tokens"][0]
    out = client.completions.create(
        model=MODEL, prompt=[5, 6, 7], max_tokens=4, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True}
    )
    assert (
        httpx.post(base + "/tokenize", json={"model": MODEL, "prompt": out.choices[0].text}).json()["tokens"]
        == [forced] * 4
    )


# ----------------------------------------------------------------------------------------------
# /v1/responses


def test_the_responses_api_answers_text_streamed_or_not(client):
    response = client.responses.create(model=MODEL, input="Hello", instructions="Be brief", max_output_tokens=8)
    assert response.status in ("completed", "incomplete") and isinstance(response.output_text, str)
    assert response.usage.output_tokens <= 8
    events = list(client.responses.create(model=MODEL, input="Hello", max_output_tokens=8, stream=True))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text


# ----------------------------------------------------------------------------------------------
# LangChain


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]


class GetWeather(pydantic.BaseModel):
    """The forecast for a city."""

    city: Literal["Paris", "Lima", "Oslo"]
    days: int = pydantic.Field(ge=1, le=7)


def test_langchain_with_structured_output_and_bind_tools(server):
    from langchain_openai import ChatOpenAI

    # greedy, and strict schemas (no properties beyond the model's): a random model's output then always
    # closes the object within max_tokens, whatever the engine's sampling stream has served before
    llm = ChatOpenAI(
        model=MODEL, base_url=server.base_url + "/v1", api_key="unused", max_tokens=256, max_retries=0, temperature=0
    )
    person = llm.with_structured_output(Person, strict=True).invoke("Describe someone")
    assert isinstance(person, Person)
    message = llm.bind_tools([GetWeather], tool_choice="GetWeather", strict=True).invoke("Weather?")
    [call] = message.tool_calls
    assert call["name"] == "GetWeather" and GetWeather(**call["args"])
