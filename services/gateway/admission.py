"""Admission: refuse work the cluster cannot start soon, before doing any of it.

A request is *queued* from admission until its first token arrives (or it ends), and *in flight*
until it ends. Four budgets bound the queue, each counted in its own unit:

    max_queued_requests      queued HTTP requests
    max_queued_sequences     their sequences: n x prompts (a /v1/completions batch of 64 prompts with
                             n=16 is 1,024 sequences for the engines, not one)
    max_queued_prompt_bytes  UTF-8 bytes of the prompt text admitted and not yet tokenized: what waits
                             for the tokenizer threads (text becomes tokens there, and leaves this budget)
    max_queued_tokens        prompt tokens of the queued requests (known once tokenized)

    admit(num_sequences, num_prompt_bytes)   before tokenizing: takes a request slot, the sequences
                                             and the bytes (429 "requests", "sequences" or "bytes")
    ticket.tokenized(num_prompt_tokens)      gives the bytes back, takes the tokens (429 "tokens")
    ticket.leave_queue()                     first token: gives back what the queue holds
    ticket.release()                         the request ended, however: gives back everything (idempotent)

One rule for every budget counted by amount: a request larger than a whole budget is still admitted
when nothing else holds any of that budget, so it is served eventually instead of refused forever.

All methods run on the event loop thread and never await, so check-and-take is atomic.
"""

from __future__ import annotations


class AdmissionRejected(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # the budget that was full: "requests", "sequences", "bytes" or "tokens"


def _overloaded(reason: str, what: str) -> AdmissionRejected:
    return AdmissionRejected(reason, f"The server is overloaded ({what}). Please retry later.")


def _fits(held_by_others: int, amount: int, limit: int) -> bool:
    """Whether `amount` more fits a budget of `limit`: anything fits a budget no one else holds, and
    nothing (a prompt of token ids has no text to tokenize) fits any budget."""
    return amount == 0 or held_by_others == 0 or held_by_others + amount <= limit


class AdmissionController:
    def __init__(
        self,
        max_queued_requests: int,
        max_queued_tokens: int,
        max_queued_sequences: int,
        max_queued_prompt_bytes: int,
    ) -> None:
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.max_queued_sequences = max_queued_sequences
        self.max_queued_prompt_bytes = max_queued_prompt_bytes
        self.num_queued_requests = 0
        self.num_queued_sequences = 0
        self.num_queued_prompt_bytes = 0  # untokenized prompt text
        self.num_queued_tokens = 0
        self.num_in_flight = 0

    def admit(self, num_sequences: int = 1, num_prompt_bytes: int = 0) -> AdmissionTicket:
        """Take a request slot, `num_sequences` and `num_prompt_bytes` (and an in-flight slot);
        raises AdmissionRejected, taking nothing, when any of those budgets is full."""
        if self.num_queued_requests >= self.max_queued_requests:
            raise _overloaded("requests", f"{self.num_queued_requests} requests waiting for their first token")
        if not _fits(self.num_queued_sequences, num_sequences, self.max_queued_sequences):
            raise _overloaded("sequences", f"{self.num_queued_sequences} sequences waiting for their first token")
        if not _fits(self.num_queued_prompt_bytes, num_prompt_bytes, self.max_queued_prompt_bytes):
            raise _overloaded("bytes", f"{self.num_queued_prompt_bytes} bytes of prompt text waiting to be tokenized")
        self.num_queued_requests += 1
        self.num_queued_sequences += num_sequences
        self.num_queued_prompt_bytes += num_prompt_bytes
        self.num_in_flight += 1
        return AdmissionTicket(self, num_sequences, num_prompt_bytes)


class AdmissionTicket:
    """One request's share of the counters; `release()` gives back whatever is still held."""

    def __init__(self, controller: AdmissionController, num_sequences: int, num_prompt_bytes: int) -> None:
        self._controller = controller
        self._num_sequences = num_sequences
        self._num_prompt_bytes = num_prompt_bytes
        self._num_tokens = 0
        self._queued = True
        self._in_flight = True

    def tokenized(self, num_prompt_tokens: int) -> None:
        """The prompts are tokens now: their bytes leave the byte budget and their tokens enter the
        token budget; raises AdmissionRejected ("tokens") when that is full (the ticket keeps the
        request slot and sequences until it is released)."""
        self._give_back_prompt_bytes()
        if not self._queued:
            return
        controller = self._controller
        held_by_others = controller.num_queued_tokens - self._num_tokens
        if not _fits(held_by_others, self._num_tokens + num_prompt_tokens, controller.max_queued_tokens):
            raise _overloaded("tokens", f"{held_by_others} prompt tokens waiting for their first token")
        self._num_tokens += num_prompt_tokens
        controller.num_queued_tokens += num_prompt_tokens

    def leave_queue(self) -> None:
        """The first token arrived: the request no longer counts as queued."""
        if self._queued:
            self._queued = False
            self._give_back_prompt_bytes()
            controller = self._controller
            controller.num_queued_requests -= 1
            controller.num_queued_sequences -= self._num_sequences
            controller.num_queued_tokens -= self._num_tokens

    def release(self) -> None:
        """The request ended (however it ended). Idempotent."""
        self.leave_queue()
        if self._in_flight:
            self._in_flight = False
            self._controller.num_in_flight -= 1

    def _give_back_prompt_bytes(self) -> None:
        self._controller.num_queued_prompt_bytes -= self._num_prompt_bytes
        self._num_prompt_bytes = 0
