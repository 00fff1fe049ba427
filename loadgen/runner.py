"""The run loop: send each request at its arrival offset, collect results, stop at the limits.

    for each request, in order:   sleep until its offset  ->  start a task
    each task:                    wait for its conversation's previous turn (multi-turn only)
                                  -> take a concurrency slot (if capped) -> send -> record

A run is bounded twice: by its list of requests and by `time_limit_s`. When the time limit passes,
requests not yet sent are dropped (counted as not sent) and those in flight are cancelled and
recorded with error type "cancelled". The duration the throughputs divide by runs from the start
to the last result (or to the time limit).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from loadgen import records
from loadgen.client import StreamingClient, Turn
from loadgen.records import RequestResult, RequestSpec


@dataclass(frozen=True)
class RunOutcome:
    results: list[RequestResult]  # sorted by request index
    duration_s: float
    num_not_sent: int
    hit_time_limit: bool


class _Conversations:
    """Multi-turn history: each turn's (user message, reply), and who waits for which turn."""

    def __init__(self) -> None:
        self._turns: dict[int, list[Turn]] = {}
        self._done: dict[tuple[int, int], asyncio.Event] = {}

    def _event(self, conversation: int, turn: int) -> asyncio.Event:
        return self._done.setdefault((conversation, turn), asyncio.Event())

    async def history_before(self, spec: RequestSpec) -> list[Turn]:
        if spec.conversation is None:
            return []
        if spec.turn > 0:
            await self._event(spec.conversation, spec.turn - 1).wait()
        return list(self._turns.get(spec.conversation, []))

    def record(self, spec: RequestSpec, reply: str) -> None:
        if spec.conversation is not None:
            self._turns.setdefault(spec.conversation, []).append((spec.prompt.text, reply))
            self._event(spec.conversation, spec.turn).set()


class _Run:
    def __init__(
        self, client: StreamingClient, max_concurrency: int | None, on_result: Callable[[RequestResult], None]
    ) -> None:
        self._client = client
        self._slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._on_result = on_result
        self._conversations = _Conversations()
        self.start = time.perf_counter()
        self.results: dict[int, RequestResult] = {}
        self.in_flight: dict[int, tuple[RequestSpec, float]] = {}  # index -> (spec, sent at)
        self.last_result_at = self.start
        self.tasks: list[asyncio.Task[None]] = []

    async def dispatch(self, specs: list[RequestSpec], offsets_s: list[float]) -> None:
        for spec, offset_s in zip(specs, offsets_s, strict=True):
            delay_s = self.start + offset_s - time.perf_counter()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            self.tasks.append(asyncio.create_task(self._one(spec)))

    async def _one(self, spec: RequestSpec) -> None:
        history = await self._conversations.history_before(spec)
        if self._slots:
            async with self._slots:
                result = await self._send(spec, history)
        else:
            result = await self._send(spec, history)
        self._conversations.record(spec, result.output_text)
        self._finish(result)

    async def _send(self, spec: RequestSpec, history: list[Turn]) -> RequestResult:
        self.in_flight[spec.index] = (spec, time.perf_counter())
        result = await self._client.send(spec, history, self.start)
        del self.in_flight[spec.index]
        return result

    def _finish(self, result: RequestResult) -> None:
        self.results[result.index] = result
        self.last_result_at = time.perf_counter()
        self._on_result(result)

    def cancel_in_flight(self) -> None:
        for spec, sent_at in self.in_flight.values():
            self._finish(
                RequestResult(
                    index=spec.index,
                    start_s=sent_at - self.start,
                    ttft_s=None,
                    itl_s=[],
                    e2e_s=None,
                    num_input_tokens=spec.prompt.num_tokens,
                    num_output_tokens=0,
                    num_content_chunks=0,
                    expected_output_tokens=spec.num_output_tokens,
                    usage_reported=False,
                    usage_mismatch=False,
                    error_type=records.CANCELLED,
                    error="in flight at the time limit",
                    tag=spec.tag,
                    conversation=spec.conversation,
                    turn=spec.turn,
                    prefix_group=spec.prefix_group,
                )
            )
        self.in_flight.clear()


async def run_requests(
    client: StreamingClient,
    specs: list[RequestSpec],
    offsets_s: list[float],
    max_concurrency: int | None,
    time_limit_s: float,
    on_result: Callable[[RequestResult], None] = lambda result: None,
) -> RunOutcome:
    """Send `specs` at `offsets_s` (seconds after the start) until done or `time_limit_s` passes."""
    run = _Run(client, max_concurrency, on_result)

    async def dispatch_and_wait() -> None:
        await run.dispatch(specs, offsets_s)
        await asyncio.gather(*run.tasks)

    hit_time_limit = False
    try:
        await asyncio.wait_for(dispatch_and_wait(), timeout=time_limit_s)
    except asyncio.TimeoutError:
        hit_time_limit = True
        for task in run.tasks:
            task.cancel()
        await asyncio.gather(*run.tasks, return_exceptions=True)
        run.cancel_in_flight()
    end = time.perf_counter() if hit_time_limit else run.last_result_at
    results = [run.results[i] for i in sorted(run.results)]
    return RunOutcome(
        results,
        duration_s=max(end - run.start, 1e-9),
        num_not_sent=len(specs) - len(results),
        hit_time_limit=hit_time_limit,
    )
