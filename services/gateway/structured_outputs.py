"""A request's output constraint, from whichever field the client used, checked before admission.

Clients name a constraint in one of four ways, all honoured and all meaning the same StructuredSpec:
  OpenAI          response_format {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}
  vLLM (current)  structured_outputs {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
  vLLM (earlier)  guided_json, guided_regex, guided_choice, guided_grammar
  tool calling    tool_choice "required" or a named function (services.gateway.tools.tool_constraint)
At most one may be given: two would each claim the whole output, so a second one is a 400 naming it.
A constraint that does not compile is a 400 naming the client's field (the engine compiles the same
definition, services.common.structured, so it cannot fail there instead).
"""

from __future__ import annotations

import json
from typing import Any

from services.common.errors import InvalidRequestError
from services.common.messages import StructuredSpec
from services.common.structured import GrammarError, check_compiles
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest, StructuredOutputs
from services.gateway.tools import tool_constraint

GenerationRequest = ChatCompletionRequest | CompletionRequest


def structured_spec(request: GenerationRequest) -> StructuredSpec | None:
    """The request's output constraint (not compiled: `check_structured` does that); raises
    InvalidRequestError naming the field when two are given or one is malformed."""
    named = _named_constraint(request)
    return named[1] if named else None


def check_structured(request: GenerationRequest) -> None:
    """Raise InvalidRequestError naming the field unless the request's constraint (if any) compiles."""
    named = _named_constraint(request)
    if named is None:
        return
    param, spec = named
    try:
        check_compiles(spec)
    except GrammarError as exc:
        raise InvalidRequestError(f"{param} does not compile to a grammar: {exc}", param=param) from exc


def _named_constraint(request: GenerationRequest) -> tuple[str, StructuredSpec] | None:
    found = _constraints(request)
    if len(found) > 1:
        (first, _), (second, _) = found[:2]
        raise InvalidRequestError(f"{second} cannot be combined with {first}: give one output constraint", second)
    return found[0] if found else None


def _constraints(request: GenerationRequest) -> list[tuple[str, StructuredSpec]]:
    """(the client's field, its constraint) for every constraint the request gives, in a fixed order."""
    found: list[tuple[str, StructuredSpec]] = []
    response_format = request.response_format
    if response_format is not None and response_format.type == "json_object":
        found.append(("response_format", StructuredSpec(kind="json_object")))
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise InvalidRequestError(
                'response_format of type "json_schema" needs its json_schema', param="response_format.json_schema"
            )
        schema = response_format.json_schema.schema_
        found.append(
            ("response_format", StructuredSpec(kind="json", value=json.dumps({} if schema is None else schema)))
        )
    if request.structured_outputs is not None:
        found.append(("structured_outputs", _from_structured_outputs(request.structured_outputs)))
    if request.guided_json is not None:
        found.append(("guided_json", StructuredSpec(kind="json", value=_json_text(request.guided_json, "guided_json"))))
    if request.guided_regex is not None:
        found.append(("guided_regex", StructuredSpec(kind="regex", value=request.guided_regex)))
    if request.guided_choice is not None:
        found.append(("guided_choice", StructuredSpec(kind="choice", value=json.dumps(request.guided_choice))))
    if request.guided_grammar is not None:
        found.append(("guided_grammar", StructuredSpec(kind="grammar", value=request.guided_grammar)))
    tool_spec = _tool_constraint(request)
    if tool_spec is not None:
        found.append(("tool_choice", tool_spec))
    return found


def _from_structured_outputs(params: StructuredOutputs) -> StructuredSpec:
    for key in params.model_extra or {}:
        raise InvalidRequestError(f"structured_outputs.{key} is not supported", param=f"structured_outputs.{key}")
    given: list[StructuredSpec] = []
    if params.json_ is not None:
        given.append(StructuredSpec(kind="json", value=_json_text(params.json_, "structured_outputs.json")))
    if params.regex is not None:
        given.append(StructuredSpec(kind="regex", value=params.regex))
    if params.choice is not None:
        given.append(StructuredSpec(kind="choice", value=json.dumps(params.choice)))
    if params.grammar is not None:
        given.append(StructuredSpec(kind="grammar", value=params.grammar))
    if params.json_object:
        given.append(StructuredSpec(kind="json_object"))
    if len(given) != 1:
        raise InvalidRequestError(
            "structured_outputs must give exactly one of json, regex, choice, grammar, json_object",
            param="structured_outputs",
        )
    return given[0]


def _json_text(schema: dict[str, Any] | str, param: str) -> str:
    """A schema given as an object or as JSON text, as JSON text (checked to be a JSON object)."""
    if isinstance(schema, dict):
        return json.dumps(schema)
    try:
        parsed = json.loads(schema)
    except ValueError as exc:
        raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from exc
    if not isinstance(parsed, dict):
        raise InvalidRequestError(f"{param} must be a JSON schema object", param=param)
    return schema


def _tool_constraint(request: GenerationRequest) -> StructuredSpec | None:
    """tool_choice "required" or a named function constrains the output to the tools' arguments."""
    return tool_constraint(request) if isinstance(request, ChatCompletionRequest) else None
