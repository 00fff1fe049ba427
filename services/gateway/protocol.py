"""OpenAI request and response schemas (pydantic, the HTTP boundary only).

Requests are parsed strictly, as OpenAI's API does: a string is never taken for a number or a
boolean, NaN and infinities are refused, and ranges match OpenAI's (temperature [0, 2], top_p (0, 1],
penalties [-2, 2], top_logprobs [0, 20]). Fields OpenAI has and we do not act on are either
accepted and ignored (`user`, `metadata`, `store`, ...: unknown fields are ignored) or refused when
they would change the answer (`suffix`, and the fields of other servers in REFUSED_FIELDS).
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
stop_token_ids, cache_salt, skip_special_tokens, include_stop_str_in_output, prompt_logprobs: never
with `stream`) are accepted as vLLM accepts them, and so are vLLM's /tokenize and /detokenize bodies
(services.gateway.tokenize).
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
    "guided_whitespace_pattern": ((None,), "guided_whitespace_pattern is not supported (JSON output is compact)"),
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


class JsonSchemaFormat(BaseModel):
    model_config = _REQUEST_CONFIG
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON value
    strict: bool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(BaseModel):
    model_config = _REQUEST_CONFIG
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extra: exactly one of its constraint fields."""

    model_config = _GENERATION_CONFIG  # unknown keys kept, to refuse them by name
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None


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
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # top-k besides each prompt token

    # output constraints (services.gateway.structured_outputs): OpenAI's, then vLLM's two generations
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted: the backend is llguidance whatever it names

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

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """The top-k alternatives the engine computes at each prompt position (None: none at all)."""
        return self.prompt_logprobs

    def check(self, max_n: int) -> None:
        """Checks across fields or against the deployment; raises InvalidRequestError."""
        _refuse_fields(self.model_extra, REFUSED_FIELDS)
        _require(self.num_choices_per_prompt <= max_n, "n", f"n must be at most {max_n}")
        _require(  # as vLLM: they belong to no chunk of a stream
            self.prompt_logprobs is None or not self.stream,
            "prompt_logprobs",
            "prompt_logprobs are not available when stream is true",
        )
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


class FunctionCallIn(BaseModel):
    """The function an earlier assistant turn called."""

    model_config = _REQUEST_CONFIG
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it (decoded for the chat template)


class ToolCallIn(BaseModel):
    model_config = _REQUEST_CONFIG
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    model_config = _REQUEST_CONFIG
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers
    tool_calls: list[ToolCallIn] | None = None  # an assistant message: the calls it made


# Tools (OpenAI's function tools; services.gateway.tools says what each tool_choice does)

MAX_TOOLS = 128  # tools in one request (OpenAI's limit)
MAX_TOOL_NAME_CHARS = 64  # OpenAI's limit
TOOL_CHOICES = ("none", "auto", "required")  # or a named function: {"type": "function", "function": {"name"}}


class FunctionDefinition(BaseModel):
    model_config = _REQUEST_CONFIG
    name: str = Field(min_length=1, max_length=MAX_TOOL_NAME_CHARS)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of type object; None: no arguments
    # accepted: "required" and named calls always follow the schema; "auto" ones are parsed, not constrained
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = _REQUEST_CONFIG
    type: str  # only "function": checked by check_tools, whose message names the tool
    function: FunctionDefinition | None = None


def check_tools(tools: list[ToolDefinition] | None, function_path: str = ".function") -> None:
    """Function tools only, each with a unique name and an object schema; raises InvalidRequestError.
    `function_path`: where a tool's name and parameters sit in the client's JSON, for the messages
    (chat nests them under `function`; the Responses API's tools are flat: "")."""
    names: set[str] = set()
    for index, tool in enumerate(tools or ()):
        where = f"tools[{index}]"
        function = where + function_path
        _require(
            tool.type == "function", "tools", f"{where}.type must be 'function' (only function tools are supported)"
        )
        if tool.function is None:
            raise InvalidRequestError(f"Missing required parameter: '{where}.function'.", param="tools")
        name = tool.function.name
        _require(name not in names, "tools", f"{function}.name: the tool name {name!r} is given twice")
        names.add(name)
        parameters = tool.function.parameters
        _require(
            parameters is None or parameters.get("type", "object") == "object",
            "tools",
            f"{function}.parameters must be a JSON schema of type 'object': a function's arguments are an object",
        )


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    # TOOL_CHOICES or a named function (`named_function`; a dict here, so a malformed one is check()'s
    # 400 naming tool_choice, not a parse error naming a union member); None: auto with tools
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # None: true

    @property
    def named_function(self) -> str | None:
        """The function a named tool_choice names; None when tool_choice is not one."""
        choice = self.tool_choice
        if not isinstance(choice, dict) or choice.get("type") != "function":
            return None
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        return name if isinstance(name, str) else None

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
        check_tools(self.tools)
        self._check_tool_choice()

    def _check_tool_choice(self) -> None:
        choice, name = self.tool_choice, self.named_function
        if choice is None or choice in ("none", "auto"):
            return  # without tools too: both leave a plain chat alone
        given = repr(choice) if isinstance(choice, str) else "an object without them"
        _require(
            name is not None or choice == "required",
            "tool_choice",
            "tool_choice must be 'none', 'auto', 'required' or "
            f'{{"type": "function", "function": {{"name": ...}}}}, not {given}',
        )
        needing = "'required'" if name is None else f"naming the function {name!r}"
        _require(bool(self.tools), "tool_choice", f"tool_choice {needing} needs tools")
        names = [tool.function.name for tool in self.tools or () if tool.function is not None]
        _require(
            name is None or name in names,
            "tool_choice",
            f"tool_choice names the function {name!r}, which is not among tools",
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

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """`echo` with `logprobs: k` covers the prompt's tokens too: k alternatives at each of them."""
        if not (self.echo and self.logprobs is not None):
            return self.prompt_logprobs
        return max(self.logprobs, self.prompt_logprobs or 0)

    def check(self, max_n: int) -> None:
        super().check(max_n)
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
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)  # rendered as the chat route renders them

    def check(self) -> None:
        _refuse_fields(self.model_extra, TOKENIZE_CHAT_REFUSED_FIELDS)
        check_tools(self.tools)


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


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallOut(BaseModel):
    id: str  # "call_" + random hex
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    """`content` is null when the answer is only tool calls; `tool_calls` appears only when there are some."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _tool_calls_when_made(self, handler) -> dict[str, Any]:
        fields = handler(self)
        if fields.get("tool_calls") is None:
            fields.pop("tool_calls", None)
        return fields


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class PromptLogprob(BaseModel):
    logprob: float
    rank: int
    decoded_token: str


# vLLM's prompt_logprobs: None for the first prompt token, then {token id: its logprob, rank and text},
# the prompt token first, then the top-k alternatives
PromptLogprobs = list[dict[str, PromptLogprob] | None]


def _without_unset_prompt_logprobs(fields: dict[str, Any]) -> dict[str, Any]:
    """The key appears only when the request asked for prompt logprobs (existing clients see no new key)."""
    if fields.get("prompt_logprobs", 0) is None:
        del fields["prompt_logprobs"]
    return fields


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None

    @model_serializer(mode="wrap")
    def _prompt_logprobs_when_asked(self, handler) -> dict[str, Any]:
        return _without_unset_prompt_logprobs(handler(self))


class _SetKeysOnly(BaseModel):
    """Serialized with the keys that are set (not None) only, as OpenAI's stream deltas are."""

    @model_serializer(mode="wrap")
    def _set_keys_only(self, handler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class FunctionCallDelta(_SetKeysOnly):
    name: str | None = None
    arguments: str | None = None  # a fragment: a call's fragments concatenate to its arguments


class ToolCallDelta(_SetKeysOnly):
    """A call's first delta has index, id, type and function.name (arguments ""); later ones index and
    an arguments fragment."""

    index: int  # the call's position among the choice's calls
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChatDelta(_SetKeysOnly):
    """Only the keys that are set: `{"role": "assistant", "content": ""}`, `{"content": "..."}`,
    `{"tool_calls": [...]}` or `{}`."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


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
    prompt_logprobs: PromptLogprobs | None = None

    @model_serializer(mode="wrap")
    def _prompt_logprobs_when_asked(self, handler) -> dict[str, Any]:
        return _without_unset_prompt_logprobs(handler(self))


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


# ----------------------------------------------------------------------------------------------
# OpenAI's Responses API: POST /v1/responses, stateless, text and function calls (services.gateway.responses_api)

ResponsesRole = Literal["user", "system", "developer", "assistant"]
MetadataKey = Annotated[str, Field(max_length=64)]  # OpenAI's limits
MetadataValue = Annotated[str, Field(max_length=512)]


class ResponsesContentPart(BaseModel):
    """A part of an input message: `input_text` and `output_text` parts are read, others refused."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ResponsesInputItem(BaseModel):
    """An item of `input`: a message (`type` "message", or none: role, content), a function call an
    earlier answer made ("function_call": call_id, name, arguments) or its result ("function_call_output":
    call_id, output); other item types are refused by name. The `id` and `status` of items sent back
    from an earlier answer are ignored."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str = "message"
    role: ResponsesRole | None = None
    content: str | list[ResponsesContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None  # a JSON object, as text
    output: str | list[ResponsesContentPart] | None = None


class ResponsesTool(BaseModel):
    """A tool, flat (chat nests the function's fields under `function`); only `function` tools are
    served, others are refused by type (services.gateway.responses_api.chat_tools)."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    name: str | None = Field(None, min_length=1, max_length=MAX_TOOL_NAME_CHARS)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # accepted, as on chat (services.gateway.tools)


class ResponsesTextFormat(_SetKeysOnly):
    """`text.format`: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "name",
    "schema", "description", "strict"}: chat's response_format, flat. Echoed in the response as given."""

    model_config = ConfigDict(strict=True, extra="allow", serialize_by_alias=True)
    type: str
    name: str | None = Field(None, min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponsesTextConfig(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    format: ResponsesTextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(BaseModel):
    model_config = _GENERATION_CONFIG  # unknown fields kept, so check() can refuse RESPONSES_REFUSED_FIELDS
    model: str
    input: str | list[ResponsesInputItem]
    instructions: str | None = None  # a system message before `input`
    max_output_tokens: Count | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool | None = False
    store: bool | None = None  # accepted; nothing is stored (the response says "store": false)
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)  # echoed
    user: str | None = None  # accepted, ignored
    parallel_tool_calls: bool | None = None  # as on chat; echoed
    tools: list[ResponsesTool] | None = Field(None, max_length=MAX_TOOLS)  # services.gateway.responses_api.chat_tools
    tool_choice: str | dict[str, Any] | None = None
    text: ResponsesTextConfig | None = None
    reasoning: dict[str, Any] | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: str | None = None
    background: bool | None = None
    prompt: dict[str, Any] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = None  # accepted, ignored (include_obfuscation)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # accepted, ignored: it only acts with `include`
    cache_salt: str | None = Field(None, min_length=1)  # vLLM's, as on the chat route

    def check(self) -> None:
        """Refuse, by name, what this stateless server cannot honour (hosted tools: responses_api.chat_tools);
        raises InvalidRequestError."""
        _refuse_fields(self.model_extra, RESPONSES_REFUSED_FIELDS)
        self._check_text_format()
        _require(
            self.text is None or self.text.verbosity in (None, "medium"),
            "text.verbosity",
            "text.verbosity is not supported by this model",
        )
        _require(
            all(value is None for value in (self.reasoning or {}).values()),
            "reasoning",
            "reasoning options are not supported by this model",
        )
        stateless = "this server is stateless: it stores no responses or conversations; send the whole "
        _require(self.previous_response_id is None, "previous_response_id", stateless + "conversation in `input`")
        _require(self.conversation is None, "conversation", stateless + "conversation in `input`")
        _require(not self.background, "background", stateless + "request without `background`")
        _require(self.prompt is None, "prompt", "stored prompt templates are not supported: send `input`")
        _require(not self.include, "include", "include is not supported")
        _require(
            self.truncation in (None, "disabled"),
            "truncation",
            'only truncation "disabled" is supported: a conversation too long is refused',
        )
        _require(
            not (self.prompt_cache_options or {}).get("prewarm"),
            "prompt_cache_options",
            "prompt_cache_options.prewarm is not supported",
        )

    def _check_text_format(self) -> None:
        text_format = self.text.format if self.text is not None else None
        if text_format is None:
            return
        _require(
            text_format.type in ("text", "json_object", "json_schema"),
            "text.format",
            f"text.format.type must be 'text', 'json_object' or 'json_schema', not {text_format.type!r}",
        )
        if text_format.type == "json_schema":
            for key, value in (("name", text_format.name), ("schema", text_format.schema_)):
                _require(value is not None, "text.format", f"Missing required parameter: 'text.format.{key}'.")


def _fields_of_the_other_routes() -> dict[str, tuple[tuple[Any, ...], str]]:
    """Each field of the chat and completions bodies that /v1/responses does not have, refused there
    unless at its default or a value that changes nothing: derived from those schemas, so a field they
    come to act on is never silently dropped here."""
    neutral = {"n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "top_k": (0, -1)}
    neutral |= {"min_p": (0, 0.0), "repetition_penalty": (1, 1.0), "best_of": (1,)}
    refused: dict[str, tuple[tuple[Any, ...], str]] = {}
    for schema in (ChatCompletionRequest, CompletionRequest):
        for name, info in schema.model_fields.items():
            key = info.alias or name
            if key in ResponsesRequest.model_fields:
                continue
            default = () if info.is_required() else (info.default,)
            harmless = refused.get(key, ((), ""))[0] + (None, *default, *neutral.get(key, ()))
            refused[key] = (harmless, f"{key} is not supported on /v1/responses")
    return refused


# Fields sent to /v1/responses that would change the answer and that it does not take: the chat and
# completions fields (it has its own names for some, none for the rest), those the chat route refuses, and
# server-side features. Any other unknown field (`service_tier`, `prompt_cache_key`, `max_tool_calls`:
# it counts calls of built-in tools, none of which are served, ...) leaves the answer alone.
RESPONSES_REFUSED_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    **REFUSED_FIELDS,
    **_fields_of_the_other_routes(),
    "messages": ((None,), "/v1/responses takes the conversation in `input`, not `messages`"),
    "max_tokens": ((None,), "/v1/responses takes `max_output_tokens`, not `max_tokens`"),
    "max_completion_tokens": ((None,), "/v1/responses takes `max_output_tokens`, not `max_completion_tokens`"),
    "response_format": ((None,), "/v1/responses takes `text.format`, not `response_format`"),
    "context_management": (_UNSET, "context management (compaction) is not supported"),
    "moderation": ((None,), "moderation is not supported"),
}


class ResponsesInputTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    cache_write_tokens: int = 0  # none billed: the prefix cache is automatic


class ResponsesOutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponsesUsage(BaseModel):
    input_tokens: int
    input_tokens_details: ResponsesInputTokensDetails
    output_tokens: int
    output_tokens_details: ResponsesOutputTokensDetails = ResponsesOutputTokensDetails()
    total_tokens: int


class ResponsesOutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = []


class ResponsesOutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[ResponsesOutputText]


class ResponsesFunctionCall(BaseModel):
    """A call the answer makes; the client runs it and sends the result back as a function_call_output item."""

    type: Literal["function_call"] = "function_call"
    id: str  # "fc_" + hex: the item
    call_id: str  # "call_" + hex: what the function_call_output names
    name: str
    arguments: str  # a JSON object, as text
    status: Literal["in_progress", "completed", "incomplete"]


ResponsesOutputItem = ResponsesOutputMessage | ResponsesFunctionCall


class ResponsesIncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponsesError(BaseModel):
    code: str  # OpenAI's codes for a failed response: "server_error", "rate_limit_exceeded", ...
    message: str


class ResponseObject(BaseModel):
    """A response: /v1/responses' answer, and what its stream's lifecycle events carry."""

    id: str
    object: Literal["response"] = "response"
    created_at: int  # unix seconds
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    completed_at: int | None = None
    error: ResponsesError | None = None
    incomplete_details: ResponsesIncompleteDetails | None = None
    model: str
    instructions: str | None = None
    output: list[ResponsesOutputItem]
    usage: ResponsesUsage | None = None
    max_output_tokens: int | None = None
    temperature: float
    top_p: float
    parallel_tool_calls: bool
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    text: ResponsesTextConfig
    truncation: Literal["disabled"] = "disabled"
    previous_response_id: str | None = None
    background: bool = False
    store: bool = False
    metadata: dict[str, str]
    user: str | None = None


# The stream's events (SSE `event: <type>`, `data: <the event>`), numbered by sequence_number from 0


class ResponsesLifecycleEvent(BaseModel):
    type: Literal[
        "response.created", "response.in_progress", "response.completed", "response.incomplete", "response.failed"
    ]
    sequence_number: int
    response: ResponseObject


class ResponsesOutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: ResponsesOutputItem


class ResponsesContentPartEvent(BaseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: ResponsesOutputText


class ResponsesTextDeltaEvent(BaseModel):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[dict[str, Any]] = []


class ResponsesTextDoneEvent(BaseModel):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[dict[str, Any]] = []


class ResponsesArgumentsDeltaEvent(BaseModel):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ResponsesArgumentsDoneEvent(BaseModel):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int
    item_id: str
    output_index: int
    arguments: str


class ResponsesErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    sequence_number: int
    code: str | None = None
    message: str
    param: str | None = None
