"""Tool-call parsers: a model's raw output -> content and tool calls (OpenAI's `tool_calls`).

Formats, chosen by `tristage serve --tool-call-parser` (auto: `detect_parser` on the chat template):

    llama3_json  Llama 3.x   [<|python_tag|>]{"name": "f", "parameters": {...}}; {"name": ...}
                             (calls open the output, or follow <|python_tag|> anywhere)
    hermes       Hermes/Qwen text <tool_call>{"name": "f", "arguments": {...}}</tool_call> <tool_call>...
    mistral      Mistral     text [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]
    json_array   tristage's  [{"name": "f", "parameters": {...}}, ...], the output `tool_choice:
                             "required"` constrains (services.gateway.tools), read without any marker

One algorithm serves every format and both forms. The output is read left to right as

    | content | marker call (separator call)* | content | marker call ... |
              |<------- a call section ------>|

Outside a section, text is content up to the format's marker; inside, the format takes one call at
a time (`first_call`, then `next_call` for each following one). A call is a JSON object with a
string `name` and an object of arguments; its arguments become a JSON string. What looks like a
call but is not one (bad JSON, no name, arguments not an object) stays content, from its marker to
the end of the object or block, and reading goes on after it: output never fails to parse.

Streaming (`ToolCallStream.feed`): content is released as it comes, except a tail that could be the
start of a marker (held back: at most the marker's length - 1 characters). Inside a section text is
buffered, and a call is released whole (name and all its arguments) as soon as its JSON closes.
`ToolParser.parse(text)` runs the same steps on the whole text at once, so a stream split anywhere
gives the same content and the same calls.

Special tokens: a marker that is a special token of the tokenizer (Mistral's [TOOL_CALLS], Llama's
<|python_tag|>) disappears from text decoded with skip_special_tokens. For such a parser
`keeps_special_tokens` is set (the gateway then asks the engine for the special tokens' text), and
the parser drops every other special token's text itself (`drop_texts`: end-of-turn tokens and the
like), so content reads as it would have with skip_special_tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal, Protocol

TOOL_CALL_PARSERS = ("llama3_json", "hermes", "mistral")  # --tool-call-parser values besides auto, none

PYTHON_TAG = "<|python_tag|>"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARKER = "[TOOL_CALLS]"

# what a chat template holds -> the parser of its model's format; the first match wins
_TEMPLATE_SIGNS = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
    ("ipython", "llama3_json"),  # Llama 3.1+ templates name the tool role "ipython"
)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class ParsedOutput:
    content: str  # the text that is not a call (may be empty)
    calls: list[ToolCall] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Steps: what a format makes of the text at the start of a section


@dataclass(frozen=True)
class Step:
    """call: the first `length` characters are `calls` (the section goes on);
    text: the first `length` (> 0) characters are content, and the section is over;
    close: the section is over after `length` characters of separator, which are dropped;
    wait: more text is needed to decide (never when the text is final)."""

    kind: Literal["call", "text", "close", "wait"]
    length: int = 0
    calls: tuple[ToolCall, ...] = ()

    def after(self, num_chars: int) -> Step:
        """This step taken `num_chars` characters further into the text."""
        return self if self.kind == "wait" else replace(self, length=self.length + num_chars)


WAIT = Step("wait")
CLOSE = Step("close")


def _text_or_wait(length: int, final: bool) -> Step:
    """An unfinished call: content once the text is final, else wait for more."""
    return Step("text", length) if final else WAIT


class CallFormat(Protocol):
    def find_section(self, text: str, at_output_start: bool) -> tuple[int | None, int]:
        """(where a call section starts in `text`, or None; characters at its end to hold back)."""
        ...

    def first_call(self, section: str, final: bool) -> Step:
        """The step at a section's start (found by find_section)."""
        ...

    def next_call(self, section: str, final: bool) -> Step:
        """The step after a call of the section."""
        ...


# ----------------------------------------------------------------------------------------------
# JSON helpers

# a JSON string (its closing quote captured: empty when the text ends inside it), or a bracket
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*("?)|[{}\[\]]')


def json_value_end(text: str, start: int) -> int | None:
    """The index just past the object or array opening at text[start], or None if it is not closed
    yet. Brackets are counted outside strings only; whether the value parses is json.loads' to say."""
    depth = 0
    for match in _JSON_TOKEN.finditer(text, start):
        token = match.group()
        if token[0] == '"':
            if not match.group(1):
                return None  # the text ends inside a string
            continue
        depth += 1 if token in "{[" else -1
        if depth == 0:
            return match.end()
    return None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:  # JSONDecodeError, and a number too large to convert
        return None


def call_from_json(value: Any, argument_keys: tuple[str, ...], names: frozenset[str] | None = None) -> ToolCall | None:
    """A call from a decoded JSON object: a non-empty string `name` (one of `names`, when given), and
    arguments under the first of `argument_keys` it has: an object, or a string holding one (absent: {})."""
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    if not isinstance(name, str) or not name or (names is not None and name not in names):
        return None
    key = next((k for k in argument_keys if k in value), None)
    arguments = {} if key is None else value[key]
    if isinstance(arguments, str):
        arguments = _loads(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _object_call(
    section: str, start: int, final: bool, argument_keys: tuple[str, ...], names: frozenset[str] | None = None
) -> Step:
    """One call written as the JSON object opening at section[start]."""
    end = json_value_end(section, start)
    if end is None:
        return _text_or_wait(len(section), final)
    call = call_from_json(_loads(section[start:end]), argument_keys, names)
    return Step("call", end, (call,)) if call is not None else Step("text", end)


def _skip_space(section: str) -> tuple[str, int]:
    rest = section.lstrip()
    return rest, len(section) - len(rest)


# ----------------------------------------------------------------------------------------------
# Markers


def _prefixes(markers: Iterable[str]) -> frozenset[str]:
    """Every proper, non-empty prefix of the markers: what a text's end may hold of one."""
    return frozenset(marker[:k] for marker in markers for k in range(1, len(marker)))


def partial_suffix_length(text: str, prefixes: frozenset[str], max_length: int) -> int:
    """The length of the longest end of `text` that is in `prefixes` (proper prefixes of strings at
    most `max_length` long): the characters to hold back, as they may begin one of those strings."""
    for start in range(max(0, len(text) - max_length + 1), len(text)):
        if text[start:] in prefixes:
            return len(text) - start
    return 0


class _Markers:
    """Finds the first of some markers in a text, and how much of its end may begin one."""

    def __init__(self, *markers: str) -> None:
        self.markers = markers
        self._prefixes = _prefixes(markers)
        self._max_length = max(len(m) for m in markers)

    def find(self, text: str) -> tuple[int | None, int]:
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        if found:
            return min(found), 0
        return None, self.partial_suffix_length(text)

    def partial_suffix_length(self, text: str) -> int:
        return partial_suffix_length(text, self._prefixes, self._max_length)


# ----------------------------------------------------------------------------------------------
# Formats


class Llama3JsonFormat:
    """[<|python_tag|>]{"name": ..., "parameters": {...}} (; {...})*, at the output's start or after the tag."""

    ARGUMENT_KEYS = ("parameters", "arguments")

    def __init__(self) -> None:
        self._markers = _Markers(PYTHON_TAG)

    def find_section(self, text: str, at_output_start: bool) -> tuple[int | None, int]:
        if at_output_start:
            rest, _ = _skip_space(text)
            if not rest:
                return None, len(text)  # only space yet: the output may still open with a call
            if rest[0] == "{":
                return 0, 0  # the space before the call is the section's
        return self._markers.find(text)

    def first_call(self, section: str, final: bool) -> Step:
        tag = section.find(PYTHON_TAG) + len(PYTHON_TAG) if section.lstrip().startswith(PYTHON_TAG) else 0
        rest, skipped = _skip_space(section[tag:])
        if not rest:
            return _text_or_wait(len(section), final)
        if rest[0] != "{":  # a built-in tool's code after the tag, say: content
            return Step("text", max(tag + skipped, 1))
        return _object_call(section, tag + skipped, final, self.ARGUMENT_KEYS)

    def next_call(self, section: str, final: bool) -> Step:
        rest, skipped = _skip_space(section)
        if not rest:
            return Step("close", skipped) if final else WAIT
        if rest[0] == "{":  # calls on lines of their own, without the separator
            return _object_call(rest, 0, final, self.ARGUMENT_KEYS).after(skipped)
        if rest[0] != ";":
            return CLOSE.after(skipped)
        after, spaces = _skip_space(rest[1:])
        if not after:
            return Step("close", len(section)) if final else WAIT  # a trailing separator: dropped
        if after[0] != "{":
            return CLOSE.after(skipped)  # the separator and what follows are content
        return _object_call(after, 0, final, self.ARGUMENT_KEYS).after(skipped + 1 + spaces)


class HermesFormat:
    """<tool_call>{"name": ..., "arguments": {...}}</tool_call>, each call in its own block."""

    ARGUMENT_KEYS = ("arguments", "parameters")

    def __init__(self) -> None:
        self._markers = _Markers(HERMES_OPEN)

    def find_section(self, text: str, at_output_start: bool) -> tuple[int | None, int]:
        return self._markers.find(text)

    def first_call(self, section: str, final: bool) -> Step:
        close = section.find(HERMES_CLOSE, len(HERMES_OPEN))
        if close < 0:  # unclosed: a call only if the output ends with its whole JSON
            if not final:
                return WAIT
            body = section[len(HERMES_OPEN) :]
            call = call_from_json(_loads(body.strip()), self.ARGUMENT_KEYS) if body.strip() else None
            return Step("call", len(section), (call,)) if call is not None else Step("text", len(section))
        end = close + len(HERMES_CLOSE)
        body = section[len(HERMES_OPEN) : close].strip()
        call = call_from_json(_loads(body), self.ARGUMENT_KEYS) if body else None
        return Step("call", end, (call,)) if call is not None else Step("text", end)

    def next_call(self, section: str, final: bool) -> Step:
        rest, skipped = _skip_space(section)
        if not rest:
            return Step("close", skipped) if final else WAIT
        if rest.startswith(HERMES_OPEN):
            return self.first_call(rest, final).after(skipped)
        if HERMES_OPEN.startswith(rest) and not final:
            return WAIT
        return CLOSE.after(skipped)


class MistralFormat:
    """[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]: every call of the section in one array."""

    ARGUMENT_KEYS = ("arguments", "parameters")

    def __init__(self) -> None:
        self._markers = _Markers(MISTRAL_MARKER)

    def find_section(self, text: str, at_output_start: bool) -> tuple[int | None, int]:
        return self._markers.find(text)

    def first_call(self, section: str, final: bool) -> Step:
        rest, skipped = _skip_space(section[len(MISTRAL_MARKER) :])
        start = len(MISTRAL_MARKER) + skipped
        if not rest:
            return _text_or_wait(len(section), final)
        if rest[0] not in "[{":
            return Step("text", start)
        end = json_value_end(section, start)
        if end is None:
            return _text_or_wait(len(section), final)
        value = _loads(section[start:end])
        items = value if isinstance(value, list) else [value]
        calls = [call_from_json(item, self.ARGUMENT_KEYS) for item in items]
        if not calls or any(call is None for call in calls):
            return Step("text", end)
        return Step("call", end, tuple(call for call in calls if call is not None))

    def next_call(self, section: str, final: bool) -> Step:
        rest, skipped = _skip_space(section)
        if not rest:
            return Step("close", skipped) if final else WAIT
        if rest.startswith(MISTRAL_MARKER):
            return self.first_call(rest, final).after(skipped)
        if MISTRAL_MARKER.startswith(rest) and not final:
            return WAIT
        return CLOSE.after(skipped)


class JsonArrayFormat:
    """[{"name": ..., "parameters": {...}}, ...] as the whole output (leading and trailing space
    aside), each name one of the request's tools: what tool_choice "required" constrains."""

    ARGUMENT_KEYS = ("parameters",)

    def __init__(self, names: Iterable[str]) -> None:
        self._names = frozenset(names)

    def find_section(self, text: str, at_output_start: bool) -> tuple[int | None, int]:
        if not at_output_start:
            return None, 0
        rest, _ = _skip_space(text)
        if not rest:
            return None, len(text)
        return (0, 0) if rest[0] == "[" else (None, 0)  # the space before the array is the section's

    def first_call(self, section: str, final: bool) -> Step:
        opening = section.index("[") + 1
        rest, skipped = _skip_space(section[opening:])
        if not rest:
            return _text_or_wait(len(section), final)
        if rest[0] != "{":
            return Step("text", opening + skipped)
        return self._element(rest, final).after(opening + skipped)

    def next_call(self, section: str, final: bool) -> Step:
        rest, skipped = _skip_space(section)
        if not rest:
            return _text_or_wait(len(section), final)  # the array is not closed
        if rest[0] == "]":
            return Step("close", skipped + 1)
        if rest[0] != ",":
            return Step("text", len(section))
        after, spaces = _skip_space(rest[1:])
        if not after:
            return _text_or_wait(len(section), final)
        if after[0] != "{":
            return Step("text", len(section))
        return self._element(after, final).after(skipped + 1 + spaces)

    def _element(self, text: str, final: bool) -> Step:
        return _object_call(text, 0, final, self.ARGUMENT_KEYS, self._names)


_FORMATS: dict[str, Callable[[], CallFormat]] = {
    "llama3_json": Llama3JsonFormat,
    "hermes": HermesFormat,
    "mistral": MistralFormat,
}
_MARKERS = {"llama3_json": (PYTHON_TAG,), "hermes": (HERMES_OPEN, HERMES_CLOSE), "mistral": (MISTRAL_MARKER,)}


# ----------------------------------------------------------------------------------------------
# Parsers and streams


@dataclass(frozen=True)
class ToolParser:
    name: str
    format: CallFormat
    # the markers are special tokens: the engine must keep special tokens' text, and the parser drops
    # these (every other special token's text) itself
    keeps_special_tokens: bool = False
    drop_texts: tuple[str, ...] = ()

    def parse(self, text: str) -> ParsedOutput:
        """The whole output at once."""
        return self.stream().feed(text, final=True)

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)

    @cached_property
    def dropped(self) -> _Markers | None:
        """drop_texts, with their prefixes computed once (Llama 3 has 256 special tokens)."""
        texts = tuple(t for t in self.drop_texts if t)
        return _Markers(*texts) if texts else None


class _TextDropper:
    """Removes some strings from a streamed text, holding back an end that may begin one."""

    def __init__(self, dropped: _Markers | None) -> None:
        self._dropped = dropped
        self._held = ""

    def feed(self, text: str, final: bool) -> str:
        if self._dropped is None:
            return text
        text = self._held + text
        for dropped in self._dropped.markers:
            if dropped in text:
                text = text.replace(dropped, "")
        hold = 0 if final else self._dropped.partial_suffix_length(text)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold]


class ToolCallStream:
    """One choice's output as it streams: `feed` each text delta, then `feed("", final=True)`.
    Each call returns the content and the calls that became certain. Not thread-safe."""

    def __init__(self, parser: ToolParser) -> None:
        self._format = parser.format
        self._dropper = _TextDropper(parser.dropped)
        self._pending = ""  # text not yet released as content or calls
        self._in_section = False
        self._after_call = False  # in a section, past at least one call
        self._at_output_start = True  # nothing released yet

    def feed(self, text: str, final: bool = False) -> ParsedOutput:
        self._pending += self._dropper.feed(text, final)
        content: list[str] = []
        calls: list[ToolCall] = []
        while self._pending:
            if not self._in_section:
                start, hold = self._format.find_section(self._pending, self._at_output_start)
                if start is None:
                    content.append(self._take(len(self._pending) if final else len(self._pending) - hold))
                    break
                content.append(self._take(start))
                self._in_section, self._after_call = True, False
            take_step = self._format.next_call if self._after_call else self._format.first_call
            step = take_step(self._pending, final)
            if step.kind == "wait":
                break
            text_of_step = self._take(step.length)
            if step.kind == "call":
                calls.extend(step.calls)
                self._after_call = True
                continue
            if step.kind == "text":
                content.append(text_of_step)
            self._in_section = False
        return ParsedOutput("".join(content), calls)

    def _take(self, num_chars: int) -> str:
        taken, self._pending = self._pending[:num_chars], self._pending[num_chars:]
        if taken:
            self._at_output_start = False
        return taken


def detect_parser(chat_template: str | None) -> str | None:
    """The parser of the format a chat template teaches its model, or None."""
    if not chat_template:
        return None
    return next((name for sign, name in _TEMPLATE_SIGNS if sign in chat_template), None)


def make_parser(name: str, tokenizer: Any = None) -> ToolParser:
    """The parser `name` (one of TOOL_CALL_PARSERS) for a model with this tokenizer (None: its
    markers are taken to be plain text)."""
    special = _special_token_texts(tokenizer)
    if not set(_MARKERS[name]) & special:
        return ToolParser(name, _FORMATS[name]())
    drop = tuple(sorted(special - set(_MARKERS[name])))
    return ToolParser(name, _FORMATS[name](), keeps_special_tokens=True, drop_texts=drop)


def constrained_array_parser(names: Iterable[str]) -> ToolParser:
    """Reads the output tool_choice "required" constrains: a JSON array of calls to these tools."""
    return ToolParser("json_array", JsonArrayFormat(names))


def _special_token_texts(tokenizer: Any) -> set[str]:
    """The text of every special token, which decoding with skip_special_tokens removes."""
    added = getattr(tokenizer, "added_tokens_decoder", None)
    if not isinstance(added, dict):
        return set()
    return {token.content for token in added.values() if getattr(token, "special", False)}


def chat_template_text(tokenizer: Any, processor: Any = None) -> str:
    """Every chat template the gateway may render with (a tokenizer may hold several, by name)."""
    texts = []
    for owner in (tokenizer, processor):
        template = getattr(owner, "chat_template", None)
        if isinstance(template, str):
            texts.append(template)
        elif isinstance(template, dict):
            texts.extend(t for t in template.values() if isinstance(t, str))
    return "\n".join(texts)


def resolve_parser(option: str, tokenizer: Any, processor: Any = None) -> ToolParser | None:
    """--tool-call-parser's parser: auto detects it from the chat template; none (or auto that finds
    no sign) gives None, and tool_choice "auto" is then refused."""
    if option == "none":
        return None
    name = detect_parser(chat_template_text(tokenizer, processor)) if option == "auto" else option
    return None if name is None else make_parser(name, tokenizer)
