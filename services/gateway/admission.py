"""Admission: refuse work the cluster cannot start soon, before doing any of it.

A request is *queued* from admission until its first token arrives (or it ends), and *in flight*
until it ends. Two limits bound the queue:

    max_queued_requests   queued requests
    max_queued_tokens     their prompt tokens

`admit()` takes a request slot before the prompt is tokenized; `AdmissionTicket.add_prompt_tokens`
then checks the token budget. A prompt larger than the whole token budget is still admitted when
nothing else is queued, so it is served eventually instead of being refused forever.

All methods run on the event loop thread and never await, so check-and-take is atomic.
"""

from __future__ import annotations


class AdmissionRejected(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "requests" or "tokens": the limit that was reached


class AdmissionController:
    def __init__(self, max_queued_requests: int, max_queued_tokens: int) -> None:
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.num_queued_requests = 0
        self.num_queued_tokens = 0
        self.num_in_flight = 0

    def admit(self) -> AdmissionTicket:
        """Take a queue slot and an in-flight slot; raises AdmissionRejected when the queue is full."""
        if self.num_queued_requests >= self.max_queued_requests:
            raise AdmissionRejected(
                "requests",
                f"The server is overloaded ({self.num_queued_requests} requests waiting "
                "for their first token). Please retry later.",
            )
        self.num_queued_requests += 1
        self.num_in_flight += 1
        return AdmissionTicket(self)


class AdmissionTicket:
    """One request's share of the counters; `release()` gives back whatever is still held."""

    def __init__(self, controller: AdmissionController) -> None:
        self._controller = controller
        self._num_tokens = 0
        self._queued = True
        self._in_flight = True

    def add_prompt_tokens(self, num_tokens: int) -> None:
        controller = self._controller
        queued_by_others = controller.num_queued_tokens - self._num_tokens
        if queued_by_others > 0 and queued_by_others + self._num_tokens + num_tokens > controller.max_queued_tokens:
            raise AdmissionRejected(
                "tokens",
                f"The server is overloaded ({queued_by_others} prompt tokens waiting "
                "for their first token). Please retry later.",
            )
        self._num_tokens += num_tokens
        controller.num_queued_tokens += num_tokens

    def leave_queue(self) -> None:
        """The first token arrived: the request no longer counts as queued."""
        if self._queued:
            self._queued = False
            self._controller.num_queued_requests -= 1
            self._controller.num_queued_tokens -= self._num_tokens

    def release(self) -> None:
        """The request ended (however it ended). Idempotent."""
        self.leave_queue()
        if self._in_flight:
            self._in_flight = False
            self._controller.num_in_flight -= 1
