"""Tool calling on /v1/chat/completions: what a request's tools do to its prompt, its output's
constraint and its answer.

    tool_choice            prompt           output                          answer
    none, or no tools      tools rendered   free                            text
    auto (the default      tools rendered   free                            content and the calls the model's
      when tools are set)                                                   format holds (--tool-call-parser)
    required               tools rendered   constrained: [{"name", "parameters"}, ...]   the array's calls
    {"function": {"name"}} tools rendered   constrained: that function's parameters      one call to it, the
                                                                                          output its arguments

The chat template renders the tools (services.gateway.prompts.render_chat), whatever tool_choice says.
"auto" needs a parser for the model's format; without one it is refused with a 400 rather than
answered with calls left in the text. "required" and a named function need none: the engine's
structured outputs hold the output to a JSON schema (`tool_constraint`), read here as JSON.

finish_reason: "tool_calls" when an answer to "auto" or "required" holds calls and the model
stopped (not on "length"); a named function keeps "stop", as OpenAI's API does.
parallel_tool_calls false: "required" allows one call (maxItems 1); "auto" keeps the first call.

Streaming: content streams as it comes; a call is sent once its JSON is complete, as two deltas
(index, id, type and name with arguments "", then the whole arguments). A named function's call
is sent at the first text, its arguments then streamed as the text comes.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from services.common.errors import InvalidRequestError
from services.common.messages import SamplingSpec, StructuredSpec
from services.gateway.protocol import (
    ChatCompletionRequest,
    FunctionCallDelta,
    FunctionCallOut,
    ToolCallDelta,
    ToolCallOut,
    ToolDefinition,
)
from services.gateway.tool_parsers import ToolCall, ToolCallStream, ToolParser, constrained_array_parser

ToolMode = Literal["none", "auto", "required", "named"]
_ANY_OBJECT: dict[str, Any] = {"type": "object"}  # a function without parameters takes any object
_DEFINITION_KEYS = ("$defs", "definitions")  # where a schema keeps what its "$ref"s point to


def tool_mode(request: ChatCompletionRequest) -> ToolMode:
    """What the request's tool_choice does (after its checks): "none" when there are no tools."""
    choice = request.tool_choice
    if not request.tools or choice == "none":
        return "none"
    if request.named_function is not None:
        return "named"
    return "required" if choice == "required" else "auto"


def check_tool_parser(request: ChatCompletionRequest, parser: ToolParser | None) -> None:
    """Refuse tool_choice "auto" when this model's output cannot be read as calls."""
    if parser is None and tool_mode(request) == "auto":
        raise InvalidRequestError(
            'tool_choice "auto" (the default with tools) needs a tool-call parser for this model\'s output, '
            "and the server has none: start it with --tool-call-parser (llama3_json, hermes or mistral), "
            'or send tool_choice "none", "required" or a named function',
            param="tool_choice",
        )


def template_tools(tools: list[ToolDefinition] | None) -> list[dict[str, Any]] | None:
    """The tools as chat templates take them (OpenAI's JSON shape, unset fields left out)."""
    return [tool.model_dump(exclude_none=True) for tool in tools] if tools else None


def new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# ----------------------------------------------------------------------------------------------
# The output constraint of "required" and a named function


def tool_constraint(request: ChatCompletionRequest) -> StructuredSpec | None:
    """The JSON schema the output must follow: a named function's arguments object, or for
    "required" an array of calls (1 .. n, or exactly 1 without parallel_tool_calls); None otherwise."""
    mode = tool_mode(request)
    if mode == "named":
        schema = _parameters(request, request.named_function or "")
    elif mode == "required":
        schema = _calls_schema(request)
    else:
        return None
    return StructuredSpec(kind="json", value=json.dumps(schema))


def _parameters(request: ChatCompletionRequest, name: str) -> dict[str, Any]:
    for tool in request.tools or ():
        if tool.function is not None and tool.function.name == name:
            return tool.function.parameters or _ANY_OBJECT
    return _ANY_OBJECT


def _calls_schema(request: ChatCompletionRequest) -> dict[str, Any]:
    """[{"name": <a tool's name>, "parameters": <its schema>}, ...]. Each tool's definitions ($defs)
    move to the root, where their "#/$defs/..." references point once the schema is nested."""
    definitions: dict[str, dict[str, Any]] = {}
    calls = []
    for tool in request.tools or ():
        if tool.function is None:
            continue
        parameters = dict(tool.function.parameters or _ANY_OBJECT)
        for key in _DEFINITION_KEYS:
            _merge_definitions(definitions.setdefault(key, {}), parameters.pop(key, None), key)
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"type": "string", "const": tool.function.name}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if request.parallel_tool_calls is False:
        schema["maxItems"] = 1
    schema.update({key: value for key, value in definitions.items() if value})
    return schema


def _merge_definitions(merged: dict[str, Any], definitions: Any, key: str) -> None:
    if not isinstance(definitions, dict):
        return
    for name, definition in definitions.items():
        if merged.setdefault(name, definition) != definition:
            raise InvalidRequestError(
                f'tools define "{key}/{name}" differently; with tool_choice "required" every tool\'s '
                "definitions share one schema, so a name must mean the same in each",
                param="tools",
            )


# ----------------------------------------------------------------------------------------------
# The answer


@dataclass(frozen=True)
class ToolPlan:
    """How a chat request's output becomes its answer. `parser` reads "auto" and "required" outputs;
    a named function's output is its arguments."""

    mode: Literal["auto", "required", "named"]
    parser: ToolParser | None = None
    function_name: str = ""  # named
    parallel: bool = True  # "auto": False keeps the first call only

    def choice(self) -> ChoiceToolCalls:
        return ChoiceToolCalls(self)

    def message(self, text: str) -> tuple[str | None, list[ToolCallOut]]:
        """A whole output's content (None when it is only calls) and its calls."""
        if self.mode == "named":
            return None, [_call_out(ToolCall(self.function_name, text))]
        assert self.parser is not None
        parsed = self.parser.parse(text)
        calls = parsed.calls if self.parallel else parsed.calls[:1]
        return _content(parsed.content, bool(calls)), [_call_out(call) for call in calls]

    def finish_reason(self, finish_reason: str | None, made_calls: bool) -> str | None:
        if finish_reason == "stop" and made_calls and self.mode != "named":
            return "tool_calls"
        return finish_reason

    @property
    def keeps_special_tokens(self) -> bool:
        return self.parser is not None and self.parser.keeps_special_tokens


def tool_plan(request: ChatCompletionRequest, parser: ToolParser | None) -> ToolPlan | None:
    """The request's plan, or None for a plain chat (no tools, or tool_choice "none")."""
    mode = tool_mode(request)
    parallel = request.parallel_tool_calls is not False
    if mode == "auto":
        return ToolPlan("auto", parser, parallel=parallel) if parser is not None else None
    if mode == "required":
        names = [tool.function.name for tool in request.tools or () if tool.function is not None]
        return ToolPlan("required", constrained_array_parser(names), parallel=parallel)
    if mode == "named":
        return ToolPlan("named", function_name=request.named_function or "")
    return None


def tool_sampling(sampling: SamplingSpec, plan: ToolPlan | None) -> SamplingSpec:
    """The sampling of a request whose parser reads special tokens' text (ToolParser.keeps_special_tokens)."""
    if plan is None or not plan.keeps_special_tokens:
        return sampling
    return msgspec.structs.replace(sampling, skip_special_tokens=False)


class ChoiceToolCalls:
    """One streamed choice: text deltas in, content and tool-call deltas out. Not thread-safe."""

    def __init__(self, plan: ToolPlan) -> None:
        self._plan = plan
        self._stream: ToolCallStream | None = plan.parser.stream() if plan.parser is not None else None
        self.num_calls = 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """The content and the call deltas `text` completes (`final`: the output's last delta)."""
        if self._stream is None:
            return "", self._named_deltas(text, final)
        parsed = self._stream.feed(text, final)
        deltas: list[ToolCallDelta] = []
        for call in parsed.calls:
            if self._plan.parallel or self.num_calls == 0:
                deltas += _call_deltas(self.num_calls, call)
                self.num_calls += 1
        return parsed.content, deltas

    def _named_deltas(self, text: str, final: bool) -> list[ToolCallDelta]:
        deltas = []
        if self.num_calls == 0 and (text or final):
            deltas.append(_header_delta(0, self._plan.function_name))
            self.num_calls = 1
        if text:
            deltas.append(ToolCallDelta(index=0, function=FunctionCallDelta(arguments=text)))
        return deltas


def _content(content: str, made_calls: bool) -> str | None:
    """Space around calls is no content."""
    return None if made_calls and not content.strip() else content


def _call_out(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=new_tool_call_id(), function=FunctionCallOut(name=call.name, arguments=call.arguments))


def _header_delta(index: int, name: str) -> ToolCallDelta:
    return ToolCallDelta(
        index=index, id=new_tool_call_id(), type="function", function=FunctionCallDelta(name=name, arguments="")
    )


def _call_deltas(index: int, call: ToolCall) -> list[ToolCallDelta]:
    return [
        _header_delta(index, call.name),
        ToolCallDelta(index=index, function=FunctionCallDelta(arguments=call.arguments)),
    ]
