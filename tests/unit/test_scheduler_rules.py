"""The scheduler's four stated rules (services/engine/scheduler.py), each on a real ten-block cache.

    (a) decodes are scheduled before unfinished prefills;
    (b) when KV runs out, the latest-arrived request not yet scheduled this step is preempted
        (and a request that would have to preempt itself waits instead);
    (c) a request preempted this step waits: it is not scheduled again in the same step, and it goes
        to the front of the waiting queue;
    (d) new (waiting) requests never preempt running ones.

Block size 4, ten blocks: block 0 is padding, so nine are usable and a fresh pool hands out 1, 2, 3, ...
in order; freed blocks join the back of the free queue, a request's tail first. Every request's prompt
tokens are its own (no prefix-cache hits between requests). `step` stands in for the model: it
advances each scheduled request and appends one output token where a chunk reached the end.
"""

from __future__ import annotations

from services.engine.kv_cache.manager import KVCacheManager
from services.engine.request import Request, RequestStatus
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import ScheduledBatch, Scheduler

BLOCK = 4
NUM_BLOCKS = 10
OUTPUT_TOKEN = 7


def make_scheduler(max_num_batched_tokens: int = 64, enable_prefix_caching: bool = True) -> Scheduler:
    kv = KVCacheManager(num_blocks=NUM_BLOCKS, block_size=BLOCK, enable_prefix_caching=enable_prefix_caching)
    return Scheduler(kv, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=8)


def make_request(request_id: str, num_prompt_tokens: int, arrival_time_s: float) -> Request:
    """Prompt tokens unique to the (one-letter) request id."""
    prompt = [ord(request_id) * 100 + i for i in range(num_prompt_tokens)]
    return Request(
        request_id,
        prompt,
        SamplingParams(max_tokens=16),
        eos_token_id=None,
        max_output_tokens=16,
        arrival_time_s=arrival_time_s,
    )


def import_decoding(scheduler: Scheduler, request: Request) -> None:
    """A request whose prompt KV and first token came from a prefill worker joins the running set
    directly, as Engine.add_imported + Engine.commit_import do."""
    assert scheduler.kv_cache.allocate_for_import(request, request.num_prompt_tokens) is not None
    request.output_token_ids.append(OUTPUT_TOKEN)
    request.num_computed_tokens = request.num_prompt_tokens
    scheduler.kv_cache.commit_imported(request, request.num_prompt_tokens)
    scheduler.add_running(request)


def step(batch: ScheduledBatch) -> None:
    for request, num_new in zip(batch.requests, batch.num_new_tokens):
        request.num_computed_tokens += num_new
        if request.num_computed_tokens == request.num_tokens:
            request.output_token_ids.append(OUTPUT_TOKEN)


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


# ----------------------------------------------------------------------------------------------
# (a) decodes before unfinished prefills


def test_decodes_are_scheduled_before_unfinished_prefills():
    sched = make_scheduler(max_num_batched_tokens=4)
    p = make_request("p", 12, arrival_time_s=1.0)
    sched.add(p)
    first = sched.schedule()
    assert (ids(first.requests), first.num_new_tokens) == (["p"], [4])  # the prompt's first chunk
    step(first)
    d = make_request("d", 4, arrival_time_s=2.0)
    import_decoding(sched, d)
    assert ids(sched.running) == ["p", "d"]  # running is in arrival order: the prefill first

    batch = sched.schedule()

    # the decode goes first and takes its token; the prefill's chunk gets what is left of the budget
    assert ids(batch.requests) == ["d", "p"]
    assert batch.num_new_tokens == [1, 3]
    assert batch.preempted == []
    assert sched.kv_cache.block_ids("d") == [2, 3]
    assert sched.kv_cache.block_ids("p") == [1, 4]


# ----------------------------------------------------------------------------------------------
# (b) KV exhausted: the latest-arrived request not yet scheduled this step is preempted


def test_out_of_kv_preempts_the_latest_arrived_request():
    sched = make_scheduler()
    a, b, c = (make_request(rid, 12, arrival_time_s=t) for rid, t in (("a", 1.0), ("b", 2.0), ("c", 3.0)))
    for request in (a, b, c):
        sched.add(request)
    first = sched.schedule()
    assert (ids(first.requests), first.num_new_tokens) == (["a", "b", "c"], [12, 12, 12])
    assert [sched.kv_cache.block_ids(r) for r in "abc"] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    step(first)  # each now has 13 tokens: its next decode needs a fourth block, and none is free

    batch = sched.schedule()

    assert ids(batch.requests) == ["a", "b"]
    assert batch.num_new_tokens == [1, 1]
    assert ids(batch.preempted) == ["c"]
    # c's blocks were freed tail first (9, 8, 7); a and b took the first two
    assert sched.kv_cache.block_ids("a") == [1, 2, 3, 9]
    assert sched.kv_cache.block_ids("b") == [4, 5, 6, 8]
    assert sched.kv_cache.block_ids("c") == []
    assert sched.kv_cache.num_free_blocks() == 1
    assert (c.status, c.num_computed_tokens, c.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert c.output_token_ids == [OUTPUT_TOKEN]  # kept: it recomputes prompt plus output later
    assert ids(sched.running) == ["a", "b"]
    assert ids(sched.waiting) == ["c"]
    assert sched.num_preemptions_total == 1


def test_the_victim_is_the_latest_arrival_among_requests_not_yet_scheduled_this_step():
    sched = make_scheduler()
    x = make_request("x", 3, arrival_time_s=4.0)  # the latest arrival; its next token fits its block
    y = make_request("y", 4, arrival_time_s=1.0)  # its next token needs a second block
    z = make_request("z", 12, arrival_time_s=3.0)
    v = make_request("v", 16, arrival_time_s=2.0)  # last in batch order, but arrived before z
    for request in (x, y, z, v):
        import_decoding(sched, request)
    assert [sched.kv_cache.block_ids(r) for r in "xyzv"] == [[1], [2], [3, 4, 5], [6, 7, 8, 9]]

    batch = sched.schedule()

    # x was scheduled before y ran out, so it is safe; of z and v, z arrived last
    assert ids(batch.requests) == ["x", "y", "v"]
    assert batch.num_new_tokens == [1, 1, 1]
    assert ids(batch.preempted) == ["z"]
    # z's blocks were freed tail first (5, 4, 3): y took 5, then v its fifth block, 4
    assert sched.kv_cache.block_ids("x") == [1]
    assert sched.kv_cache.block_ids("y") == [2, 5]
    assert sched.kv_cache.block_ids("v") == [6, 7, 8, 9, 4]
    assert sched.kv_cache.num_free_blocks() == 1


def test_a_request_that_would_have_to_preempt_itself_waits():
    sched = make_scheduler()
    x = make_request("x", 3, arrival_time_s=2.0)  # its next token fits its block
    y = make_request("y", 32, arrival_time_s=1.0)  # its next token needs a ninth block; none is free
    for request in (x, y):
        import_decoding(sched, request)

    batch = sched.schedule()

    # only y itself is left unscheduled, and x is already scheduled: y waits, nobody is preempted
    assert ids(batch.requests) == ["x"]
    assert batch.num_new_tokens == [1]
    assert batch.preempted == []
    assert (y.status, y.num_computed_tokens) == (RequestStatus.RUNNING, 32)
    assert sched.kv_cache.block_ids("y") == [2, 3, 4, 5, 6, 7, 8, 9]
    assert ids(sched.running) == ["x", "y"]
    assert sched.num_preemptions_total == 0


# ----------------------------------------------------------------------------------------------
# (c) a request preempted this step waits, at the front of the waiting queue


def test_a_request_preempted_this_step_is_not_readmitted_in_the_same_step():
    # No prefix caching: a readmitted request then needs blocks for exactly its chunk, so that after
    # the preemption it would fit (1 token of budget left -> 1 block, with 7 free), yet it waits.
    sched = make_scheduler(max_num_batched_tokens=2, enable_prefix_caching=False)
    a = make_request("a", 4, arrival_time_s=1.0)  # its next token needs a second block
    b = make_request("b", 32, arrival_time_s=2.0)  # holds the other eight blocks
    import_decoding(sched, a)
    import_decoding(sched, b)
    n = make_request("n", 4, arrival_time_s=3.0)
    sched.add(n)

    batch = sched.schedule()

    assert ids(batch.requests) == ["a"]
    assert batch.num_new_tokens == [1]
    assert ids(batch.preempted) == ["b"]
    assert sched.kv_cache.block_ids("a") == [1, 9]
    assert sched.kv_cache.num_free_blocks() == 7
    assert ids(sched.waiting) == ["b", "n"]  # ahead of n, which was already waiting; n waits behind it

    step(batch)
    batch = sched.schedule()

    assert ids(batch.requests) == ["a", "b"]  # the next step readmits b first, before n
    assert batch.num_new_tokens == [1, 1]
    assert sched.kv_cache.block_ids("b") == [8]
    assert (b.status, b.num_computed_tokens) == (RequestStatus.RUNNING, 0)
    assert ids(sched.waiting) == ["n"]


# ----------------------------------------------------------------------------------------------
# (d) new requests never preempt running ones


def test_a_waiting_request_never_preempts_a_running_one():
    sched = make_scheduler()
    r = make_request("r", 31, arrival_time_s=2.0)  # holds eight blocks; its next token fits them
    import_decoding(sched, r)
    w = make_request("w", 8, arrival_time_s=1.0)  # arrived earlier; needs two blocks, one is free
    sched.add(w)

    batch = sched.schedule()

    assert ids(batch.requests) == ["r"]
    assert batch.num_new_tokens == [1]
    assert batch.preempted == []
    assert sched.kv_cache.block_ids("r") == [1, 2, 3, 4, 5, 6, 7, 8]
    assert sched.kv_cache.num_free_blocks() == 1
    assert ids(sched.waiting) == ["w"]
    assert w.status is RequestStatus.WAITING
    assert sched.num_preemptions_total == 0

    step(batch)
    sched.finish(r, RequestStatus.FINISHED_STOPPED)  # frees 8, 7, ..., 1 behind the free block 9
    batch = sched.schedule()

    assert ids(batch.requests) == ["w"]
    assert batch.num_new_tokens == [8]
    assert sched.kv_cache.block_ids("w") == [9, 8]


# ----------------------------------------------------------------------------------------------
# (e) a step that decodes gives prefill chunks at most max_prefill_tokens_beside_decodes


def test_prefill_beside_decodes_is_capped_and_a_prefill_alone_takes_the_whole_budget():
    kv = KVCacheManager(num_blocks=NUM_BLOCKS, block_size=BLOCK, enable_prefix_caching=True)
    sched = Scheduler(kv, max_num_batched_tokens=12, max_num_seqs=8, max_prefill_tokens_beside_decodes=3)
    p = make_request("p", 16, arrival_time_s=1.0)
    sched.add(p)
    alone = sched.schedule()
    assert alone.num_new_tokens == [12]  # no decodes: the cap does not apply
    step(alone)
    d = make_request("d", 4, arrival_time_s=2.0)
    import_decoding(sched, d)
    w = make_request("w", 4, arrival_time_s=3.0)
    sched.add(w)
    mixed = sched.schedule()
    # the decode first; then the running prefill's chunk and the waiting one share the cap of 3
    assert (ids(mixed.requests), mixed.num_new_tokens) == (["d", "p"], [1, 3])
    step(mixed)
    last = sched.schedule()
    assert (ids(last.requests), last.num_new_tokens) == (["d", "p", "w"], [1, 1, 2])
