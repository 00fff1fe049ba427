"""POST /v1/responses end to end over loopback: the real app under uvicorn over the fake backend of
test_gateway (or, for tools and formats, the scripted one of test_tool_calls), driven by the official
`openai` client, with the raw body and events checked against the client's own types (`Response`,
`ResponseStreamEvent`)."""

from __future__ import annotations

import asyncio
import json

import httpx
import msgspec
import openai
import pydantic
import pytest
import transformers
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from services.common.messages import CompletionDelta
from services.gateway.app import create_app
from services.gateway.config import GatewayConfig
from services.gateway.protocol import ResponsesRequest, Usage
from services.gateway.responses import ChoiceState
from services.gateway.responses_api import chat_request
from services.gateway.responses_output import ResponsesFormatter
from services.gateway.tool_parsers import make_parser
from services.gateway.tools import ToolPlan
from tests.unit.test_gateway import API_KEY, MODEL, FakeBackend, _word, counters_are_zero, running_server, wait_until
from tests.unit.test_tool_calls import ScriptedBackend

STREAM_EVENT: TypeAdapter = TypeAdapter(ResponseStreamEvent)


class ResponsesBackend(ScriptedBackend):
    """With a `script`, test_tool_calls' fake (it answers the script, then stops); without, test_gateway's,
    whose last delta ends with `finish_reason` when one is set (the fake's own is "length": it always runs
    to max_tokens)."""

    finish_reason: str | None = None

    async def generate(self, *args, **kwargs):
        if self.script:
            async for delta in super().generate(*args, **kwargs):
                yield delta
            return
        async for delta in FakeBackend.generate(self, *args, **kwargs):
            if delta.finished and self.finish_reason is not None:
                completions = [msgspec.structs.replace(c, finish_reason=self.finish_reason) for c in delta.completions]
                delta = msgspec.structs.replace(delta, completions=completions)
            yield delta


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def gateway(hf_tokenizer):
    backend = ResponsesBackend(hf_tokenizer)
    app = create_app(GatewayConfig(served_model_name=MODEL, api_keys=(API_KEY,)), backend)
    with running_server(app) as base_url:
        yield app, backend, base_url


@pytest.fixture
def served(gateway):
    app, backend, base_url = gateway
    backend.reset()
    backend.finish_reason = "stop"
    yield app, backend, base_url
    wait_until(lambda: counters_are_zero(app))


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served[2]}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served[2], headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as http:
        yield http


def sse_events(response: httpx.Response) -> list[dict]:
    """Each event's data, checked to repeat its `event:` line's type."""
    events, kind = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            event = json.loads(line.removeprefix("data: "))
            assert event["type"] == kind
            events.append(event)
    return events


# ----------------------------------------------------------------------------------------------
# Non-streaming


def test_a_response_parses_as_the_client_s_type_and_carries_the_chat_s_prompt(served, client, http, hf_tokenizer):
    _, backend, _ = served
    body = {
        "model": MODEL,
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": "Say hello"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Again"}, {"type": "input_text", "text": "!"}]},
        ],
        "max_output_tokens": 3,
        "temperature": 0.5,
        "metadata": {"ticket": "42"},
        "store": True,
        "service_tier": "auto",  # harmless: ignored
    }
    reply = http.post("/v1/responses", json=body)
    assert reply.status_code == 200, reply.text
    raw = reply.json()
    response = Response.model_validate(raw)  # every field of the client's type, validated
    assert response.id.startswith("resp_") and reply.headers["x-request-id"] == response.id
    assert (response.object, response.status, response.model) == ("response", "completed", MODEL)
    assert response.output_text == _word(0) * 3 and response.incomplete_details is None
    [message] = response.output
    assert message.id.startswith("msg_") and (message.role, message.status) == ("assistant", "completed")
    assert [c.model_dump() for c in message.content] == [
        {"type": "output_text", "text": _word(0) * 3, "annotations": [], "logprobs": None}
    ]
    assert "output_text" not in raw and raw["store"] is False and raw["metadata"] == {"ticket": "42"}
    assert (raw["temperature"], raw["top_p"], raw["max_output_tokens"]) == (0.5, 1.0, 3)
    assert (raw["tools"], raw["tool_choice"], raw["text"]["format"]) == ([], "auto", {"type": "text"})
    [(request_id, prompt, sampling, _)] = backend.requests
    expected = hf_tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello"},
            {"role": "assistant", "content": "Hi"},
            {"role": "user", "content": "Again\n!"},
        ],
        add_generation_prompt=True,
        return_dict=False,
    )
    assert request_id == response.id and prompt == list(expected)
    assert (sampling.max_tokens, sampling.temperature, sampling.n) == (3, 0.5, 1)
    usage = response.usage
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (len(prompt), 3)
    assert usage.total_tokens == len(prompt) + 3 and usage.input_tokens_details.cached_tokens == 3
    assert usage.output_tokens_details.reasoning_tokens == 0
    # the client itself, with a string input
    assert client.responses.create(model=MODEL, input="Say hello", max_output_tokens=2).output_text == _word(0) * 2


def test_hitting_max_output_tokens_leaves_the_response_incomplete(served, client):
    _, backend, _ = served
    backend.finish_reason = None  # the fake's own: "length"
    response = client.responses.create(model=MODEL, input="Say hello", max_output_tokens=2)
    assert response.status == "incomplete" and response.output[0].status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == _word(0) * 2


# ----------------------------------------------------------------------------------------------
# Streaming


def test_stream_events_in_order_each_the_client_s_type(http, client):
    body = {"model": MODEL, "input": "Say hello", "max_output_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/responses", json=body) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        events = sse_events(reply)
    for event in events:
        STREAM_EVENT.validate_python(event)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    created, final = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    assert final["id"] == created["id"] and final["status"] == "completed" and final["usage"]["output_tokens"] == 2
    item_id = events[2]["item"]["id"]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all((e["item_id"], e["output_index"], e["content_index"]) == (item_id, 0, 0) for e in deltas)
    assert "".join(e["delta"] for e in deltas) == events[6]["text"] == final["output"][0]["content"][0]["text"]
    assert events[8]["item"] == final["output"][0]
    # the client iterates the same stream
    stream = client.responses.create(model=MODEL, input="Say hello", max_output_tokens=2, stream=True)
    types = [event.type for event in stream]
    assert types[0] == "response.created" and types[-1] == "response.completed"


def test_a_failure_mid_stream_is_an_error_event_then_response_failed(served, http):
    _, backend, _ = served
    backend.fail_after_steps = 1
    body = {"model": MODEL, "input": "Say hello", "max_output_tokens": 5, "stream": True}
    with http.stream("POST", "/v1/responses", json=body) as reply:
        assert reply.status_code == 200
        events = sse_events(reply)
    for event in events:
        STREAM_EVENT.validate_python(event)
    error, failed = events[-2:]
    assert error == {
        "type": "error",
        "sequence_number": len(events) - 2,
        "code": "server_error",
        "message": "The server had an error while processing your request.",
        "param": None,
    }
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "server_error"
    assert failed["response"]["output"][0]["content"][0]["text"] == _word(0)


# ----------------------------------------------------------------------------------------------
# Refusals and errors


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"background": True}, "background"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"max_tokens": 3}, "max_tokens"),  # chat's name: would change the length, so never ignored
        ({"seed": 1}, "seed"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),  # a chat field: refused here unless at its default
        ({"skip_special_tokens": False}, "skip_special_tokens"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"input": []}, "input"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input"),
        ({"temperature": 3}, "temperature"),
        ({"max_output_tokens": 256}, "max_output_tokens"),  # the whole context: chat's check, this API's name
        ({"input": "w " * 400}, "input"),  # past the context: chat's check, this API's name
    ],
)
def test_refusals_name_the_field(served, http, fields, param):
    reply = http.post("/v1/responses", json={"model": MODEL, "input": "hi", **fields})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error
    assert not served[1].requests


@pytest.mark.parametrize(
    "fields",
    [
        {"reasoning": None, "tool_choice": "none", "tools": [], "include": [], "truncation": "disabled"},
        {"text": {"format": {"type": "text"}}, "parallel_tool_calls": False, "user": "u", "top_logprobs": 2},
        {
            "store": False,
            "seed": None,
            "n": 1,
            "prompt_cache_key": "k",
            "stream_options": {"include_obfuscation": False},
        },
        {"presence_penalty": 0, "ignore_eos": False, "skip_special_tokens": True, "reasoning": {"effort": None}},
    ],
)
def test_harmless_fields_are_accepted(http, fields):
    reply = http.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 1, **fields})
    assert reply.status_code == 200, reply.text
    if "parallel_tool_calls" in fields:
        assert reply.json()["parallel_tool_calls"] is False


def test_errors_have_the_chat_route_s_statuses(served, client, http):
    _, backend, base_url = served
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="nope", input="hi")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).responses.create(
            model=MODEL, input="x"
        )
    assert http.post("/v1/responses", content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415
    assert http.post("/v1/responses", content=b"{", headers={"Content-Type": "application/json"}).status_code == 400
    backend.ready = False
    with pytest.raises(openai.InternalServerError) as unavailable:
        client.responses.create(model=MODEL, input="hi")
    assert unavailable.value.status_code == 503 and unavailable.value.response.headers["retry-after"] == "1"
    assert not backend.requests


def test_admission_refuses_with_429_as_on_chat(served):
    app, backend, base_url = served
    asyncio.run(_admission_429(app, backend, base_url))


async def _admission_429(app, backend, base_url) -> None:
    admission = app.state.admission
    limit, admission.max_queued_requests = admission.max_queued_requests, 1
    backend.token_delay_s = 0.5  # the first request stays queued while the second arrives
    try:
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0) as client:
            first = asyncio.create_task(client.responses.create(model=MODEL, input="hi", max_output_tokens=1))
            while admission.num_queued_requests == 0:
                await asyncio.sleep(0.005)
            with pytest.raises(openai.RateLimitError) as refused:
                await client.responses.create(model=MODEL, input="hi", max_output_tokens=1)
            assert refused.value.response.headers["retry-after"] == "1"
            assert (await first).output_text == _word(0)
    finally:
        admission.max_queued_requests = limit


# ----------------------------------------------------------------------------------------------
# Function tools and structured text (the model's output scripted)

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
TIME = {"type": "function", "name": "get_time"}
NAMED_WEATHER = {"type": "function", "name": "get_weather"}


def _stream(http: httpx.Client, body: dict) -> list[dict]:
    """The stream's events, each checked to be the client's type and numbered in order."""
    with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as reply:
        assert reply.status_code == 200, reply.read()
        events = sse_events(reply)
    for event in events:
        STREAM_EVENT.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_a_named_function_answers_one_function_call_item(served, client, http):
    _, backend, _ = served
    backend.script = ['{"city"', ': "Par', 'is"}']
    body = {"model": MODEL, "input": "Weather in Paris?", "tools": [WEATHER, TIME], "tool_choice": NAMED_WEATHER}
    reply = http.post("/v1/responses", json=body)
    assert reply.status_code == 200, reply.text
    raw = reply.json()
    response = Response.model_validate(raw)
    [call] = raw["output"]
    assert call["id"].startswith("fc_") and call["call_id"].startswith("call_")
    assert call == {
        "type": "function_call",
        "id": call["id"],
        "call_id": call["call_id"],
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
        "status": "completed",
    }
    assert response.status == "completed" and response.output_text == ""
    assert (raw["tools"], raw["tool_choice"]) == ([WEATHER, TIME], NAMED_WEATHER)  # echoed as given
    spec = backend.requests[-1][2].structured  # held to the function's parameters, as on chat
    assert spec is not None and json.loads(spec.value) == WEATHER["parameters"]

    events = _stream(http, body)
    deltas = events[3:-3]  # as the text comes (pieces that arrive together come as one)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * len(deltas),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added, done, final = events[2]["item"], events[-2]["item"], events[-1]["response"]
    assert (added["type"], added["name"], added["arguments"], added["status"]) == (
        "function_call",
        "get_weather",
        "",
        "in_progress",
    )
    assert deltas and all((e["item_id"], e["output_index"]) == (added["id"], 0) for e in events[3:-2])
    assert "".join(e["delta"] for e in deltas) == events[-3]["arguments"] == '{"city": "Paris"}'
    assert final["output"] == [done] == [{**added, "arguments": '{"city": "Paris"}', "status": "completed"}]
    # the client's stream helper puts the same events together
    with client.responses.stream(model=MODEL, input="Weather?", tools=[WEATHER], tool_choice=NAMED_WEATHER) as stream:
        [streamed_call] = stream.get_final_response().output
    assert streamed_call.type == "function_call" and streamed_call.arguments == '{"city": "Paris"}'


def test_required_answers_a_function_call_item_for_each_call(served, http):
    _, backend, _ = served
    backend.script = ['[{"name":"get_time","parameters":{}},', '{"name":"get_weather","parameters":{"city":"Oslo"}}]']
    body = {"model": MODEL, "input": "Time and weather?", "tools": [WEATHER, TIME], "tool_choice": "required"}
    raw = http.post("/v1/responses", json=body).json()
    response = Response.model_validate(raw)
    assert [(c["name"], c["arguments"], c["status"]) for c in raw["output"]] == [
        ("get_time", "{}", "completed"),
        ("get_weather", '{"city": "Oslo"}', "completed"),
    ]
    assert response.status == "completed" and len({c["call_id"] for c in raw["output"]}) == 2

    events = _stream(http, body)
    call_events = [
        "response.output_item.added",
        "response.function_call_arguments.delta",  # a whole call at once, when its JSON closes (as on chat)
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        *call_events,
        *call_events,  # the first call is done before the second is added
        "response.completed",
    ]
    assert [e["output_index"] for e in events[2:-1]] == [0] * 4 + [1] * 4
    assert events[-1]["response"]["output"] == [events[5]["item"], events[9]["item"]]
    assert [item["arguments"] for item in events[-1]["response"]["output"]] == ["{}", '{"city": "Oslo"}']

    http.post("/v1/responses", json={**body, "parallel_tool_calls": False})
    spec = backend.requests[-1][2].structured  # passed on: one call at most
    assert spec is not None and json.loads(spec.value)["maxItems"] == 1


HISTORY = [
    {"role": "user", "content": "Weather and time in Paris?"},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
    # sent back as an earlier response gave them: their id and status are ignored
    {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
        "status": "completed",
    },
    {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
    {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "noon"}]},
]
CHAT_HISTORY = [
    {"role": "user", "content": "Weather and time in Paris?"},
    {
        "role": "assistant",
        "content": [{"type": "text", "text": "Let me look."}],
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
]


def test_function_call_items_are_the_chat_s_tool_history(served, http):
    _, backend, _ = served
    body = {"model": MODEL, "input": HISTORY, "tools": [WEATHER, TIME], "tool_choice": "required"}
    chat = chat_request(ResponsesRequest.model_validate(body))
    assert [m.model_dump(exclude_none=True) for m in chat.messages] == CHAT_HISTORY
    assert [t.model_dump(exclude_none=True) for t in chat.tools or ()] == [
        {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}},
        {"type": "function", "function": {"name": "get_time"}},
    ]
    # end to end: the prompt and the constraint of the chat request it stands for
    backend.script = ['[{"name":"get_time","parameters":{}}]']
    assert http.post("/v1/responses", json=body).status_code == 200
    chat_body = {"model": MODEL, "messages": CHAT_HISTORY, "tools": [t.model_dump() for t in chat.tools or ()]}
    assert http.post("/v1/chat/completions", json={**chat_body, "tool_choice": "required"}).status_code == 200
    [(_, responses_prompt, responses_sampling, _), (_, chat_prompt, chat_sampling, _)] = backend.requests
    assert responses_prompt == chat_prompt and responses_sampling.structured == chat_sampling.structured


class Place(pydantic.BaseModel):
    city: str


def test_text_format_constrains_the_output_and_is_echoed(served, client, http):
    _, backend, _ = served
    backend.script = ['{"city": ', '"Paris"}']
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    text_format = {"type": "json_schema", "name": "place", "description": "A city", "schema": schema, "strict": True}
    raw = http.post("/v1/responses", json={"model": MODEL, "input": "Where?", "text": {"format": text_format}}).json()
    response = Response.model_validate(raw)
    assert response.output_text == '{"city": "Paris"}' and raw["text"]["format"] == text_format
    spec = backend.requests[-1][2].structured
    assert spec is not None and (spec.kind, json.loads(spec.value)) == ("json", schema)
    assert client.responses.parse(model=MODEL, input="Where?", text_format=Place).output_parsed == Place(city="Paris")
    json_object = {"type": "json_object"}
    raw = http.post("/v1/responses", json={"model": MODEL, "input": "Where?", "text": {"format": json_object}}).json()
    assert raw["text"]["format"] == json_object and backend.requests[-1][2].structured.kind == "json_object"


@pytest.mark.parametrize(
    "fields, param, message",
    [
        ({"tools": [{"type": "file_search"}]}, "tools", "tools[0].type must be 'function'"),
        ({"tools": [{"type": "function", "description": "no name"}]}, "tools", "'tools[0].name'"),
        ({"tools": [TIME, TIME], "tool_choice": "required"}, "tools", "tools[1].name: the tool name 'get_time'"),
        (
            {"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]},
            "tools",
            "tools[0].parameters must be",
        ),
        ({"tools": [WEATHER]}, "tool_choice", "--tool-call-parser"),  # "auto": no parser for this model
        ({"tools": [WEATHER], "tool_choice": {"type": "web_search"}}, "tool_choice", "type 'web_search'"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "f"}}, "tool_choice", "not among tools"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
            "tool_choice",
            "cannot be combined with text.format",
        ),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "'text.format.schema'"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nosuch"}}}},
            "text.format",
            "text.format does not compile",
        ),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input", "'input[0].call_id'"),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]},
            "input",
            "input[0].arguments must be a JSON object",
        ),
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input", "'input[0].output'"),
    ],
)
def test_tool_and_format_refusals_name_this_api_s_fields(served, http, fields, param, message):
    reply = http.post("/v1/responses", json={"model": MODEL, "input": "hi", **fields})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["param"], message in error["message"]) == (param, True), error
    assert "function." not in error["message"] and "response_format" not in error["message"]
    assert not served[1].requests


def test_with_a_parser_text_before_the_calls_is_a_message_item_and_space_after_them_is_none():
    """tool_choice "auto" on a model whose calls the server reads (hermes here): the formatter alone, fed
    the output as the pipeline feeds it."""
    request = ResponsesRequest.model_validate({"model": MODEL, "input": "x", "tools": [WEATHER], "stream": True})
    plan = ToolPlan("auto", make_parser("hermes"))
    output = [
        "Let me check.",
        "<tool_",
        'call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
        "\n",
    ]
    usage = Usage(prompt_tokens=1, completion_tokens=len(output), total_tokens=1 + len(output))
    formatter = ResponsesFormatter(request, "resp_1", MODEL, plan)
    events, choice = formatter.stream_start(1), ChoiceState(index=0)
    for step, piece in enumerate(output):
        finish_reason = "stop" if step == len(output) - 1 else None
        events += formatter.stream_delta(
            choice, CompletionDelta(index=0, token_ids=[step], text=piece, finish_reason=finish_reason)
        )
    events += formatter.stream_end(usage)
    parsed = [STREAM_EVENT.validate_json(event.split("data: ", 1)[1]) for event in events]
    assert [(e.type, getattr(e, "output_index", None)) for e in parsed] == [
        ("response.created", None),
        ("response.in_progress", None),
        ("response.output_item.added", 0),
        ("response.content_part.added", 0),
        ("response.output_text.delta", 0),
        ("response.output_text.done", 0),
        ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.done", 1),
        ("response.output_item.done", 1),
        ("response.completed", None),
    ]
    message, call = parsed[-1].response.output
    assert message.type == "message" and message.content[0].text == "Let me check."  # the "\n" after is none
    assert call.type == "function_call" and (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')
    whole = ResponsesFormatter(request, "resp_2", MODEL, plan).response(
        [ChoiceState(index=0, texts=output, finish_reason="stop")], usage
    )
    assert [(item.type, item.status) for item in whole.output] == [
        ("message", "completed"),
        ("function_call", "completed"),
    ]
    assert whole.output[0].content[0].text == "Let me check." and whole.output[1].arguments == call.arguments
