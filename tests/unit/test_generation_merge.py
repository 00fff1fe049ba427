"""A stream that fell behind: the deltas already waiting for one engine request leave as one."""

from __future__ import annotations

import asyncio

from services.common.messages import CompletionDelta, PositionLogprobs, RequestDelta, SamplingSpec, TokenLogprob
from services.gateway.admission import AdmissionController
from services.gateway.generation import Arrival, Generation, merge_deltas
from services.gateway.metrics import GatewayMetrics


def delta(request_id, tokens, *, index=0, start=0, finish=None, logprobs=False) -> RequestDelta:
    lps = [PositionLogprobs(TokenLogprob(t, f"<{t}>", -0.5), []) for t in tokens] if logprobs else None
    completion = CompletionDelta(
        index=index,
        token_ids=list(tokens),
        text="".join(f"<{t}>" for t in tokens),
        start_index=start,
        logprobs=lps,
        finish_reason=finish,
    )
    return RequestDelta(
        request_id=request_id, completions=[completion], finished=finish is not None, num_prompt_tokens=3
    )


def test_merge_concatenates_in_order_and_keeps_the_later_finish():
    merged = merge_deltas(delta("r", [1, 2], logprobs=True), delta("r", [3], start=2, finish="length", logprobs=True))
    (c,) = merged.completions
    assert c.token_ids == [1, 2, 3] and c.text == "<1><2><3>" and c.start_index == 0
    assert [p.sampled.token_id for p in c.logprobs] == [1, 2, 3]
    assert c.finish_reason == "length" and merged.finished


def test_merge_keeps_each_of_n_completions_apart():
    earlier = delta("r", [1], index=0)
    later = RequestDelta(
        request_id="r",
        completions=[delta("r", [7], index=1).completions[0], delta("r", [2], index=0, start=1).completions[0]],
        finished=False,
        num_prompt_tokens=3,
    )
    merged = merge_deltas(earlier, later)
    assert [(c.index, c.token_ids) for c in merged.completions] == [(0, [1, 2]), (1, [7])]


class QueuedBackend:
    """Yields every delta of a request at once, so they wait in the generation's queue together."""

    def __init__(self, deltas: dict[str, list[RequestDelta]]) -> None:
        self.deltas = deltas

    def is_ready(self) -> bool:
        return True

    async def generate(self, request_id, *args, **kwargs):
        for d in self.deltas[request_id]:
            yield d

    async def abort(self, request_id: str) -> None:
        pass


def generation(backend, prompts) -> Generation:
    admission = AdmissionController(8, 1000, 8, 1000)
    return Generation(
        backend,
        Arrival("r", 0.0),
        prompts,
        SamplingSpec(max_tokens=4),
        None,
        admission.admit(len(prompts)),
        GatewayMetrics("m", admission, max_model_len=256),
        abort_timeout_s=1.0,
    )


def test_waiting_deltas_of_one_request_leave_as_one_and_prompts_stay_apart():
    backend = QueuedBackend(
        {
            "r-0": [delta("r-0", [1]), delta("r-0", [2], start=1), delta("r-0", [3], start=2, finish="stop")],
            "r-1": [delta("r-1", [9]), delta("r-1", [8], start=1, finish="length")],
        }
    )

    async def run() -> list:
        gen = generation(backend, [[5, 6, 7], [5, 6, 7]])
        gen.start()
        await asyncio.sleep(0.01)  # both pumps have queued everything
        out = []
        while (item := await gen.next_delta()) is not None:
            out.append((item[0], [c.token_ids for c in item[1].completions], item[1].finished))
        await gen.close()
        return out

    assert asyncio.run(run()) == [(0, [[1, 2, 3]], True), (1, [[9, 8]], True)]
