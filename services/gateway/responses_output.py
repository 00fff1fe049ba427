"""The Responses API's answer (services.gateway.responses_api): the response object, whole or as events.

The output: the text as one message item with one output_text part, then each tool call as a
function_call item (call_id "call_...", the name, the arguments as JSON text), read from the chat's
output by its tool plan (services.gateway.tools). Every item is "completed" but the last, which is
"incomplete" when the response is (max_output_tokens reached).

The stream, each event as `event: <type>` and `data: {...}`, numbered by sequence_number from 0:

    response.created, response.in_progress     the response, status "in_progress", no output yet
    for each item, in output order:
      a message:
        response.output_item.added             the assistant message, status "in_progress", no content
        response.content_part.added            its output_text part, empty
        response.output_text.delta             as text comes
        response.output_text.done, response.content_part.done, response.output_item.done
      a function call:
        response.output_item.added             the call, status "in_progress", arguments ""
        response.function_call_arguments.delta as its arguments come
        response.function_call_arguments.done, response.output_item.done
    response.completed | response.incomplete   the whole response, with usage

An item is done when the next one is added, or at the end. Without tools the message is added at
once; with tools it is added with the first text that is not whitespace (whitespace around calls is
no content, as on chat), and a call when the chat stream sends it (a named function's arguments as
the text comes, other calls whole). A failure once the stream has started is an `error` event (code,
message, param) followed by response.failed carrying what was produced. There is no `data: [DONE]`:
the Responses stream has none.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from services.common.messages import CompletionDelta, SamplingSpec
from services.gateway.protocol import (
    ErrorInfo,
    FunctionCallDelta,
    ResponseObject,
    ResponsesArgumentsDeltaEvent,
    ResponsesArgumentsDoneEvent,
    ResponsesContentPartEvent,
    ResponsesError,
    ResponsesErrorEvent,
    ResponsesFunctionCall,
    ResponsesIncompleteDetails,
    ResponsesInputTokensDetails,
    ResponsesLifecycleEvent,
    ResponsesOutputItem,
    ResponsesOutputItemEvent,
    ResponsesOutputMessage,
    ResponsesOutputText,
    ResponsesRequest,
    ResponsesTextConfig,
    ResponsesTextDeltaEvent,
    ResponsesTextDoneEvent,
    ResponsesTextFormat,
    ResponsesUsage,
    ToolCallDelta,
    Usage,
)
from services.gateway.responses import ChoiceState, ResponseHeader
from services.gateway.tools import ChoiceToolCalls, ToolPlan

_SAMPLING_DEFAULTS = SamplingSpec()
_TEXT_FORMAT = ResponsesTextFormat.model_validate({"type": "text"})  # the format of a request that gives none

ResponseStatus = Literal["completed", "incomplete"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]
LifecycleStatus = Literal["in_progress", "completed", "incomplete", "failed"]
LifecycleEventType = Literal[
    "response.created", "response.in_progress", "response.completed", "response.incomplete", "response.failed"
]
ResponsesEvent = (
    ResponsesLifecycleEvent
    | ResponsesOutputItemEvent
    | ResponsesContentPartEvent
    | ResponsesTextDeltaEvent
    | ResponsesTextDoneEvent
    | ResponsesArgumentsDeltaEvent
    | ResponsesArgumentsDoneEvent
    | ResponsesErrorEvent
)


@dataclass
class _Item:
    """An output item: a message (`call_id` None) and its text, or a function call and its arguments."""

    id: str
    text: str = ""  # a message's text, a call's arguments
    call_id: str | None = None
    name: str = ""

    def output(self, status: ItemStatus) -> ResponsesOutputItem:
        if self.call_id is None:
            return ResponsesOutputMessage(id=self.id, status=status, content=[ResponsesOutputText(text=self.text)])
        return ResponsesFunctionCall(
            id=self.id, call_id=self.call_id, name=self.name, arguments=self.text, status=status
        )

    def added(self) -> ResponsesOutputItem:
        """As response.output_item.added announces it: a message without content, a call without arguments."""
        if self.call_id is None:
            return ResponsesOutputMessage(id=self.id, status="in_progress", content=[])
        return ResponsesFunctionCall(
            id=self.id, call_id=self.call_id, name=self.name, arguments="", status="in_progress"
        )


def _message(text: str = "") -> _Item:
    return _Item(id=f"msg_{uuid.uuid4().hex}", text=text)


def _function_call(call_id: str, name: str, arguments: str = "") -> _Item:
    return _Item(id=f"fc_{uuid.uuid4().hex}", text=arguments, call_id=call_id, name=name)


def _outputs(items: list[_Item], last_status: ItemStatus) -> list[ResponsesOutputItem]:
    """Every item completed but the last, which ends as the response does."""
    return [item.output("completed" if i < len(items) - 1 else last_status) for i, item in enumerate(items)]


class ResponsesFormatter:
    """One response (n is 1), whole or as events. `tools`: how the chat's output becomes tool calls
    (services.gateway.tools); None: the output is one message."""

    def __init__(self, request: ResponsesRequest, response_id: str, model: str, tools: ToolPlan | None = None) -> None:
        self.header = ResponseHeader(
            request_id=response_id, model=model, created=int(time.time()), with_logprobs=False, include_usage=False
        )
        self._request = request
        self._tools = tools
        self._tool_calls: ChoiceToolCalls | None = tools.choice() if tools is not None else None
        self._streamed = ChoiceState(index=0)  # the stream's finish reason
        self._items: list[_Item] = []  # the stream's items so far; the last one is open
        self._space = ""  # streamed content not sent yet: whitespace only, which is no content next to calls
        self._sequence_numbers = itertools.count()

    def response(self, choices: list[ChoiceState], usage: Usage) -> ResponseObject:
        [choice] = choices
        return self._final(self._whole_items(choice.text), choice.finish_reason, usage)

    def _whole_items(self, text: str) -> list[_Item]:
        if self._tools is None:
            return [_message(text)]
        content, calls = self._tools.message(text)
        items = [] if content is None else [_message(content)]
        return items + [_function_call(call.id, call.function.name, call.function.arguments) for call in calls]

    # ------------------------------------------------------------------------------------------
    # The stream

    def stream_start(self, num_choices: int) -> list[str]:
        in_progress = self._response("in_progress", output=[])
        events = [
            self._lifecycle_event("response.created", in_progress),
            self._lifecycle_event("response.in_progress", in_progress),
        ]
        if self._tools is None:  # plain text: the message from the start
            events += self._open(_message())
        return events

    def stream_delta(self, choice: ChoiceState, completion: CompletionDelta) -> list[str]:
        self._streamed.add(completion)
        if self._tool_calls is None:
            return self._text_delta(completion.text)
        final = completion.finish_reason is not None
        content, calls = self._tool_calls.feed(completion.text, final)
        events = self._content(content)
        for call in calls:
            events += self._call_delta(call)
        return events

    def stream_end(self, usage: Usage) -> list[str]:
        events = []
        if not self._items:  # neither calls nor content but whitespace: a message, as the whole output's
            events += self._open(_message()) + self._text_delta(self._space)
        status = _status(self._streamed.finish_reason)
        events += self._close(status)
        final = self._final(self._items, self._streamed.finish_reason, usage)
        lifecycle: LifecycleEventType = "response.completed" if status == "completed" else "response.incomplete"
        return [*events, self._lifecycle_event(lifecycle, final)]

    def stream_error(self, error: ErrorInfo) -> list[str]:
        code = "rate_limit_exceeded" if error.type == "rate_limit_error" else "server_error"
        failed = self._response(
            "failed", output=_outputs(self._items, "incomplete"), error=ResponsesError(code=code, message=error.message)
        )
        return [
            self._event(
                ResponsesErrorEvent(
                    sequence_number=self._next(),
                    code=error.code or error.type,
                    message=error.message,
                    param=error.param,
                )
            ),
            self._lifecycle_event("response.failed", failed),
        ]

    def _content(self, content: str) -> list[str]:
        """Content of a reply with tools: into the open message, else into a new one once it is more
        than whitespace."""
        if self._items and self._items[-1].call_id is None:
            return self._text_delta(content)
        self._space += content
        if not self._space.strip():
            return []
        text, self._space = self._space, ""
        return self._open(_message()) + self._text_delta(text)

    def _call_delta(self, delta: ToolCallDelta) -> list[str]:
        """A call's first delta (it has the id) adds its item; each arguments fragment extends the open call."""
        function = delta.function or FunctionCallDelta()
        events = []
        if delta.id is not None:
            events += self._open(_function_call(delta.id, function.name or ""))
        fragment = function.arguments
        if fragment:
            item, index = self._items[-1], len(self._items) - 1
            item.text += fragment
            events.append(
                self._event(
                    ResponsesArgumentsDeltaEvent(
                        sequence_number=self._next(), item_id=item.id, output_index=index, delta=fragment
                    )
                )
            )
        return events

    def _text_delta(self, text: str) -> list[str]:
        """`text` added to the open message."""
        if not text:
            return []
        item, index = self._items[-1], len(self._items) - 1
        item.text += text
        delta = ResponsesTextDeltaEvent(
            sequence_number=self._next(), item_id=item.id, output_index=index, content_index=0, delta=text
        )
        return [self._event(delta)]

    def _open(self, item: _Item) -> list[str]:
        """The events that close the open item (completed) and add `item` after it."""
        events = self._close("completed") if self._items else []
        self._items.append(item)
        index = len(self._items) - 1
        events.append(self._item_event("response.output_item.added", index, item.added()))
        if item.call_id is None:
            events.append(self._part_event("response.content_part.added", item, index))
        return events

    def _close(self, status: ResponseStatus) -> list[str]:
        item, index = self._items[-1], len(self._items) - 1
        if item.call_id is None:
            done: ResponsesEvent = ResponsesTextDoneEvent(
                sequence_number=self._next(), item_id=item.id, output_index=index, content_index=0, text=item.text
            )
            events = [self._event(done), self._part_event("response.content_part.done", item, index)]
        else:
            done = ResponsesArgumentsDoneEvent(
                sequence_number=self._next(), item_id=item.id, output_index=index, arguments=item.text
            )
            events = [self._event(done)]
        return [*events, self._item_event("response.output_item.done", index, item.output(status))]

    # ------------------------------------------------------------------------------------------

    def _final(self, items: list[_Item], finish_reason: str | None, usage: Usage) -> ResponseObject:
        status = _status(finish_reason)
        incomplete = ResponsesIncompleteDetails(reason="max_output_tokens") if finish_reason == "length" else None
        return self._response(
            status,
            output=_outputs(items, status),
            usage=_usage(usage),
            incomplete_details=incomplete,
            completed_at=int(time.time()) if status == "completed" else None,
        )

    def _response(self, status: LifecycleStatus, output: list[ResponsesOutputItem], **fields: Any) -> ResponseObject:
        request = self._request
        text_format = request.text.format if request.text is not None else None
        return ResponseObject(
            id=self.header.request_id,
            created_at=self.header.created,
            status=status,
            model=self.header.model,
            instructions=request.instructions,
            output=output,
            max_output_tokens=request.max_output_tokens,
            temperature=_SAMPLING_DEFAULTS.temperature if request.temperature is None else request.temperature,
            top_p=_SAMPLING_DEFAULTS.top_p if request.top_p is None else request.top_p,
            parallel_tool_calls=True if request.parallel_tool_calls is None else request.parallel_tool_calls,
            tool_choice="auto" if request.tool_choice is None else request.tool_choice,
            tools=[tool.model_dump(exclude_none=True) for tool in request.tools or ()],
            text=ResponsesTextConfig(
                format=text_format or _TEXT_FORMAT,
                verbosity=request.text.verbosity if request.text else None,
            ),
            metadata=request.metadata or {},
            user=request.user,
            **fields,
        )

    def _item_event(
        self,
        kind: Literal["response.output_item.added", "response.output_item.done"],
        index: int,
        item: ResponsesOutputItem,
    ) -> str:
        return self._event(
            ResponsesOutputItemEvent(type=kind, sequence_number=self._next(), output_index=index, item=item)
        )

    def _part_event(
        self, kind: Literal["response.content_part.added", "response.content_part.done"], item: _Item, index: int
    ) -> str:
        text = item.text if kind == "response.content_part.done" else ""
        part = ResponsesContentPartEvent(
            type=kind,
            sequence_number=self._next(),
            item_id=item.id,
            output_index=index,
            content_index=0,
            part=ResponsesOutputText(text=text),
        )
        return self._event(part)

    def _lifecycle_event(self, kind: LifecycleEventType, response: ResponseObject) -> str:
        return self._event(ResponsesLifecycleEvent(type=kind, sequence_number=self._next(), response=response))

    def _next(self) -> int:
        return next(self._sequence_numbers)

    @staticmethod
    def _event(event: ResponsesEvent) -> str:
        return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"


def _status(finish_reason: str | None) -> ResponseStatus:
    return "incomplete" if finish_reason in ("length", "abort") else "completed"


def _usage(usage: Usage) -> ResponsesUsage:
    cached_tokens = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return ResponsesUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=ResponsesInputTokensDetails(cached_tokens=cached_tokens),
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )
