"""Structured outputs in the engine: each constrained request carries a grammar matcher, and every
step masks its row's logits to the tokens the grammar allows next.

Per step (LLMEngine._launch), after the forward is queued on the device and before the sampling is:
  1. `fill` brings each constrained row's matcher up to date with the request's output tokens
     (one consumed token per step in steady state; all of them after a handoff from a prefill
     worker, which constrained the first token with the same spec) and writes the row's allowed-token
     bitmask into a pinned host buffer: llguidance's executor computes the rows on its own threads,
     without the GIL, while the device runs the forward;
  2. the bitmask goes to the device with the sampler's other inputs and the sampler sets every
     disallowed logit to -inf (services.engine.sampler._apply_token_bitmask) before penalties,
     temperature and top-k/top-p, so the sampled token is always one the grammar allows.
After collection, `advance` feeds the sampled token to the matcher; once the grammar can take no
further token (llguidance's `is_stopped`: the object is closed and nothing may follow), the engine
ends the request as stopped, with or without an end-of-sequence token.

Invariants:
  - A matcher has consumed exactly the request's output tokens before its row is masked, so the
    mask never depends on the batch, the path (graph or eager) or the worker that sampled earlier tokens.
  - Unconstrained rows of a batch keep an all-ones mask row; a batch without constrained rows sends
    no mask at all (the sampler's plain path).
  - With asynchronous scheduling, a step launched ahead queues its forward first and only then waits
    for the step in flight's tokens, which its masks need (LLMEngine._grammar_bitmask): the wait
    overlaps the new forward, and the matcher consumes the pending token before collection appends
    it (`advance` then finds it consumed).

Bitmask layout (llguidance's): int32 words, token t allowed iff bit (t % 32) of word t // 32 is set.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from services.common.errors import InvalidRequestError
from services.common.lru import BytesLRU
from services.common.messages import StructuredSpec
from services.common.structured import GrammarError, grammar_definition

logger = logging.getLogger(__name__)

GRAMMAR_CACHE_BYTES = 16 * 2**20  # grammar definitions kept by spec (agents resend the same schema)
ALL_ALLOWED = -1  # an int32 word with every bit set


@dataclass(eq=False)
class GrammarState:
    """One request's matcher and how many of its output tokens it has consumed."""

    matcher: llguidance.LLMatcher
    num_consumed: int = 0


class GrammarMasks:
    """Owns the grammar tokenizer (built on first use: about a second for a 128k vocabulary), the
    compiled-grammar cache, the mask executor and the double-buffered pinned mask buffers."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int], max_rows: int, device: torch.device):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self.device = device
        self._max_rows = max_rows
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._definitions: BytesLRU[StructuredSpec, str] = BytesLRU(GRAMMAR_CACHE_BYTES, len)
        self._buffers: list[torch.Tensor] = []
        self._next_buffer = 0

    # ------------------------------------------------------------------ requests

    def matcher_for(self, spec: StructuredSpec) -> GrammarState:
        """A fresh matcher for `spec`; raises InvalidRequestError when it does not compile."""
        definition = self._definitions.get(spec)
        if definition is None:
            try:
                definition = grammar_definition(spec)
            except GrammarError as exc:
                raise InvalidRequestError(
                    f"the output constraint does not compile: {exc}", param="response_format"
                ) from exc
            self._definitions.put(spec, definition)
        matcher = llguidance.LLMatcher(self._tokenizer(), definition, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(
                f"the output constraint does not compile: {matcher.get_error()}", param="response_format"
            )
        return GrammarState(matcher)

    def advance(self, state: GrammarState, output_token_ids: Sequence[int]) -> bool:
        """Feed the matcher the outputs it has not seen; True when the output must end here (the grammar
        is complete and takes nothing more, or a token broke it, which the mask should have prevented)."""
        for token_id in output_token_ids[state.num_consumed :]:
            state.matcher.consume_token(token_id)
            state.num_consumed += 1
        if state.matcher.is_error():
            logger.warning("a sampled token left its grammar: %s", state.matcher.get_error())
            return True
        return state.matcher.is_stopped()

    # ------------------------------------------------------------------ steps

    def fill(self, states: Sequence[GrammarState | None], outputs: Sequence[Sequence[int]]) -> torch.Tensor | None:
        """The allowed-token bitmask of a batch's rows ([num_rows, words] int32 on the device), or None
        when no row is constrained. `outputs[i]` are row i's output tokens so far."""
        rows = [(row, state) for row, state in enumerate(states) if state is not None]
        if not rows:
            return None
        host = self._buffer(len(states))
        host.fill_(ALL_ALLOWED)
        for row, state in rows:
            self.advance(state, outputs[row])
        llguidance.torch.fill_next_token_bitmask_par(self._mask_executor(), [(s.matcher, row) for row, s in rows], host)
        return host.to(self.device, non_blocking=True) if self.device.type == "cuda" else host.clone()

    def _buffer(self, num_rows: int) -> torch.Tensor:
        """A pinned host buffer of `num_rows` mask rows. Two alternate: one may still be copying to the
        device for the step in flight while the next step's masks are written."""
        if not self._buffers or self._buffers[0].shape[0] < num_rows:
            rows = max(num_rows, self._max_rows)
            pin = self.device.type == "cuda"
            shape = llguidance.torch.get_bitmask_shape(rows, self.vocab_size)
            self._buffers = [torch.empty(shape, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        buffer = self._buffers[self._next_buffer]
        self._next_buffer ^= 1
        return buffer[:num_rows]

    def _tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_token_ids or None
            )
        return self._ll_tokenizer

    def _mask_executor(self) -> llguidance.LLExecutor:
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        return self._executor
