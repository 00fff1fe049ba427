"""OpenAI's Responses API, POST /v1/responses: stateless, text and function calls, served by the chat pipeline.

A request is checked (a 400 names each field this server cannot honour: stored state, hosted tools,
...), turned into the chat request it stands for and handed to GenerationService.serve, so it gets
the chat route's checks, admission, chat template, tool calling (services.gateway.tools), structured
outputs, generation and abort on disconnect; ResponsesFormatter (services.gateway.responses_output)
answers in this API's shapes.

    instructions               -> a system message, first
    input: "text"              -> one user message
    input: [{role, content}]   -> those messages (`type` "message" or none); a content list's
                                  input_text / output_text parts joined by newlines, as chat joins text parts
    input: function_call       -> a tool call of the assistant message before it (a run of calls, and
                                  the assistant message that precedes them, make one assistant turn)
    input: function_call_output -> a tool message answering call_id
    max_output_tokens          -> max_completion_tokens; temperature, top_p, user, cache_salt as they are
    tools: [{type: "function", name, description, parameters, strict}]
                               -> chat's tools, their function's fields nested; other tool types refused
    tool_choice                -> "none", "auto", "required" as they are; {type: "function", name}
                                  -> {type: "function", function: {name}}
    parallel_tool_calls        -> as it is
    text.format                -> response_format: json_object as it is; {type: "json_schema", name,
                                  schema, description, strict} -> {type: "json_schema", json_schema: {...}}

The chat rules hold: tool_choice "auto" (the default with tools) needs the server's tool-call parser,
"required" and a named function constrain the output, and one output constraint at most. An error the
chat pipeline names by a chat field names this API's instead (messages -> input, max_tokens and
max_completion_tokens -> max_output_tokens, response_format -> text.format), in `param` and in the message.

Nothing is stored: every response says "store": false; previous_response_id, conversation and
background are refused.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from services.common.errors import InvalidRequestError
from services.gateway.config import GatewayConfig
from services.gateway.errors import ApiError
from services.gateway.generation import Arrival
from services.gateway.protocol import (
    TOOL_CHOICES,
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    FunctionCallIn,
    FunctionDefinition,
    JsonSchemaFormat,
    ResponseFormat,
    ResponsesContentPart,
    ResponsesInputItem,
    ResponsesRequest,
    ResponsesTextFormat,
    ResponsesTool,
    ToolCallIn,
    ToolDefinition,
    check_tools,
)
from services.gateway.responses_output import ResponsesFormatter
from services.gateway.serving import GenerationService, model_not_found, read_json

TEXT_PART_TYPES = ("input_text", "output_text")
# the chat pipeline's names for fields this API names otherwise
_CHAT_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "response_format.json_schema": "text.format",
}
# those a message may name too; "messages" is left alone (its indices count the instructions, input's do not)
_CHAT_NAMES_IN_MESSAGES = re.compile(r"\b(max_completion_tokens|max_tokens|response_format)\b")


@dataclass(frozen=True)
class ResponsesService:
    """Serves /v1/responses through `generation`'s pipeline."""

    config: GatewayConfig
    generation: GenerationService

    async def create(self, http_request: Request) -> Response:
        arrival = Arrival(request_id=f"resp_{uuid.uuid4().hex}", arrival_s=time.monotonic())
        request = await read_json(http_request, self.config, ResponsesRequest.model_validate_json)
        if request.model != self.config.served_model_name:
            raise model_not_found(request.model)
        try:
            request.check()
            chat = chat_request(request)
        except InvalidRequestError as exc:
            raise ApiError.invalid(exc) from exc
        tools = self.generation.tool_plan_for(chat)
        formatter = ResponsesFormatter(request, arrival.request_id, self.config.served_model_name, tools)
        try:
            return await self.generation.serve(http_request, arrival, chat, formatter)
        except ApiError as exc:
            exc.info.param = _CHAT_PARAMS.get(exc.info.param or "", exc.info.param)
            exc.info.message = _CHAT_NAMES_IN_MESSAGES.sub(lambda m: _CHAT_PARAMS[m[1]], exc.info.message)
            raise


# ----------------------------------------------------------------------------------------------
# Request -> the chat request it stands for


def chat_request(request: ResponsesRequest) -> ChatCompletionRequest:
    """Raises InvalidRequestError naming `input`, `tools`, `tool_choice` or `text.format`."""
    messages = [] if request.instructions is None else [ChatMessage(role="system", content=request.instructions)]
    return ChatCompletionRequest.model_validate(
        {
            "model": request.model,
            "messages": messages + input_messages(request.input),
            "max_completion_tokens": request.max_output_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": request.stream,
            "user": request.user,
            "cache_salt": request.cache_salt,
            "tools": chat_tools(request.tools),
            "tool_choice": chat_tool_choice(request.tool_choice),
            "parallel_tool_calls": request.parallel_tool_calls,
            "response_format": chat_response_format(request.text.format if request.text is not None else None),
        }
    )


def chat_tools(tools: list[ResponsesTool] | None) -> list[ToolDefinition] | None:
    """Chat's tools: function tools only, checked as chat checks them (each message naming this API's
    flat fields)."""
    if not tools:
        return None
    definitions = [_tool_definition(f"tools[{index}]", tool) for index, tool in enumerate(tools)]
    check_tools(definitions, function_path="")  # refuses other types by name, then repeated names and schemas
    return definitions


def _tool_definition(where: str, tool: ResponsesTool) -> ToolDefinition:
    if tool.type != "function":
        return ToolDefinition(type=tool.type)
    if tool.name is None:
        raise InvalidRequestError(f"Missing required parameter: '{where}.name'.", param="tools")
    function = FunctionDefinition(
        name=tool.name, description=tool.description, parameters=tool.parameters, strict=tool.strict
    )
    return ToolDefinition(type="function", function=function)


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """Chat's tool_choice: the same strings, and a named function's name nested under `function`
    (whether there are tools, and one of that name, chat checks)."""
    if choice is None or choice in TOOL_CHOICES:
        return choice
    name = choice.get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(name, str):
        given = repr(choice) if isinstance(choice, str) else f"an object of type {choice.get('type')!r}"
        raise InvalidRequestError(
            "tool_choice must be 'none', 'auto', 'required' or "
            f'{{"type": "function", "name": ...}} (only function tools are served), not {given}',
            param="tool_choice",
        )
    return {"type": "function", "function": {"name": name}}


def chat_response_format(text_format: ResponsesTextFormat | None) -> ResponseFormat | None:
    """Chat's response_format for a text.format that ResponsesRequest.check has passed."""
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return ResponseFormat(type="json_object")
    json_schema = JsonSchemaFormat.model_validate(
        {
            "name": text_format.name,
            "description": text_format.description,
            "schema": text_format.schema_,
            "strict": text_format.strict,
        }
    )
    return ResponseFormat(type="json_schema", json_schema=json_schema)


def input_messages(items: str | list[ResponsesInputItem]) -> list[ChatMessage]:
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    if not items:
        raise InvalidRequestError("input must hold at least one message", param="input")
    messages: list[ChatMessage] = []
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if item.type == "function_call":
            _add_tool_call(messages, _tool_call(where, item))
        elif item.type == "function_call_output":
            messages.append(_tool_message(where, item))
        else:
            messages.append(_chat_message(where, item))
    return messages


def _add_tool_call(messages: list[ChatMessage], call: ToolCallIn) -> None:
    """A call belongs to the assistant message just before it, if there is one (a turn's text and
    calls come back as a message item and function_call items); else it starts one."""
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant":
        last.tool_calls = [*(last.tool_calls or ()), call]
    else:
        messages.append(ChatMessage(role="assistant", tool_calls=[call]))


def _tool_call(where: str, item: ResponsesInputItem) -> ToolCallIn:
    call_id = _required(where, "call_id", item.call_id)
    name = _required(where, "name", item.name)
    arguments = _required(where, "arguments", item.arguments)
    try:
        is_object = isinstance(json.loads(arguments), dict)
    except ValueError:
        is_object = False
    if not is_object:  # the chat template gets them as an object
        raise InvalidRequestError(f"{where}.arguments must be a JSON object, as text", param="input")
    return ToolCallIn(id=call_id, function=FunctionCallIn(name=name, arguments=arguments))


def _tool_message(where: str, item: ResponsesInputItem) -> ChatMessage:
    call_id = _required(where, "call_id", item.call_id)
    output = item.output
    if output is None:
        raise InvalidRequestError(f"Missing required parameter: '{where}.output'.", param="input")
    if not isinstance(output, str):
        output = "\n".join(_part_text(f"{where}.output[{i}]", part) for i, part in enumerate(output))
    return ChatMessage(role="tool", tool_call_id=call_id, content=output)


def _required(where: str, key: str, value: str | None) -> str:
    if value is None:
        raise InvalidRequestError(f"Missing required parameter: '{where}.{key}'.", param="input")
    return value


def _chat_message(where: str, item: ResponsesInputItem) -> ChatMessage:
    if item.type != "message":
        raise InvalidRequestError(
            f"{where}: items of type '{item.type}' are not supported on /v1/responses; "
            "only message, function_call and function_call_output items are",
            param="input",
        )
    if item.role is None or item.content is None:
        raise InvalidRequestError(f"{where}: a message needs a 'role' and a 'content'", param="input")
    if isinstance(item.content, str):
        return ChatMessage(role=item.role, content=item.content)
    parts = [ContentPart(type="text", text=_part_text(f"{where}.content[{i}]", p)) for i, p in enumerate(item.content)]
    return ChatMessage(role=item.role, content=parts)


def _part_text(where: str, part: ResponsesContentPart) -> str:
    if part.type not in TEXT_PART_TYPES:
        raise InvalidRequestError(
            f"{where}: content parts of type '{part.type}' are not supported by this model; "
            "only input_text and output_text parts are",
            param="input",
        )
    if part.text is None:
        raise InvalidRequestError(f"{where}: a {part.type} part needs a 'text' string", param="input")
    return part.text
