"""Requests -> prompt token ids and sampling parameters.

The functions that tokenize run in the gateway's tokenizer thread (never on the event loop);
they raise InvalidRequestError naming the field, which the gateway answers with a 400.

Length rules (max_model_len is the context length in tokens):

    |<------------------------------- max_model_len ------------------------------->|
    |<------ prompt (1 .. max_model_len - 1) ------>|<---- max_tokens (>= 1) ---->|

A prompt must leave room for at least one generated token; when max_tokens is given, prompt plus
max_tokens must fit. When it is not given the backend generates up to the context left.

`check_before_tokenizing` runs on the event loop before admission and refuses, cheaply, what can
never fit: max_tokens or min_tokens past the context, token ids out of the vocabulary, and text
whose length alone proves it is too many tokens (services.gateway.length_bound).
`num_sequences` and `prompt_text_bytes` measure, as cheaply, what admission counts before tokenizing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import jinja2

from services.common.errors import InvalidRequestError
from services.common.images import LoadedImage
from services.common.messages import ImageRef, SamplingSpec
from services.gateway.backend import PromptImage
from services.gateway.images import ImageSource
from services.gateway.length_bound import LengthBound
from services.gateway.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from services.gateway.responses import EchoedPrompt
from services.gateway.structured_outputs import check_structured, structured_spec
from services.gateway.tools import template_tools

MAX_IMAGE_UUID_CHARS = 256  # a client's name for an image (ImageSource.uuid)

_TEMPLATE_ROLES = {"developer": "system"}  # OpenAI's newer name for the system role


class ContextLengthExceeded(InvalidRequestError):
    code = "context_length_exceeded"  # OpenAI's code for this error


@dataclass(frozen=True)
class ModelLimits:
    max_model_len: int  # tokens
    vocab_size: int
    length_bound: LengthBound | None = None  # None: no text is refused before it is tokenized


def to_sampling_spec(request: ChatCompletionRequest | CompletionRequest) -> SamplingSpec:
    defaults = SamplingSpec()
    return SamplingSpec(
        n=request.num_choices_per_prompt,
        temperature=_or(request.temperature, defaults.temperature),
        top_p=_or(request.top_p, defaults.top_p),
        top_k=_or(request.top_k, defaults.top_k),
        min_p=_or(request.min_p, defaults.min_p),
        seed=request.seed,
        presence_penalty=_or(request.presence_penalty, defaults.presence_penalty),
        frequency_penalty=_or(request.frequency_penalty, defaults.frequency_penalty),
        repetition_penalty=_or(request.repetition_penalty, defaults.repetition_penalty),
        stop=request.stop_list,
        stop_token_ids=list(request.stop_token_ids or []),
        include_stop_str_in_output=bool(request.include_stop_str_in_output),
        ignore_eos=bool(request.ignore_eos),
        max_tokens=request.effective_max_tokens(),
        min_tokens=request.min_tokens or 0,
        logprobs=request.num_logprobs,
        prompt_logprobs=request.engine_prompt_logprobs,
        skip_special_tokens=_or(request.skip_special_tokens, True),
        logit_bias={int(t): b for t, b in request.logit_bias.items()} if request.logit_bias else None,
        structured=structured_spec(request),
    )


def _or(value, default):
    return default if value is None else value


# ----------------------------------------------------------------------------------------------
# Chat


def _message_text(index: int, message: ChatMessage, image_placeholder: str | None = None) -> str:
    """The message's text; each image part becomes `image_placeholder` where it stands (None: a text model)."""
    if message.content is None:
        if message.role != "assistant":
            raise InvalidRequestError(
                f"messages[{index}].content is required for role '{message.role}'", param="messages"
            )
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type == "image_url":
            if image_placeholder is None:
                raise InvalidRequestError(
                    f"messages[{index}]: this model is text-only and does not accept image input", param="messages"
                )
            texts.append(image_placeholder)
            continue
        if part.type != "text":
            raise InvalidRequestError(
                f"messages[{index}]: content parts of type '{part.type}' are not supported by this model; "
                "only text and image_url parts are",
                param="messages",
            )
        if part.text is None:
            raise InvalidRequestError(f"messages[{index}]: a text part needs a 'text' string", param="messages")
        texts.append(part.text)
    return "\n".join(texts)


def image_sources(messages: list[ChatMessage]) -> list[ImageSource]:
    """Where the image of every image_url part comes from, in conversation order: its URL, and the
    client's uuid for it if it gave one (a uuid alone names an image it sent before)."""
    sources = []
    for index, message in enumerate(messages):
        for part in message.content if isinstance(message.content, list) else ():
            if part.type != "image_url":
                continue
            uuid = getattr(part, "uuid", None)
            if uuid is not None and not (isinstance(uuid, str) and 0 < len(uuid) <= MAX_IMAGE_UUID_CHARS):
                raise InvalidRequestError(
                    f"messages[{index}]: an image_url part's uuid must be a string of 1 to "
                    f"{MAX_IMAGE_UUID_CHARS} characters",
                    param="messages",
                )
            image_url = getattr(part, "image_url", None)
            url = image_url.get("url") if isinstance(image_url, dict) else None
            # no URL at all (image_url null, absent, or without "url") is the uuid-only form
            no_url = image_url is None or (isinstance(image_url, dict) and "url" not in image_url)
            if not isinstance(url, str) and not (uuid is not None and no_url):
                raise InvalidRequestError(
                    f'messages[{index}]: an image_url part needs {{"image_url": '
                    '{"url": ...}}, or only the "uuid" of an image sent before',
                    param="messages",
                )
            sources.append(ImageSource(url if isinstance(url, str) else None, uuid))
    return sources


def template_messages(messages: list[ChatMessage], image_placeholder: str | None = None) -> list[dict[str, Any]]:
    """The messages as chat templates expect them: role and one content string (text parts joined),
    an assistant's tool calls with their arguments as objects (as vLLM passes them: templates
    iterate over them or write them with `tojson`), a tool message's tool_call_id."""
    converted = []
    for index, message in enumerate(messages):
        entry: dict[str, Any] = {
            "role": _TEMPLATE_ROLES.get(message.role, message.role),
            "content": _message_text(index, message, image_placeholder),
        }
        if message.name is not None:
            entry["name"] = message.name
        if message.role == "tool" and message.tool_call_id is None:
            raise InvalidRequestError(
                f"messages[{index}]: a tool message needs the tool_call_id of the call it answers", param="messages"
            )
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            entry["tool_calls"] = _template_tool_calls(index, message)
        converted.append(entry)
    return converted


def _template_tool_calls(index: int, message: ChatMessage) -> list[dict[str, Any]]:
    if message.role != "assistant":
        raise InvalidRequestError(
            f"messages[{index}].tool_calls: only assistant messages hold tool calls", param="messages"
        )
    calls = []
    for call_index, call in enumerate(message.tool_calls or ()):
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise InvalidRequestError(
                f"messages[{index}].tool_calls[{call_index}].function.arguments must be a JSON object, as text",
                param="messages",
            )
        function = {"name": call.function.name, "arguments": arguments}
        calls.append({"id": call.id, "type": call.type, "function": function})
    return calls


def tokenize_chat(tokenizer, request: ChatCompletionRequest, limits: ModelLimits) -> list[int]:
    token_ids = render_chat(
        tokenizer, request.messages, add_generation_prompt=True, tokenize=True, tools=template_tools(request.tools)
    )
    assert isinstance(token_ids, list)
    check_prompt(token_ids, request.effective_max_tokens(), limits, param="messages")
    return token_ids


def render_chat(
    tokenizer, messages, *, add_generation_prompt: bool, tokenize: bool, tools: list[dict[str, Any]] | None = None
) -> list[int] | str:
    """A text model's chat through its template: token ids, or the text when `tokenize` is false.
    `tools` (services.gateway.tools.template_tools) go to the template, which may ignore them.

    The one call every route makes (/v1/chat/completions, /tokenize), so their ids agree."""
    try:
        rendered = tokenizer.apply_chat_template(
            template_messages(messages),
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=tokenize,
            **({"return_dict": False} if tokenize else {}),
        )
    except jinja2.TemplateError as exc:  # the template refused these messages (e.g. role order)
        raise InvalidRequestError(
            f"The chat template could not render these messages: {exc}", param="messages"
        ) from exc
    return list(rendered) if tokenize else rendered


def tokenize_chat_with_images(
    processor, request: ChatCompletionRequest, limits: ModelLimits, images: Sequence[LoadedImage]
) -> tuple[list[int], list[PromptImage]]:
    """A vision-language model's chat: rendered with each image as the model's placeholder, tokenized,
    and each placeholder expanded to its image's rows (from the image's size: the encoders do pixels)."""
    messages = template_messages(request.messages, processor.image_placeholder)
    tools = template_tools(request.tools)
    try:
        if tools is None:
            text = processor.apply_chat_template(messages)
        else:  # the processor's own call takes no tools: its tokenizer renders with its template
            text = processor.tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=processor.chat_template, tokenize=False, add_generation_prompt=True
            )
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(
            f"The chat template could not render these messages: {exc}", param="messages"
        ) from exc
    token_ids, layout = processor.layout(processor.tokenizer.encode(text), [(i.width, i.height) for i in images])
    check_prompt(token_ids, request.effective_max_tokens(), limits, param="messages")
    prompt_images = [
        PromptImage(ImageRef(content_hash=image.content_hash, offset=offset, length=length, grid_thw=grid), image.data)
        for image, (offset, length, grid) in zip(images, layout)
    ]
    return token_ids, prompt_images


# ----------------------------------------------------------------------------------------------
# Completions


def tokenize_completion(
    tokenizer, request: CompletionRequest, limits: ModelLimits, max_prompts: int
) -> list[list[int]]:
    """One list of token ids per prompt of the batch."""
    prompts = _prompt_items(request.prompt)
    check_num_prompts(request, max_prompts)
    token_id_lists = []
    for item in prompts:
        token_ids = tokenizer.encode(item) if isinstance(item, str) else list(item)
        if not isinstance(item, str):
            _check_vocab(token_ids, limits.vocab_size)
        check_prompt(token_ids, request.effective_max_tokens(), limits, param="prompt")
        token_id_lists.append(token_ids)
    return token_id_lists


def echo_prompts(tokenizer, request: CompletionRequest, token_id_lists: list[list[int]]) -> list[EchoedPrompt]:
    """What `echo` puts before each prompt's choices: a text prompt as given, a token-id prompt decoded
    (special tokens kept: they are part of what was sent), and the first token's text."""

    def decode(token_ids: list[int]) -> str:
        return tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return [
        EchoedPrompt(text=item if isinstance(item, str) else decode(list(item)), first_token=decode(token_ids[:1]))
        for item, token_ids in zip(_prompt_items(request.prompt), token_id_lists)
    ]


def check_num_prompts(request: ChatCompletionRequest | CompletionRequest, max_prompts: int) -> None:
    """A /v1/completions batch holds 1 .. max_prompts prompts (a chat is always one)."""
    if isinstance(request, ChatCompletionRequest):
        return
    num_prompts = len(_prompt_items(request.prompt))
    if num_prompts == 0:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if num_prompts > max_prompts:
        raise InvalidRequestError(f"prompt may hold at most {max_prompts} prompts, not {num_prompts}", param="prompt")


def num_sequences(request: ChatCompletionRequest | CompletionRequest) -> int:
    """The sequences the engines run for the request: n per prompt."""
    num_prompts = 1 if isinstance(request, ChatCompletionRequest) else len(_prompt_items(request.prompt))
    return num_prompts * request.num_choices_per_prompt


def prompt_text_bytes(request: ChatCompletionRequest | CompletionRequest) -> int:
    """UTF-8 bytes of the text the tokenizer will read: every message's text parts, or the batch's
    string prompts (token-id prompts need no tokenizing)."""
    if isinstance(request, ChatCompletionRequest):
        texts = [text for message in request.messages for text in _text_parts(message)]
    else:
        texts = [item for item in _prompt_items(request.prompt) if isinstance(item, str)]
    return sum(_utf8_len(text) for text in texts)


def _text_parts(message: ChatMessage) -> list[str]:
    if isinstance(message.content, str):
        return [message.content]
    return [part.text for part in message.content or () if part.type == "text" and isinstance(part.text, str)]


def _utf8_len(text: str) -> int:
    # isascii() reads a flag of the string (no scan): the common case costs nothing
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _prompt_items(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a batch: a string or a token-id list is a batch of one."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return cast(list[str | list[int]], list(prompt))


def _check_vocab(token_ids: list[int], vocab_size: int) -> None:
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is out of the vocabulary [0, {vocab_size})", param="prompt")


def check_prompt(token_ids: list[int], max_tokens: int | None, limits: ModelLimits, param: str) -> None:
    num_prompt_tokens = len(token_ids)
    if num_prompt_tokens == 0:
        raise InvalidRequestError("The prompt is empty; it must hold at least one token.", param=param)
    if num_prompt_tokens >= limits.max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limits.max_model_len} tokens. However, your "
            f"{param} resulted in {num_prompt_tokens} tokens, which leaves no room for a completion. "
            f"Please reduce the length of the {param}.",
            param=param,
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > limits.max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limits.max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {param}, {max_tokens} in "
            "the completion). Please reduce the length of the prompt or of max_tokens.",
            param="max_tokens",
        )


def check_before_tokenizing(request: ChatCompletionRequest | CompletionRequest, limits: ModelLimits) -> None:
    """Deployment bounds on the request's numbers and a lower bound on its prompts' length."""
    max_tokens = request.effective_max_tokens()
    max_tokens_param = _max_tokens_param(request)
    if max_tokens is not None and max_tokens >= limits.max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {limits.max_model_len} tokens, so {max_tokens_param} "
            f"must be below it (a prompt needs at least one token); it is {max_tokens}.",
            param=max_tokens_param,
        )
    if (request.min_tokens or 0) >= limits.max_model_len:
        raise InvalidRequestError(
            f"min_tokens must be below the model's maximum context length of {limits.max_model_len} tokens",
            param="min_tokens",
        )
    check_stop_token_ids(request, limits.vocab_size)
    check_structured(request)
    max_prompt_tokens = limits.max_model_len - max(max_tokens or 1, 1)
    if isinstance(request, ChatCompletionRequest):
        _check_length_bound([_user_text(request.messages)], max_prompt_tokens, limits, param="messages")
        return
    items = _prompt_items(request.prompt)
    for item in items:
        if not isinstance(item, str):
            _check_vocab(item, limits.vocab_size)
    _check_length_bound([item for item in items if isinstance(item, str)], max_prompt_tokens, limits, "prompt")


def _max_tokens_param(request: ChatCompletionRequest | CompletionRequest) -> str:
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        return "max_completion_tokens"
    return "max_tokens"


def _user_text(messages: list[ChatMessage]) -> str:
    """The user messages' text, stripped: every chat template renders it (some trim it), whereas
    system and past assistant turns may be dropped or rewritten by a template."""
    texts = []
    for message in messages:
        if message.role != "user":
            continue
        if isinstance(message.content, str):
            texts.append(message.content.strip())
        elif message.content is not None:
            texts.extend(part.text.strip() for part in message.content if part.type == "text" and part.text)
    return "".join(texts)


def _check_length_bound(texts: list[str], max_prompt_tokens: int, limits: ModelLimits, param: str) -> None:
    if limits.length_bound is None:
        return
    for text in texts:
        min_tokens = limits.length_bound.min_tokens(text, at_least=max_prompt_tokens + 1)
        if min_tokens > max_prompt_tokens:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limits.max_model_len} tokens. However, your "
                f"{param} is {len(text)} characters long, which is at least {min_tokens} tokens; at most "
                f"{max_prompt_tokens} fit. Please reduce the length of the {param}.",
                param=param,
            )


def check_stop_token_ids(request: ChatCompletionRequest | CompletionRequest, vocab_size: int) -> None:
    bad = next((t for t in request.stop_token_ids or [] if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            f"stop_token_ids: token id {bad} is out of the vocabulary [0, {vocab_size})", param="stop_token_ids"
        )
    bad_key = next((key for key in request.logit_bias or {} if int(key) >= vocab_size), None)
    if bad_key is not None:
        raise InvalidRequestError(
            f"logit_bias: token id {bad_key} is out of the vocabulary [0, {vocab_size})", param="logit_bias"
        )
