"""OpenAI request and response schemas (pydantic, the HTTP boundary only).

Requests are parsed strictly, as OpenAI's API does: a string is never taken for a number or a
boolean, NaN and infinities are refused, and ranges match OpenAI's (temperature [0, 2], top_p (0, 1],
penalties [-2, 2], top_logprobs [0, 20]). Fields OpenAI has and we do not act on are either
accepted and ignored (`user`, `metadata`, `store`, ...: unknown fields are ignored) or refused when
they would change the answer (`echo`, `suffix`, `tools`, non-text `response_format`,
and the fields of other servers in REFUSED_FIELDS: vLLM's guided decoding, `prompt_logprobs`, ...).
Checks that involve two fields or the deployment (`n` against max_n, `top_logprobs` without
`logprobs`) live in `check()`, which raises InvalidRequestError naming the field; those against the
model (lengths against max_model_len, token ids against the vocabulary) in
services.gateway.prompts.check_before_tokenizing.

Every number has an upper and a lower bound here, so no client value can overflow the worker
messages (msgpack holds at most 64-bit integers; an unbounded `top_k` of 10**23 used to be a 500).
Counts and token ids are capped statically at INT32_MAX (every context length and vocabulary fits),
then against the model before tokenizing; `top_k` keeps only the static cap because the sampler
clamps it to the vocabulary (services.engine.sampler._effective_top_k).

vLLM's extra sampling fields (top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
stop_token_ids, cache_salt, skip_special_tokens, include_stop_str_in_output) are accepted as vLLM
accepts them, and so are vLLM's /tokenize and /detokenize bodies (services.gateway.tokenize).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_serializer

from services.common.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16  # the engine's limit (services.engine.sampling_params)
MAX_STOP_TOKEN_IDS = 1024  # stop_token_ids entries; far more than any real use, small on the wire
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
MAX_LOGIT_BIAS_ENTRIES = 1024  # OpenAI allows 300; far more than any use, small on the wire
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1  # static cap on counts and token ids (context lengths and vocabularies fit)

_REQUEST_CONFIG = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")
# the generation bodies keep unknown fields (model_extra), so check() can refuse REFUSED_FIELDS by name
_GENERATION_CONFIG = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")

# Fields that vLLM (or OpenAI) clients send and that would change the answer, which tristage does not act
# on yet: refused with a 400 naming the field, never silently ignored (a client moving from vLLM would
# otherwise get unconstrained text where it asked for JSON). name -> (values that change nothing, why).
# Any other unknown field (`metadata`, `store`, `service_tier`, `priority`, ...) leaves the answer alone.
_UNSET: tuple[Any, ...] = (None, False, "", [], {})
REFUSED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    **{
        name: (_UNSET, "structured outputs (vLLM's guided decoding) are not supported yet")
        for name in (
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
            "guided_decoding_backend",
            "guided_whitespace_pattern",
            "structured_outputs",
        )
    },
    "prompt_logprobs": ((None,), "prompt_logprobs is not supported yet"),
    "allowed_token_ids": (_UNSET, "allowed_token_ids is not supported"),
    "bad_words": (_UNSET, "bad_words is not supported"),
    "logits_processors": (_UNSET, "logits_processors is not supported"),
    "use_beam_search": (_UNSET, "beam search is not supported"),
    "truncate_prompt_tokens": ((None,), "truncate_prompt_tokens is not supported"),
    "chat_template": (_UNSET, "a per-request chat_template is not supported"),
    "chat_template_kwargs": (_UNSET, "chat_template_kwargs is not supported"),
    "continue_final_message": (_UNSET, "continue_final_message is not supported"),
    "add_generation_prompt": ((None, True), "add_generation_prompt may only be true"),
    "documents": (_UNSET, "documents are not supported"),
    "functions": (_UNSET, "functions are not supported by this model"),
    "function_call": ((None, "none", "auto"), "function_call is not supported by this model"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), 'only modalities ["text"] is supported'),
    "web_search_options": ((None,), "web search is not supported"),
}

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Count = Annotated[int, Field(ge=1, le=INT32_MAX)]  # n, best_of, max_tokens: then against max_n / the model
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]  # then against the vocabulary
TokenIds = list[int]  # prompt token ids: checked against the vocabulary before tokenizing


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG
    include_usage: bool | None = None


class _GenerationRequest(BaseModel):
    """Fields both endpoints share."""

    model_config = _GENERATION_CONFIG

    model: str
    n: Count | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    max_tokens: Count | None = None
    user: str | None = None  # accepted, ignored
    # token id (a string of digits, as OpenAI's) -> bias; ids checked against the vocabulary before tokenizing
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS_ENTRIES
    )

    # vLLM's extras
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)  # the sampler clamps it to the vocabulary
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(0, ge=0, le=INT32_MAX)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    cache_salt: str | None = Field(None, min_length=1)
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False

    @property
    def num_choices_per_prompt(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def effective_max_tokens(self) -> int | None:
        return self.max_tokens

    def check(self, max_n: int) -> None:
        """Checks across fields or against the deployment; raises InvalidRequestError."""
        _refuse_fields(self.model_extra, REFUSED_FIELDS)
        _require(self.num_choices_per_prompt <= max_n, "n", f"n must be at most {max_n}")
        _require(
            self.stream_options is None or bool(self.stream),
            "stream_options",
            "stream_options is only allowed when stream is true",
        )
        stop = self.stop_list
        _require(
            len(stop) <= MAX_STOP_SEQUENCES,
            "stop",
            f"stop may hold at most {MAX_STOP_SEQUENCES} sequences, not {len(stop)}",
        )
        _require(all(stop), "stop", "stop sequences must not be empty")
        _require(
            all(key.isascii() and key.isdigit() and len(key) <= 10 for key in self.logit_bias or {}),
            "logit_bias",
            "logit_bias keys must be token ids (strings of digits)",
        )
        max_tokens = self.effective_max_tokens()
        _require(
            max_tokens is None or (self.min_tokens or 0) <= max_tokens,
            "min_tokens",
            "min_tokens must not exceed max_tokens",
        )


# ----------------------------------------------------------------------------------------------
# Chat


class ContentPart(BaseModel):
    """One part of a message's content; only `text` parts are served by text models."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = _REQUEST_CONFIG
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None  # refused unless empty
    tool_choice: str | dict[str, Any] | None = None  # only "none" / "auto" without tools
    response_format: ResponseFormat | None = None  # only {"type": "text"}

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self, max_n: int) -> None:
        super().check(max_n)
        _require(
            self.top_logprobs is None or bool(self.logprobs),
            "top_logprobs",
            "top_logprobs requires logprobs to be true",
        )
        _require(not self.tools, "tools", "tools are not supported by this model")
        _require(
            self.tool_choice in (None, "none", "auto"), "tool_choice", "tool_choice is not supported by this model"
        )
        _require(
            self.response_format is None or self.response_format.type == "text",
            "response_format",
            'only response_format {"type": "text"} is supported',
        )


# ----------------------------------------------------------------------------------------------
# Completions


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: Count | None = None

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def check(self, max_n: int) -> None:
        super().check(max_n)
        _require(not self.echo, "echo", "echo is not supported")
        _require(self.suffix is None, "suffix", "suffix is not supported")
        _require(
            self.best_of is None or self.best_of == self.num_choices_per_prompt,
            "best_of",
            "best_of is not supported (it may only equal n)",
        )


def _require(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message, param=param)


def _refuse_fields(extra: dict[str, Any] | None, refused: dict[str, tuple[tuple[Any, ...], str]]) -> None:
    """Refuse, by name, each unknown field in `refused` whose value is not one of its harmless ones."""
    for name, value in (extra or {}).items():
        if name in refused:
            harmless, message = refused[name]
            _require(any(value == h and type(value) is type(h) for h in harmless), name, message)


# ----------------------------------------------------------------------------------------------
# Tokenization: vLLM's /tokenize and /detokenize

# vLLM's TokenizeChatRequest fields that would change the tokens, which tristage does not act on
TOKENIZE_CHAT_REFUSED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    **{
        name: REFUSED_FIELDS[name]
        for name in ("chat_template", "chat_template_kwargs", "continue_final_message", "documents")
    },
    "tools": (_UNSET, "tools are not supported by this model"),
    "mm_processor_kwargs": (_UNSET, "mm_processor_kwargs is not supported"),
    "prompt": ((None,), "give either 'prompt' or 'messages', not both"),
}


class TokenizeCompletionRequest(BaseModel):
    """A prompt to tokenize as /v1/completions tokenizes a string prompt."""

    model_config = _REQUEST_CONFIG
    model: str | None = None  # None: the served model (as in vLLM)
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(BaseModel):
    """Messages to render with the chat template and tokenize as /v1/chat/completions does."""

    model_config = _GENERATION_CONFIG  # unknown fields kept, so check() can refuse vLLM's by name
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the template holds the special tokens already
    return_token_strs: bool | None = False

    def check(self) -> None:
        _refuse_fields(self.model_extra, TOKENIZE_CHAT_REFUSED_FIELDS)


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest
_JSON_OBJECT: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


def parse_tokenize_request(body: bytes) -> TokenizeRequest:
    """A body with `messages` is a chat, any other a prompt (vLLM's two shapes). Chosen by that key
    rather than by a union, so an error names the body's own field, never a union member; raises
    pydantic's ValidationError."""
    fields = _JSON_OBJECT.validate_json(body)
    schema: type[TokenizeRequest] = TokenizeChatRequest if "messages" in fields else TokenizeCompletionRequest
    return schema.model_validate(fields)


class DetokenizeRequest(BaseModel):
    model_config = _REQUEST_CONFIG
    model: str | None = None
    tokens: list[TokenId]  # then against the vocabulary


# ----------------------------------------------------------------------------------------------
# Responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """Only the keys that are set: `{"role": "assistant", "content": ""}`, `{"content": "..."}` or `{}`."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _set_keys_only(self, handler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """Also the streaming chunk (OpenAI uses object "text_completion" for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tristage"
    max_model_len: int | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # with return_token_strs


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
