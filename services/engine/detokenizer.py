"""Incremental detokenization with stop strings, one instance per output sequence.

Two stages, each with its own state:

1. `_WindowDecoder` — the prefix-offset / read-offset method (as in HF text-generation-inference
   and vLLM). Only a short window of tokens is ever decoded:

       token_ids:  | ... dropped ... | prefix_offset .. read_offset | read_offset .. end |
                                     |<- already emitted context ->|<- not yet emitted ->|

   `prefix_text = decode(window[prefix:read])`, `full_text = decode(window[prefix:])`, and the new
   text is `full_text[len(prefix_text):]`. The context tokens give the tokenizer the neighbours it
   needs to place spaces; the window then slides to `prefix = read, read = end` and tokens before
   `prefix` are dropped, so each step costs O(window) whatever the output length.
   When `full_text` ends in U+FFFD, a multi-byte character is split across tokens: nothing is
   emitted and the window waits for more tokens (or `flush()`).
   The first window starts with the last `PROMPT_CONTEXT_TOKENS` prompt tokens as context (unless
   they end mid-character), so the first output token is decoded as it would be after the prompt.

   Invariant: `read_offset` only moves past tokens whose text ended in a complete character, so
   for byte-level BPE the emitted pieces concatenate to exactly
   `tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`.
   Clean-up of tokenization spaces is never applied: it rewrites across token boundaries, so no
   incremental decoder can reproduce it (transformers already skips it for BPE tokenizers).

2. `_StopStringMatcher` — finds `params.stop` in the decoded text even when split across tokens.
   The last `max_stop_chars - 1` characters are held back, because they may be the start of a
   stop string; each new piece is searched together with that held-back tail, which is exactly
   the lookback a match straddling the boundary needs. On a match the text is cut just before the
   stop string (just after it with `include_stop_str_in_output`) and nothing later is released.

`IncrementalDetokenizer` feeds stage 1 into stage 2 and keeps the released text for
`output_text` and `take_delta()`.
"""

from __future__ import annotations

from typing import cast

from transformers import PreTrainedTokenizerBase

from services.engine.sampling_params import SamplingParams

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded as left context for the first output token
_REPLACEMENT_CHAR = "\ufffd"


def decode_tokens(tokenizer: PreTrainedTokenizerBase, token_ids: list[int], skip_special_tokens: bool) -> str:
    """`tokenizer.decode(token_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`.

    A fast tokenizer's Rust backend is called directly: with clean-up off, transformers' own decode
    returns the backend's text unchanged after some microseconds of Python per call, and the engine
    makes two calls per request per step (tests/unit/test_detokenizer.py checks they agree).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
    # cast: one sequence decodes to a str; transformers annotates decode as str | list[str] (no overloads)
    return cast(
        str, tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
    )


class _WindowDecoder:
    """Token ids in, newly completed text out (the prefix-offset / read-offset method)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], skip_special_tokens: bool
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        if self._decode(context).endswith(_REPLACEMENT_CHAR):
            context = []  # the prompt ends mid-character: its tail would corrupt the first piece
        self._token_ids = context  # the window; earlier tokens are dropped
        self._prefix_offset = 0
        self._read_offset = len(context)

    def decode_new(self, new_token_ids: list[int]) -> str:
        """Append tokens; return text completed by them ('' while a character is incomplete)."""
        self._token_ids.extend(new_token_ids)
        new_text = self._pending_text()
        if not new_text or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._advance()
        return new_text

    def flush(self) -> str:
        """Return whatever is still held, incomplete characters decoded as U+FFFD."""
        new_text = self._pending_text()
        self._advance()
        return new_text

    def _pending_text(self) -> str:
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._token_ids[self._prefix_offset :])
        return full_text[len(prefix_text) :]

    def _advance(self) -> None:
        del self._token_ids[: self._read_offset]  # keep [read_offset:] as the next context
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)

    def _decode(self, token_ids: list[int]) -> str:
        return decode_tokens(self._tokenizer, token_ids, self._skip_special_tokens)


class _StopStringMatcher:
    """Text in, text safe to release out; reports the first stop string found."""

    def __init__(self, stops: list[str], include_stop_in_output: bool) -> None:
        self._stops = list(stops)
        self._include_stop_in_output = include_stop_in_output
        self._num_held_chars = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""  # the last `_num_held_chars` characters seen, not yet released

    def scan(self, new_text: str) -> tuple[str, str | None]:
        """Return (text now safe to release, matched stop string or None)."""
        window = self._held + new_text  # held-back tail = the lookback a straddling match needs
        match = self._first_match(window)
        if match is not None:
            position, stop = match
            self._held = ""
            end = position + len(stop) if self._include_stop_in_output else position
            return window[:end], stop
        split = max(len(window) - self._num_held_chars, 0)
        self._held = window[split:]
        return window[:split], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """(position, stop) of the earliest stop string in `text`; list order breaks ties."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            position = text.find(stop)
            if position >= 0 and (best is None or position < best[0]):
                best = (position, stop)
        return best


class IncrementalDetokenizer:
    """Decodes one output sequence as tokens arrive, cutting it at the first stop string.

    Owned by the detokenizing side of one request; not thread-safe. After a stop string matched
    or `finish()` ran, further `update()` calls are ignored and return None.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._decoder = _WindowDecoder(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self._matcher = _StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self._released: list[str] = []  # pieces of output_text, joined lazily
        self._undelivered: list[str] = []  # pieces not yet returned by take_delta()
        self._matched_stop: str | None = None
        self._done = False

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; return the stop string matched (the request then finishes), else None."""
        if self._done:
            return None
        return self._accept(self._decoder.decode_new(new_token_ids))

    def finish(self) -> None:
        """No more tokens will come: release held-back text."""
        if self._done:
            return
        self._accept(self._decoder.flush())
        if not self._done:
            self._release(self._matcher.flush())
        self._done = True

    @property
    def output_text(self) -> str:
        """All text that is safe to emit so far (final text after finish())."""
        if len(self._released) > 1:
            self._released = ["".join(self._released)]
        return self._released[0] if self._released else ""

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the text, if any (also found by finish())."""
        return self._matched_stop

    def take_delta(self) -> str:
        """Text emitted since the previous call (for streaming)."""
        delta = "".join(self._undelivered)
        self._undelivered.clear()
        return delta

    def _accept(self, new_text: str) -> str | None:
        if not new_text:
            return None
        released, stop = self._matcher.scan(new_text)
        self._release(released)
        if stop is not None:
            self._matched_stop = stop
            self._done = True
        return stop

    def _release(self, text: str) -> None:
        if text:
            self._released.append(text)
            self._undelivered.append(text)
