"""Preble's priority groups (services/engine/waiting_queue.py): the group index, each visit's quota,
every group visited in a round, the scheduler's preemption rules kept, and an engine's outputs the
same as under FCFS (only the order of admission differs).

The queue-level tests give the queue a table of cached-prefix tokens in place of the KV cache; the
others use a real ten-block cache (block size 4, block 0 is padding) or the tiny llama.
"""

from __future__ import annotations

import pytest

from services.engine import EngineConfig, LLMEngine, SamplingParams
from services.engine.kv_cache.manager import KVCacheManager
from services.engine.request import Request, RequestStatus
from services.engine.scheduler import ScheduledBatch, Scheduler
from services.engine.waiting_queue import PriorityGroupQueue, priority_group

BLOCK = 4
NUM_TOKENS = 20  # queue-level requests: a group g needs more than 2 g cached tokens of 20


def make_request(request_id: str, prompt: list[int], arrival_time_s: float = 0.0) -> Request:
    return Request(
        request_id, prompt, SamplingParams(max_tokens=16), None, max_output_tokens=16, arrival_time_s=arrival_time_s
    )


def queue_with(groups: list[int], k: int = 10, newcomer_group: int = 0) -> PriorityGroupQueue:
    """A queue of requests "0", "1", ... in arrival order, request i in group groups[i]; requests
    appended later by other names go in newcomer_group."""

    def num_cached_tokens(request: Request) -> int:  # (2g + 1) / 20 is in (g / 10, (g + 1) / 10]
        index = int(request.request_id) if request.request_id.isdigit() else None
        return 2 * (groups[index] if index is not None else newcomer_group) + 1

    queue = PriorityGroupQueue(num_cached_tokens, k=k)
    for i in range(len(groups)):
        queue.append(make_request(str(i), list(range(NUM_TOKENS))))
    assert [queue.group_of(r) for r in queue] == groups
    return queue


def pop_groups(queue: PriorityGroupQueue, n: int, groups: list[int]) -> list[int]:
    return [groups[int(queue.pop().request_id)] for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# the group index


GROUP_CASES = [(0, 100, 0), (1, 100, 0), (10, 100, 0), (11, 100, 1), (30, 100, 2), (31, 100, 3), (90, 100, 8)]
GROUP_CASES += [(91, 100, 9), (99, 100, 9), (8, 12, 6)]


@pytest.mark.parametrize("num_cached, num_tokens, group", GROUP_CASES)
def test_group_is_ceil_of_ten_times_the_hit_ratio_minus_one(num_cached, num_tokens, group):
    # exact at the edges: in floats ceil(10 * 0.3) - 1 would be 3
    assert priority_group(num_cached, num_tokens) == group


def test_the_hit_ratio_comes_from_the_cache_and_is_not_counted_as_a_prefix_cache_query():
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK)
    sched = Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=8, scheduling_policy="preble")
    a = make_request("a", list(range(100, 112)))
    sched.add(a)
    assert sched.schedule().requests == [a]  # its three full blocks are now cached
    queried = kv.prefix_cache_queried_tokens

    w = make_request("w", list(range(100, 108)) + [1, 2, 3, 4])  # shares a's first two blocks
    logprobs = Request("p", list(w.prompt_token_ids), SamplingParams(prompt_logprobs=1), None, 16)
    sched.add(w)
    sched.add(logprobs)

    assert isinstance(sched.waiting, PriorityGroupQueue)
    assert sched.waiting.group_of(w) == 6  # 8 of 12 tokens cached
    assert sched.waiting.group_of(logprobs) == 0  # cached blocks have no logits: it adopts none
    assert kv.prefix_cache_queried_tokens == queried


# ----------------------------------------------------------------------------------------------
# a round: groups from the highest, up to (g + 1) * k from group g, oldest first


def test_each_visit_admits_up_to_g_plus_one_times_k_requests_oldest_first():
    groups = [9, 2, 0] * 5 + [9] * 115 + [2] * 30  # 120 in group 9, 35 in group 2, 5 in group 0
    queue = queue_with(groups)

    first_round = [queue.pop() for _ in range(100 + 30 + 5)]
    second_round = [queue.pop() for _ in range(20 + 5)]

    def visits(requests):
        runs: list[list[int]] = []
        for request in requests:
            group = groups[int(request.request_id)]
            if runs and runs[-1][0] == group:
                runs[-1][1] += 1
            else:
                runs.append([group, 1])
        return runs

    assert visits(first_round) == [[9, 100], [2, 30], [0, 5]]
    assert visits(second_round) == [[9, 20], [2, 5]]
    for requests in (first_round, second_round):  # arrival order within a visit
        ranks = [int(r.request_id) for r in requests]
        assert all(ranks[i] < ranks[i + 1] for i in range(len(ranks) - 1) if groups[ranks[i]] == groups[ranks[i + 1]])
    assert len(queue) == 0


def test_the_cursor_outlives_the_step_and_an_empty_queue_restarts_at_the_highest_group():
    groups = [9] * 3 + [5] * 3 + [0] * 3
    queue = queue_with(groups, k=1)  # quotas: group g admits g + 1 a visit

    assert pop_groups(queue, 2, groups) == [9, 9]  # a step that admits two
    queue.refresh()
    assert pop_groups(queue, 4, groups) == [9, 5, 5, 5]  # the next resumes group 9's visit
    queue.refresh()
    assert pop_groups(queue, 2, groups) == [0, 0]  # a visit to group 0 admits one: a round each
    assert queue.group == 0
    assert pop_groups(queue, 1, groups) == [0]
    assert queue.group == 9


def test_every_group_is_visited_in_each_round_while_the_highest_never_empties():
    # one request in each of groups 0..8, and group 9 refilled after every admission
    groups = list(range(9)) + [9] * 10
    queue = queue_with(groups, k=1, newcomer_group=9)

    admitted = []
    for step in range(55):  # a round admits at most 1 + 2 + ... + 10 = 55 with k = 1
        queue.refresh()
        admitted.append(queue.pop().request_id)
        queue.append(make_request(f"new{step}", list(range(NUM_TOKENS))))
        assert any(queue.group_of(r) == 9 for r in queue)

    assert {str(i) for i in range(9)} <= set(admitted)
    # the first round: 10 of group 9, then one of each lower group, highest first
    assert [groups[int(rid)] for rid in admitted[10:19]] == list(range(8, -1, -1))


def test_a_request_whose_hit_changes_moves_to_its_new_group_on_a_refresh():
    cached = {"0": 1, "1": 1, "2": 19}
    queue = PriorityGroupQueue(lambda r: cached[r.request_id], k=1, max_probes_per_step=1)
    for rid in "012":
        queue.append(make_request(rid, list(range(NUM_TOKENS))))
    cached["1"] = 19  # its prefix got cached
    queue.refresh()  # one probe a step: the longest unprobed, "0", which has not changed
    assert [queue.group_of(r) for r in queue] == [0, 0, 9]
    queue.refresh()  # then "1"
    assert [queue.group_of(r) for r in queue] == [0, 9, 9]
    assert [queue.pop().request_id for _ in range(3)] == ["1", "2", "0"]  # group 9 in arrival order


# ----------------------------------------------------------------------------------------------
# the scheduler's rules under preble


def step(batch: ScheduledBatch) -> None:
    for request, num_new in zip(batch.requests, batch.num_new_tokens):
        request.num_computed_tokens += num_new
        if request.num_computed_tokens == request.num_tokens:
            request.output_token_ids.append(7)


def test_preemption_still_recomputes_the_latest_arrival_which_then_goes_before_higher_groups():
    kv = KVCacheManager(num_blocks=10, block_size=BLOCK)
    sched = Scheduler(kv, max_num_batched_tokens=64, max_num_seqs=8, scheduling_policy="preble")
    a, b, c = (make_request(rid, [ord(rid) * 100 + i for i in range(12)], t) for rid, t in zip("abc", (1, 2, 3)))
    for request in (a, b, c):
        sched.add(request)
    first = sched.schedule()
    assert [r.request_id for r in first.requests] == ["a", "b", "c"]
    step(first)  # 13 tokens each: the next decodes need a fourth block each, and none is free
    w = make_request("w", a.prompt_token_ids[:8] + [1, 2, 3, 4], 4.0)  # a's first two blocks: group 6
    sched.add(w)

    batch = sched.schedule()

    assert [r.request_id for r in batch.requests] == ["a", "b"]
    assert [r.request_id for r in batch.preempted] == ["c"]
    assert (c.status, c.num_computed_tokens, c.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert [r.request_id for r in sched.waiting] == ["c", "w"]  # w waits behind c: not admitted

    step(batch)
    sched.finish(a, RequestStatus.FINISHED_STOPPED)
    sched.finish(b, RequestStatus.FINISHED_STOPPED)
    batch = sched.schedule()

    assert [r.request_id for r in batch.requests] == ["c", "w"]  # the preempted one first


# ----------------------------------------------------------------------------------------------
# an engine: the same greedy outputs as FCFS, admitted in another order

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def run_engine(llama_dir: str, policy: str) -> tuple[list[str], dict[str, list[int]]]:
    engine = LLMEngine(
        model=llama_dir,
        block_size=8,
        num_kv_blocks=64,
        max_num_batched_tokens=32,
        max_num_seqs=2,
        scheduling_policy=policy,
    )
    shared = [11 + i for i in range(40)]
    engine.add_request("warm", shared + [5], GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    for i in range(3):  # no hit: group 0
        engine.add_request(f"u{i}", [300 + 7 * i + j for j in range(12)], GREEDY)
    for i in range(3):  # 40 of 48 tokens cached: group 8
        engine.add_request(f"s{i}", shared + [500 + 9 * i + j for j in range(8)], GREEDY)
    first_seen: list[str] = []
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id not in first_seen:
                first_seen.append(out.request_id)
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
    return first_seen, tokens


def test_an_engine_gives_fcfs_outputs_in_the_priority_order(llama_dir):
    fcfs_order, fcfs_tokens = run_engine(llama_dir, "fcfs")
    preble_order, preble_tokens = run_engine(llama_dir, "preble")

    assert fcfs_order == ["u0", "u1", "u2", "s0", "s1", "s2"]
    assert preble_order == ["s0", "s1", "s2", "u0", "u1", "u2"]
    assert preble_tokens == fcfs_tokens
    assert all(len(t) == 6 for t in fcfs_tokens.values())


# ----------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_the_policy_is_a_flag_of_serve_and_generate_and_fcfs_by_default(command):
    from services.cli import build_parser, engine_config_from_args

    parser = build_parser()
    assert engine_config_from_args(parser.parse_args([command])).scheduling_policy == "fcfs"
    args = parser.parse_args([command, "--scheduling-policy", "preble"])
    assert engine_config_from_args(args).scheduling_policy == "preble"


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig(device="cpu", scheduling_policy="lifo").resolved()
