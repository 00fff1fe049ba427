"""One HTTP request's run on the backend: its engine requests merged into one stream of deltas.

A /v1/completions batch of P prompts with n completions each becomes P engine requests; choice
`p * n + i` of the answer is completion `i` of prompt `p`:

    prompt 0 -> request_id        (or request_id-0 when P > 1)   choices 0 .. n-1
    prompt 1 -> request_id-1                                     choices n .. 2n-1

One task per engine request pumps the backend's deltas into a queue; `next_delta()` takes them out
in arrival order, merging the deltas of one engine request that are already waiting into one (as
vLLM's output collector does): a stream that fell behind catches up in one event carrying several
tokens instead of one event per token, so the gateway's cost per token falls as its load rises,
and at low load nothing waits and nothing is merged.

`close()` is the single exit: it releases the admission ticket at once, stops the pumps, aborts
every engine request that has not finished (shielded from cancellation, bounded by abort_timeout_s)
and records the end-to-end metrics. Every exit path of the gateway calls it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import msgspec

from services.common.messages import RequestDelta, SamplingSpec
from services.gateway.admission import AdmissionTicket
from services.gateway.backend import Backend, PromptImage
from services.gateway.metrics import GatewayMetrics
from services.gateway.ttft import TTFTParts

logger = logging.getLogger(__name__)


class BackendStreamEnded(Exception):
    """The backend's iterator stopped before a delta with `finished`."""


@dataclass
class _Tally:
    """One engine request's tokens and times, for its metrics when it ends."""

    first_token_s: float
    last_token_s: float
    tokens_by_completion: dict[int, int]


@dataclass(frozen=True)
class Arrival:
    request_id: str
    arrival_s: float  # time.monotonic() when the HTTP request arrived


class Generation:
    def __init__(
        self,
        backend: Backend,
        arrival: Arrival,
        prompts: list[list[int]],
        sampling: SamplingSpec,
        cache_salt: str | None,
        ticket: AdmissionTicket,
        metrics: GatewayMetrics,
        abort_timeout_s: float,
        images: Sequence[PromptImage] = (),
    ) -> None:
        self._backend = backend
        self._arrival = arrival
        self._prompts = prompts
        self._sampling = sampling
        self._cache_salt = cache_salt
        self._ticket = ticket
        self._metrics = metrics
        self._abort_timeout_s = abort_timeout_s
        self._images = images  # of the one prompt of a chat request
        if len(prompts) == 1:
            self.engine_request_ids = [arrival.request_id]
        else:
            self.engine_request_ids = [f"{arrival.request_id}-{p}" for p in range(len(prompts))]
        self._unfinished = set(self.engine_request_ids)
        self._queue: asyncio.Queue[tuple[int, RequestDelta | BaseException]] = asyncio.Queue()
        self._held: tuple[int, RequestDelta | BaseException] | None = None  # taken while merging, not merged
        self._pumps: list[asyncio.Task] = []
        self._last_token_s: float | None = None
        self._tallies: dict[str, _Tally] = {}
        self._backend_called_s: dict[str, float] = {}  # engine request -> when its pump called the backend
        self._closed = False

    @property
    def num_choices(self) -> int:
        return len(self._prompts) * self._sampling.n

    @property
    def num_choices_per_prompt(self) -> int:
        return self._sampling.n

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def start(self) -> None:
        for prompt in self._prompts:
            self._metrics.observe_params(self._sampling.n, self._sampling.max_tokens, len(prompt))
        for prompt_index, request_id in enumerate(self.engine_request_ids):
            self._pumps.append(asyncio.create_task(self._pump(prompt_index, request_id)))

    async def _pump(self, prompt_index: int, request_id: str) -> None:
        try:
            self._backend_called_s[request_id] = time.monotonic()
            stream = self._backend.generate(
                request_id, self._prompts[prompt_index], self._sampling, self._cache_salt, self._images
            )
            async for delta in stream:
                self._queue.put_nowait((prompt_index, delta))
                if delta.finished:
                    return
            raise BackendStreamEnded(f"the backend stream of {request_id} ended before it finished")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the consumer, which owns the answer
            self._queue.put_nowait((prompt_index, exc))

    async def next_delta(self) -> tuple[int, RequestDelta] | None:
        """(first choice index of the delta's prompt, delta), or None once every request finished.

        Raises what the backend raised (RequestFailed, or anything unexpected)."""
        if not self._unfinished:
            return None
        if self._held is not None:
            (prompt_index, item), self._held = self._held, None
        else:
            prompt_index, item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._observe(item)
        while not item.finished and not self._queue.empty():
            waiting_index, waiting = self._queue.get_nowait()
            if waiting_index != prompt_index or isinstance(waiting, BaseException):
                self._held = (waiting_index, waiting)
                break
            self._observe(waiting)
            item = merge_deltas(item, waiting)
        if item.finished:
            self._unfinished.discard(self.engine_request_ids[prompt_index])
            self._observe_request(item.request_id, len(self._prompts[prompt_index]))
        return prompt_index * self._sampling.n, item

    def _observe(self, delta: RequestDelta) -> None:
        num_tokens = sum(len(c.token_ids) for c in delta.completions)
        now = time.monotonic()
        if self._last_token_s is None:
            self._ticket.leave_queue()
            self._metrics.observe_first_token(now - self._arrival.arrival_s)
            self._metrics.count_prompt_tokens(sum(len(p) for p in self._prompts))
            self._last_token_s = now
        elif num_tokens:
            self._metrics.observe_inter_token(now - self._last_token_s)
            self._last_token_s = now
        self._metrics.count_generation_tokens(num_tokens)
        for completion in delta.completions:
            if completion.finish_reason is not None:
                self._metrics.count_success(completion.finish_reason)
        tally = self._tallies.get(delta.request_id)
        if tally is None:
            tally = self._tallies[delta.request_id] = _Tally(now, now, {})
            self._observe_ttft_parts(delta, now)
        if delta.kv_transfer_s is not None:
            logger.info(
                "request %s kv_transfer %.1f ms (after its first token: not part of the TTFT)",
                delta.request_id,
                delta.kv_transfer_s * 1e3,
            )
        if num_tokens:
            tally.last_token_s = now
        for completion in delta.completions:
            counts = tally.tokens_by_completion
            counts[completion.index] = counts.get(completion.index, 0) + len(completion.token_ids)

    def _observe_ttft_parts(self, first: RequestDelta, now: float) -> None:
        """An engine request's first delta: where its TTFT went (services.gateway.ttft), logged and observed."""
        arrival_s = self._arrival.arrival_s
        called_s = self._backend_called_s.get(first.request_id, arrival_s)
        parts = TTFTParts.compose(now - arrival_s, called_s - arrival_s, first.ttft)
        logger.info(parts.log_line(first.request_id))
        self._metrics.observe_ttft_parts(parts.seconds())

    def _observe_request(self, request_id: str, num_prompt_tokens: int) -> None:
        tally = self._tallies.pop(request_id, None)
        if tally is None:
            return
        longest = max(tally.tokens_by_completion.values(), default=0)
        tpot_s = (tally.last_token_s - tally.first_token_s) / (longest - 1) if longest > 1 else None
        self._metrics.observe_request(num_prompt_tokens, sum(tally.tokens_by_completion.values()), tpot_s)

    async def close(self) -> None:
        """Release everything this request holds. Idempotent; safe to call while being cancelled."""
        if self._closed:
            return
        self._closed = True
        self._ticket.release()
        for pump in self._pumps:
            pump.cancel()
        if not self._unfinished:
            self._metrics.observe_finished(time.monotonic() - self._arrival.arrival_s)
        if not self._pumps:
            return  # never started: nothing reached the backend
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._abort_timeout_s):
            for request_id in sorted(self._unfinished):
                await self._abort(request_id)
            await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _abort(self, request_id: str) -> None:
        try:
            await self._backend.abort(request_id)
        except Exception:
            logger.exception("abort of %s failed", request_id)


def merge_deltas(earlier: RequestDelta, later: RequestDelta) -> RequestDelta:
    """One delta of an engine request carrying what two consecutive ones did: each completion's tokens,
    text and logprobs concatenated in order, the later one's finish and cache counts, and the prompt
    logprobs whichever carried them (the first with tokens)."""
    merged = {c.index: c for c in earlier.completions}
    for c in later.completions:
        before = merged.get(c.index)
        if before is None:
            merged[c.index] = c
            continue
        logprobs = None
        if before.logprobs is not None or c.logprobs is not None:
            logprobs = (before.logprobs or []) + (c.logprobs or [])
        merged[c.index] = msgspec.structs.replace(
            before,
            token_ids=before.token_ids + c.token_ids,
            text=before.text + c.text,
            logprobs=logprobs,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
    return msgspec.structs.replace(
        later,
        completions=sorted(merged.values(), key=lambda c: c.index),
        num_prompt_tokens=earlier.num_prompt_tokens,
        ttft=earlier.ttft if earlier.ttft is not None else later.ttft,
        kv_transfer_s=earlier.kv_transfer_s if earlier.kv_transfer_s is not None else later.kv_transfer_s,
        prompt_logprobs=earlier.prompt_logprobs if earlier.prompt_logprobs is not None else later.prompt_logprobs,
    )
