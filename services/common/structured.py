"""Output constraints as grammars: one StructuredSpec -> one llguidance grammar definition.

The gateway compiles every constraint before admitting a request (so a schema the engine cannot
compile is a 400 naming the client's field, never a worker failure), and each engine compiles it
again into a matcher of its own (services.engine.structured). Both call `grammar_definition`, so they
can never disagree on what a spec means.

Why llguidance (guidance-ai/llguidance): it has no Python dependencies (one abi3 wheel, so the same
wheel serves Python 3.11 and 3.12), it computes a token mask for a 128k vocabulary in tens of
microseconds without precompiling the grammar against the vocabulary (a new JSON schema costs no
startup), and it takes JSON schemas, regular expressions and Lark or GBNF grammars alike.

JSON is compact by default (no whitespace between tokens, `whitespace_flexible` off): a model with
random or weak weights otherwise fills its whole budget with spaces and newlines inside a valid
object. A schema may still opt in through llguidance's own `x-guidance` options.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import llguidance

from services.common.messages import StructuredSpec

if TYPE_CHECKING:  # a stub-only type
    from llguidance._lib import JsonCompileOptions

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_BYTES = 256 * 1024  # a schema or grammar larger than this is refused (compile time is unbounded)
_COMPACT: JsonCompileOptions = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """The spec does not compile; the message says why (it is shown to the client)."""


def grammar_definition(spec: StructuredSpec) -> str:
    """llguidance's grammar definition for `spec` (not yet checked against a tokenizer); raises GrammarError."""
    if len(spec.value) > MAX_SPEC_BYTES:
        raise GrammarError(f"the constraint is {len(spec.value)} bytes; at most {MAX_SPEC_BYTES} are accepted")
    try:
        if spec.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=_COMPACT)
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_COMPACT)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.value)
        if spec.kind == "choice":
            choices = json.loads(spec.value)
            if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
                raise GrammarError("choices must be a non-empty list of strings")
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        if spec.kind == "grammar":  # Lark, or GBNF (llama.cpp's, as vLLM's guided_grammar takes)
            return llguidance.grammar_from("grammar", spec.value)
    except (ValueError, TypeError) as exc:  # json errors are ValueErrors too
        raise GrammarError(str(exc)) from exc
    raise GrammarError(f"unknown constraint kind {spec.kind!r}; expected one of {', '.join(KINDS)}")


def check_compiles(spec: StructuredSpec) -> None:
    """Raise GrammarError unless `spec` compiles (tokenizer-independent checks: syntax, schema keywords)."""
    error = llguidance.LLMatcher.validate_grammar(grammar_definition(spec))
    if error:
        raise GrammarError(error)
