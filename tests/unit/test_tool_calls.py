"""Tool calling on /v1/chat/completions: the parsers (whole and streamed), the request checks, the
chat template's rendering of tools and tool history, the output constraint of "required" and named
calls, and the gateway end to end over a scripted fake backend."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import transformers

from services.common.messages import CompletionDelta, RequestDelta, SamplingSpec
from services.common.structured import check_compiles
from services.engine.default_model import CHAT_TEMPLATE
from services.gateway.app import create_app
from services.gateway.config import GatewayConfig
from services.gateway.prompts import render_chat
from services.gateway.protocol import ChatCompletionRequest, ChatMessage
from services.gateway.tool_parsers import (
    ToolCall,
    constrained_array_parser,
    detect_parser,
    json_value_end,
    make_parser,
)
from services.gateway.tools import template_tools, tool_constraint
from tests.unit.test_gateway import MODEL, FakeBackend, running_server, sse_payloads

# A ChatML template that renders tools and tool calls the Hermes way (written for these tests).
HERMES_TEMPLATE = (
    "{%- if tools -%}"
    '<|im_start|>system\nCall a function by writing <tool_call>{"name": ..., "arguments": {...}}</tool_call>.'
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}<|im_end|>\n"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{%- for call in message.tool_calls or [] -%}"
    "<tool_call>{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>"
    "{%- endfor -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


def _calls(*pairs: tuple[str, dict]) -> list[ToolCall]:
    return [ToolCall(name, json.dumps(arguments)) for name, arguments in pairs]


# ----------------------------------------------------------------------------------------------
# Parsers

PARSER_CASES = [
    # (parser, output, content, calls)
    (
        "hermes",
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "Let me look.\n",
        _calls(("get_weather", {"city": "Paris"})),
    ),
    (
        "hermes",
        '<tool_call>{"name": "a", "arguments": {"x": "</tool_call"}}</tool_call>\n<tool_call>{"name": "b"}</tool_call>',
        "",
        _calls(("a", {"x": "</tool_call"}), ("b", {})),
    ),
    (
        "hermes",  # a block that does not parse stays content; the next one is still a call
        'a <tool_call>{"name": oops}</tool_call> b <tool_call>{"name": "c", "arguments": "{\\"k\\": 1}"}',
        'a <tool_call>{"name": oops}</tool_call> b ',
        _calls(("c", {"k": 1})),
    ),
    ("hermes", "<tool_call>{no json", "<tool_call>{no json", []),
    ("hermes", "plain <tool_c", "plain <tool_c", []),
    (
        "llama3_json",
        ' {"name": "f", "parameters": {"s": "}{;\\""}}; {"name": "g", "parameters": {}}',
        "",
        _calls(("f", {"s": '}{;"'}), ("g", {})),
    ),
    ("llama3_json", '<|python_tag|>{"name": "f", "arguments": {"n": 1}}', "", _calls(("f", {"n": 1}))),
    ("llama3_json", 'Call {"name": "f", "parameters": {}}', 'Call {"name": "f", "parameters": {}}', []),
    ("llama3_json", '{"answer": 42} done', '{"answer": 42} done', []),  # JSON that is no call
    ("llama3_json", '{"name": "f", "parameters": {"a": [1, 2', '{"name": "f", "parameters": {"a": [1, 2', []),
    (
        "mistral",
        'Sure. [TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]',
        "Sure. ",
        _calls(("f", {"a": 1}), ("g", {})),
    ),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": 3}]', '[TOOL_CALLS][{"name": "f", "arguments": 3}]', []),
    ("mistral", "[TOOL_CALLS] nothing", "[TOOL_CALLS] nothing", []),
]


def _streamed(parser, pieces: list[str]) -> tuple[str, list[ToolCall]]:
    stream = parser.stream()
    content, calls = "", []
    for piece in pieces:
        parsed = stream.feed(piece)
        content, calls = content + parsed.content, calls + parsed.calls
    parsed = stream.feed("", final=True)
    return content + parsed.content, calls + parsed.calls


@pytest.mark.parametrize("name, output, content, calls", PARSER_CASES)
def test_parse_whole_output(name, output, content, calls):
    parsed = make_parser(name).parse(output)
    assert (parsed.content, parsed.calls) == (content, calls)


@pytest.mark.parametrize("name, output, content, calls", PARSER_CASES)
def test_a_stream_split_anywhere_parses_as_the_whole_output(name, output, content, calls):
    parser = make_parser(name)
    assert _streamed(parser, list(output)) == (content, calls)  # one character at a time
    for cut in range(len(output) + 1):  # two pieces, cut at every boundary
        assert _streamed(parser, [output[:cut], output[cut:]]) == (content, calls), cut


def test_content_streams_before_the_marker_and_a_call_as_soon_as_its_json_closes():
    stream = make_parser("hermes").stream()
    assert stream.feed("Checking <tool").content == "Checking "  # a marker's start is held back
    assert stream.feed('_call>{"name": "f", "arguments": {}').calls == []
    assert stream.feed("}</tool_call>").calls == _calls(("f", {}))


def test_a_marker_that_is_a_special_token_is_kept_and_other_special_tokens_dropped(tokenizer_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    assert not make_parser("mistral", tokenizer).keeps_special_tokens  # [TOOL_CALLS] is plain text here
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    parser = make_parser("mistral", tokenizer)
    assert parser.keeps_special_tokens and "<|im_end|>" in parser.drop_texts
    output = 'Hi<|im_end|> [TOOL_CALLS][{"name": "f", "arguments": {"a": "b"}}]<|im_end|>'
    assert parser.parse(output).content == "Hi "
    for cut in range(len(output) + 1):
        assert _streamed(parser, [output[:cut], output[cut:]]) == ("Hi ", _calls(("f", {"a": "b"})))


def test_json_value_end_counts_brackets_outside_strings():
    assert json_value_end('{"a": "}]\\"{"}, tail', 0) == len('{"a": "}]\\"{"}')
    assert json_value_end('[{"a": [1]}', 0) is None
    assert json_value_end('{"a": "open', 0) is None


def test_parser_detected_from_the_chat_template():
    assert detect_parser(HERMES_TEMPLATE) == "hermes"
    assert detect_parser("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_parser("{%- if message.role == 'ipython' %}") == "llama3_json"
    assert detect_parser(CHAT_TEMPLATE) is None  # the embedded default model's template: no tools


# ----------------------------------------------------------------------------------------------
# The constraint of "required" and named calls


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, "messages": USER, **fields})


def test_a_named_function_constrains_the_output_to_its_parameters():
    spec = tool_constraint(_request(tools=[WEATHER, TIME], tool_choice=_named("get_weather")))
    assert spec is not None and spec.kind == "json"
    assert json.loads(spec.value) == WEATHER["function"]["parameters"]
    no_parameters = tool_constraint(_request(tools=[WEATHER, TIME], tool_choice=_named("get_time")))
    assert no_parameters is not None and json.loads(no_parameters.value) == {"type": "object"}
    check_compiles(spec)


def test_required_constrains_the_output_to_an_array_of_calls():
    defs = {"$defs": {"unit": {"enum": ["C", "F"]}}}
    weather = {**WEATHER, "function": {**WEATHER["function"], "parameters": {"type": "object", **defs}}}
    spec = tool_constraint(_request(tools=[weather, TIME], tool_choice="required"))
    assert spec is not None
    schema = json.loads(spec.value)
    assert (schema["type"], schema["minItems"], "maxItems" in schema) == ("array", 1, False)
    names = [item["properties"]["name"]["const"] for item in schema["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"]
    assert schema["$defs"] == defs["$defs"]  # moved to the root, where "#/$defs/unit" points
    check_compiles(spec)
    single = tool_constraint(_request(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False))
    assert single is not None and json.loads(single.value)["maxItems"] == 1
    for choice in ("auto", "none", None):
        assert tool_constraint(_request(tools=[WEATHER], tool_choice=choice)) is None


def test_the_constrained_array_is_read_as_calls():
    parser = constrained_array_parser(["get_weather", "get_time"])
    output = '[{"name":"get_weather","parameters":{"city":"Paris"}},{"name":"get_time","parameters":{}}]'
    assert parser.parse(output).calls == _calls(("get_weather", {"city": "Paris"}), ("get_time", {}))
    assert _streamed(parser, list(output)) == ("", parser.parse(output).calls)
    assert parser.parse('[{"name":"other","parameters":{}}]').calls == []  # not one of the tools: content


# ----------------------------------------------------------------------------------------------
# Rendering


@pytest.fixture(scope="module")
def hermes_tokenizer(tokenizer_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = HERMES_TEMPLATE
    return tokenizer


HISTORY = [
    *USER,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]


def test_tools_and_tool_history_are_rendered_by_the_chat_template(hermes_tokenizer):
    messages = [ChatMessage.model_validate(m) for m in HISTORY]
    tools = template_tools(_request(tools=[WEATHER]).tools)
    text = render_chat(hermes_tokenizer, messages, add_generation_prompt=True, tokenize=False, tools=tools)
    assert isinstance(text, str)
    assert json.dumps(WEATHER, ensure_ascii=False) in text  # the tool, as OpenAI's JSON
    # the earlier call, its arguments an object (not a string of JSON), then the tool's answer
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<|im_start|>tool\n18 C, sunny<|im_end|>" in text


def test_the_default_model_s_template_ignores_tools(tokenizer_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [ChatMessage.model_validate(m) for m in HISTORY]
    tools = template_tools(_request(tools=[WEATHER]).tools)
    with_tools = render_chat(tokenizer, messages, add_generation_prompt=True, tokenize=False, tools=tools)
    assert with_tools == render_chat(tokenizer, messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant\n<|im_end|>" in with_tools  # a past call renders as an empty turn


# ----------------------------------------------------------------------------------------------
# End to end: the gateway over a backend that answers a scripted text


class ScriptedBackend(FakeBackend):
    """Each choice's output is `script`, one piece (and token) per step; it stops (finish_reason "stop") after it."""

    def reset(self) -> None:
        super().reset()
        self.script: list[str] = []

    async def generate(self, request_id, prompt_token_ids, sampling: SamplingSpec, cache_salt=None, images=()):
        self.requests.append((request_id, list(prompt_token_ids), sampling, cache_salt))
        for step, piece in enumerate(self.script):
            await asyncio.sleep(0)
            last = step == len(self.script) - 1
            completions = [
                CompletionDelta(index=i, token_ids=[100 + step], text=piece, finish_reason="stop" if last else None)
                for i in range(sampling.n)
            ]
            yield RequestDelta(
                request_id=request_id, completions=completions, finished=last, num_prompt_tokens=len(prompt_token_ids)
            )


@pytest.fixture(scope="module")
def gateway(hermes_tokenizer):
    backend = ScriptedBackend(hermes_tokenizer)
    app = create_app(GatewayConfig(served_model_name=MODEL), backend)  # --tool-call-parser auto: hermes
    with running_server(app) as base_url:
        yield backend, base_url


@pytest.fixture
def served(gateway):
    backend, base_url = gateway
    backend.reset()
    return backend, base_url


def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": USER, "tools": [WEATHER, TIME], **fields}


def _named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def _stream(base_url: str, body: dict) -> tuple[str, list[dict], list]:
    """(the streamed content, the tool-call deltas, every choice's finish_reason)."""
    with httpx.stream("POST", base_url + "/v1/chat/completions", json={**body, "stream": True}, timeout=10) as reply:
        assert reply.status_code == 200, reply.read()
        chunks = [p for p in sse_payloads(reply) if p != "[DONE]"]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content", "") for d in deltas)
    return (
        content,
        [call for d in deltas for call in d.get("tool_calls", [])],
        [c["choices"][0]["finish_reason"] for c in chunks],
    )


def _assemble(deltas: list[dict]) -> list[dict]:
    """Tool calls from their streamed deltas, as a client puts them together."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        call = calls.setdefault(delta["index"], {"arguments": ""})
        call.update({k: v for k, v in delta.items() if k in ("id", "type")})
        call["name"] = delta.get("function", {}).get("name", call.get("name"))
        call["arguments"] += delta.get("function", {}).get("arguments", "")
    return [calls[i] for i in sorted(calls)]


def test_a_named_function_answers_one_call_whose_arguments_are_the_output(served):
    backend, base_url = served
    backend.script = ['{"city"', ': "Par', 'is"}']
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0)
    answer = client.chat.completions.create(**_chat(tool_choice=_named("get_weather")))
    [choice] = answer.choices
    assert choice.message.content is None and choice.finish_reason == "stop"  # as OpenAI: not "tool_calls"
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, call.function.arguments) == ("function", "get_weather", '{"city": "Paris"}')
    assert call.id.startswith("call_") and len(call.id) == len("call_") + 24
    spec = backend.requests[-1][2].structured  # the output is held to the function's parameters
    assert spec is not None and json.loads(spec.value) == WEATHER["function"]["parameters"]

    content, deltas, finish_reasons = _stream(base_url, _chat(tool_choice=_named("get_weather")))
    assert content == "" and finish_reasons[-1] == "stop"
    first = deltas[0]
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(d["function"]["arguments"] for d in deltas[1:]) == "".join(backend.script)  # as the text comes
    assert all(set(d) == {"index", "function"} for d in deltas[1:])
    assert _assemble(deltas) == [
        {"id": first["id"], "type": "function", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    ]


def test_auto_reads_the_model_s_calls_with_its_template_s_parser(served):
    backend, base_url = served
    backend.script = [
        "Let me check.",
        "<tool_",
        'call>{"name": "get_weather", ',
        '"arguments": {"city": "Paris"}}</tool_call>',
    ]
    reply = httpx.post(base_url + "/v1/chat/completions", json=_chat(), timeout=10).json()
    [choice] = reply["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert backend.requests[-1][2].structured is None  # "auto": the output is free
    prompt = backend.requests[-1][1]
    assert '"get_weather"' in backend.tokenizer.decode(prompt)  # the tools reached the prompt

    content, deltas, finish_reasons = _stream(base_url, _chat(tool_choice="auto"))
    assert content == "Let me check." and finish_reasons[-1] == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in _assemble(deltas)] == [("get_weather", '{"city": "Paris"}')]
    tokenized = httpx.post(base_url + "/tokenize", json={"messages": USER, "tools": [WEATHER, TIME]}).json()
    assert tokenized["tokens"] == prompt  # /tokenize renders the tools as the chat does


def test_required_reads_the_constrained_array_and_none_reads_nothing(served):
    backend, base_url = served
    backend.script = ['[{"name":"get_time","parameters":{}},', '{"name":"get_weather","parameters":{"city":"Oslo"}}]']
    reply = httpx.post(base_url + "/v1/chat/completions", json=_chat(tool_choice="required", n=2), timeout=10).json()
    for choice in reply["choices"]:  # each choice reads its own output
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        names = [call["function"]["name"] for call in choice["message"]["tool_calls"]]
        assert names == ["get_time", "get_weather"]
    _, deltas, _ = _stream(base_url, _chat(tool_choice="required"))
    assert [c["name"] for c in _assemble(deltas)] == names and [d["index"] for d in deltas] == [0, 0, 1, 1]

    backend.script = ['<tool_call>{"name": "get_time"}</tool_call>']
    reply = httpx.post(base_url + "/v1/chat/completions", json=_chat(tool_choice="none"), timeout=10).json()
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": backend.script[0]}
    assert reply["choices"][0]["finish_reason"] == "stop"


BAD_TOOL_REQUESTS = [
    # (body fields, param, a substring of the message)
    ({"tools": [{"type": "code_interpreter"}]}, "tools", "tools[0].type must be 'function'"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "given twice"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "tools",
        "type 'object'",
    ),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "'sometimes'"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": None, "tool_choice": _named("get_weather")}, "tool_choice", "needs tools"),
    ({"tool_choice": _named("get_news")}, "tool_choice", "not among tools"),
    ({"tool_choice": {"type": "function"}}, "tool_choice", "tool_choice must be"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "parallel_tool_calls"),
    (
        {
            "messages": [
                *USER,
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{"}}]},
            ]
        },
        "messages",
        "arguments must be a JSON object",
    ),
    ({"messages": [*USER, {"role": "tool", "content": "18 C"}]}, "messages", "tool_call_id"),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": "x",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}],
                }
            ]
        },
        "messages",
        "only assistant messages",
    ),
]


@pytest.mark.parametrize("fields, param, message", BAD_TOOL_REQUESTS)
def test_bad_tool_requests_are_400s_naming_the_field(served, fields, param, message):
    backend, base_url = served
    reply = httpx.post(base_url + "/v1/chat/completions", json=_chat(**fields), timeout=10)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error
    assert message in error["message"], error
    assert not backend.requests


def test_auto_without_a_parser_is_refused_naming_tool_choice(hermes_tokenizer):
    backend = ScriptedBackend(hermes_tokenizer)
    app = create_app(GatewayConfig(served_model_name=MODEL, tool_call_parser="none"), backend)
    with running_server(app) as base_url:
        for body in (_chat(), _chat(tool_choice="auto")):
            reply = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=10)
            assert reply.status_code == 400 and reply.json()["error"]["param"] == "tool_choice"
            assert "--tool-call-parser" in reply.json()["error"]["message"]
        backend.script = ['[{"name":"get_time","parameters":{}}]']
        required = httpx.post(base_url + "/v1/chat/completions", json=_chat(tool_choice="required"), timeout=10)
        assert required.status_code == 200, required.text  # constrained: no parser needed
        assert required.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
