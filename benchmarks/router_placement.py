"""Router placement latency: one `place()` against a full prefix index, for every policy.

Setup (the same for every policy, from one seed):
  index     --blocks (worker, block) entries over --prefill prefill workers, from BlockStored events
            of requests that share prefixes: --families shared prefixes of 512..4096 tokens, each
            request one family's prefix plus its own suffix, 1k..8k tokens in all; a family lives
            mostly on one worker, sometimes on a second
  load      fresh snapshots of every worker (random queues) every 8 placements; each placement
            is acknowledged right away, so in-flight estimates stay realistic
  requests  --requests timed placements of new requests drawn the same way (block hashes given,
            as the gateway sends them); the time to hash token ids is reported on its own line
  events    untimed, as the workers would send them: --confirm-lag placements after each
            placement, a BlockStored of its blocks on its prefill worker, and a BlockRemoved of
            that worker's least recently stored blocks, so each worker keeps the number of
            blocks it had and the index stays at --blocks entries (a full cache evicting)
  pending   each placement claims its blocks on its prefill worker at once, until that
            BlockStored settles them (RouterConfig's pending_block_ttl_s, --pending-block-ttl-s;
            0 turns claims off: the router before them, on the same events). --confirm-lag -1
            sends no events, as this benchmark did before claims existed: the index never
            changes but by the claims, which pile up for the whole run (shorter than the TTL),
            the most place() can meet

Only `place()` is timed (time.perf_counter_ns around the call). Target: p99 <= 1 ms.

--preble-scale: the router-scale case for the preble policy (target: 50,000 queued requests placed
at >= 5,000 req/s on a 2-core machine with 100k blocks indexed, place() p99 <= 1 ms). The same
index and workload (block hashes drawn directly, no token ids: hashing is the gateway's), the
--scale-requests requests placed back to back, each confirmed by its worker's events --confirm-lag
placements later (then released, as a finished request is); every 8 placements every worker sends a
snapshot carrying KV capacity and timings, as engines do: the finished requests' TTFT, TPOT and
output length, and every 32 placements a new step timing from each prefill worker, of a known cost
model (the fitted coefficients are printed against it). (8 engines sustaining 5,000 prompts of
1k-8k tokens a second would take several requests a step: ~0.3 steps a placement, here 0.25.)
Reported: place() latency and req/s over the summed place() time (and over the thread's CPU time in
place(), which other processes on the machine do not inflate), the whole router loop (place,
index events, snapshots) req/s, and the garbage collector's pauses during the loop (what existed
before it, the harness's data included, is frozen out of the collector's way, as a server does
after start-up with gc.freeze()).

    python benchmarks/router_placement.py
    python benchmarks/router_placement.py --preble-scale
    python benchmarks/router_placement.py --pending-block-ttl-s 0     # no claims: the router before them
    python benchmarks/router_placement.py --confirm-lag -1            # no events: claims pile up
    python benchmarks/router_placement.py --requests 5000 --json results/router_placement.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import random
import statistics
import sys
import time
from array import array
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.block_hash import hash_request_blocks
from services.common.control import FinishedRequestTiming, StepTiming
from services.common.kv_events import BlockRemoved, BlockStored, KVEvent
from services.router import POLICIES, Router, RouterConfig, RouteRequest, WorkerLoad
from services.router.policies import Preble

VOCAB_SIZE = 32000


@dataclass
class Prompt:
    token_ids: list[int]
    block_hashes: list[int]
    family: int


class Workload:
    """Prompts of 1k..8k tokens, each a family's shared prefix plus a suffix of its own."""

    def __init__(self, rng: random.Random, num_families: int, block_size: int) -> None:
        self.rng = rng
        self.block_size = block_size
        self.prefixes: list[tuple[list[int], list[int]]] = []
        for _ in range(num_families):
            num_tokens = rng.randint(512 // block_size, 4096 // block_size) * block_size
            prefix = [rng.randrange(VOCAB_SIZE) for _ in range(num_tokens)]
            self.prefixes.append((prefix, hash_request_blocks(prefix, block_size)))

    def prompt(self) -> Prompt:
        family = self.rng.randrange(len(self.prefixes))
        prefix, prefix_hashes = self.prefixes[family]
        num_tokens = self.rng.randint(max(1024, len(prefix) + self.block_size), 8192)
        token_ids = prefix + [self.rng.randrange(VOCAB_SIZE) for _ in range(num_tokens - len(prefix))]
        return Prompt(token_ids, hash_request_blocks(token_ids, self.block_size, known_hashes=prefix_hashes), family)

    def block_hashes(self) -> tuple[list[int], int]:
        """A prompt drawn as prompt() draws it, as (block hashes, prompt tokens): its own blocks' hashes are
        random 64-bit integers (what the router sees of a prompt; hashing is the gateway's cost)."""
        prefix, prefix_hashes = self.prefixes[self.rng.randrange(len(self.prefixes))]
        num_tokens = self.rng.randint(max(1024, len(prefix) + self.block_size), 8192)
        num_own_blocks = num_tokens // self.block_size - len(prefix_hashes)
        own = array("Q", self.rng.randbytes(8 * num_own_blocks)).tolist()
        return prefix_hashes + own, num_tokens


def fill_events(
    workload: Workload, rng: random.Random, workers: list[str], num_blocks: int
) -> list[tuple[str, list[BlockStored]]]:
    """(worker, batch) pairs that leave num_blocks (worker, block) entries in the index."""
    held: dict[str, set[int]] = {w: set() for w in workers}
    batches: list[tuple[str, list[BlockStored]]] = []
    total = 0
    while total < num_blocks:
        prompt = workload.prompt()
        home = workers[prompt.family % len(workers)]
        worker = home if rng.random() < 0.8 else rng.choice(workers)
        new = [h for h in prompt.block_hashes if h not in held[worker]]
        held[worker].update(new)
        total += len(new)
        full_block_tokens = prompt.token_ids[: len(prompt.block_hashes) * workload.block_size]
        batches.append((worker, [BlockStored(prompt.block_hashes, None, full_block_tokens, workload.block_size)]))
    return batches


class WorkerCaches:
    """Each worker's prefix cache as a fixed number of blocks, least recently stored evicted first."""

    def __init__(self, batches: list[tuple[str, list[BlockStored]]], num_blocks: dict[str, int]) -> None:
        self.num_blocks = num_blocks
        self.blocks: dict[str, OrderedDict[int, None]] = {w: OrderedDict() for w in num_blocks}
        for worker, events in batches:
            for event in events:
                self.blocks[worker].update(dict.fromkeys(event.block_hashes))

    def store(self, worker: str, block_hashes: list[int], block_size: int) -> list[KVEvent]:
        """The events of storing these blocks: BlockStored, then BlockRemoved of what they evict."""
        cache = self.blocks[worker]
        for block_hash in block_hashes:
            cache[block_hash] = None
            cache.move_to_end(block_hash)
        evicted = [cache.popitem(last=False)[0] for _ in range(len(cache) - self.num_blocks[worker])]
        stored = BlockStored(block_hashes, None, [0] * (len(block_hashes) * block_size), block_size)
        return [stored, BlockRemoved(evicted)] if evicted else [stored]


def refresh_loads(router: Router, rng: random.Random, prefill: list[str], decode: list[str]) -> None:
    for w in prefill:
        router.load.update(
            WorkerLoad(
                w, "prefill", rng.randint(0, 8), rng.randint(0, 16), rng.random(), 10_000, rng.randint(0, 40_000), 0
            )
        )
    for w in decode:
        router.load.update(
            WorkerLoad(w, "decode", rng.randint(0, 128), 0, rng.random() * 0.8, 50_000, 0, rng.randint(0, 128))
        )


def run_policy(
    policy: str,
    args: argparse.Namespace,
    batches: list[tuple[str, list[BlockStored]]],
    prompts: list[Prompt],
    prefill: list[str],
    decode: list[str],
) -> dict[str, object]:
    config = RouterConfig(pending_block_ttl_s=args.pending_block_ttl_s)
    router = Router(prefill, decode, policy, args.block_size, config)
    seq: Counter[str] = Counter()
    for worker, events in batches:
        assert router.index.apply(worker, seq[worker], events)
        seq[worker] += 1
    indexed_entries, distinct_blocks = sum(router.index.num_keys(w) for w in prefill), len(router.index)
    caches = WorkerCaches(batches, {w: router.index.num_keys(w) for w in prefill})
    rng = random.Random(args.seed + 1)
    requests = [
        RouteRequest(
            f"r{i}", block_hashes=p.block_hashes, num_prompt_tokens=len(p.token_ids), max_tokens=rng.randint(64, 512)
        )
        for i, p in enumerate(prompts)
    ]
    refresh_loads(router, rng, prefill, decode)
    gc.collect()
    latencies_us: list[float] = []
    hit_tokens = 0
    unconfirmed: deque[tuple[str, RouteRequest]] = deque()  # (prefill worker, request), oldest first
    for i, request in enumerate(requests):
        start = time.perf_counter_ns()
        placement = router.place(request)
        latencies_us.append((time.perf_counter_ns() - start) / 1000)
        hit_tokens += placement.predicted_hit_tokens
        router.acknowledge(request.request_id)
        if args.confirm_lag >= 0:
            unconfirmed.append((placement.prefill_worker, request))
            while len(unconfirmed) > args.confirm_lag:
                worker, done = unconfirmed.popleft()
                assert router.index.apply(
                    worker, seq[worker], caches.store(worker, list(done.block_hashes or ()), args.block_size)
                )
                seq[worker] += 1
        if i % 8 == 7:
            refresh_loads(router, rng, prefill, decode)
    latencies_us.sort()
    stats = router.stats()
    return {
        "policy": policy,
        "p50_us": percentile(latencies_us, 50),
        "p99_us": percentile(latencies_us, 99),
        "max_us": latencies_us[-1],
        "mean_us": statistics.fmean(latencies_us),
        "hit_rate": hit_tokens / stats.num_prompt_tokens,
        "reasons": {reason: n for (_, reason), n in sorted(stats.decisions.items())},
        "indexed_entries": indexed_entries,
        "distinct_blocks": distinct_blocks,
        "pending_placements_at_end": router.index.num_pending_placements(),
    }


# ---------------------------------------------------------------------------------------------- --preble-scale

# The engines' step cost in the scale run: t = a + b * tokens + c * tokens x context (what the fit should find)
STEP_COST = (0.004, 6e-5, 2e-10)


class ScaleReports:
    """What the workers' snapshots carry in the scale run: step timings and finished requests, as rings."""

    def __init__(self, rng: random.Random, prefill: list[str], decode: list[str]) -> None:
        self.rng = rng
        self.steps: dict[str, deque[StepTiming]] = {w: deque(maxlen=32) for w in prefill + decode}
        self.finished: dict[str, deque[FinishedRequestTiming]] = {w: deque(maxlen=32) for w in prefill + decode}
        self.seq = itertools.count()
        self.num_refreshes = 0

    def step(self, worker: str) -> None:
        tokens = self.rng.randint(256, 8192)
        pairs = tokens * self.rng.randint(tokens, 16_384)
        a, b, c = STEP_COST
        duration = (a + b * tokens + c * pairs) * self.rng.uniform(0.95, 1.05)
        self.steps[worker].append(StepTiming(next(self.seq), 1, tokens, pairs, duration))

    def finish(self, request_id: str, prefill_worker: str, decode_worker: str) -> None:
        ttft = self.rng.uniform(0.2, 0.6)
        self.finished[prefill_worker].append(FinishedRequestTiming(next(self.seq), request_id, 1, ttft, 0.0))
        output = self.rng.randint(64, 512)
        tpot = self.rng.uniform(0.015, 0.03)
        self.finished[decode_worker].append(FinishedRequestTiming(next(self.seq), request_id, output, ttft, tpot))

    def refresh(self, router: Router, held_blocks: dict[str, int], prefill: list[str], decode: list[str]) -> None:
        rng = self.rng
        self.num_refreshes += 1
        for w in prefill:
            if self.num_refreshes % 4 == 0:  # a timing per worker every 32 placements: see the module doc
                self.step(w)
            load = WorkerLoad(w, "prefill", rng.randint(0, 8), rng.randint(0, 16), rng.random(), 0, 0, 0)
            router.load.update(
                dataclasses.replace(
                    load,
                    num_free_blocks=rng.randint(0, 1024),
                    queued_prefill_tokens=rng.randint(0, 40_000),
                    num_total_blocks=held_blocks[w] + 512,  # a full cache: new blocks evict
                    recent_steps=tuple(self.steps[w]),
                    recent_finished=tuple(self.finished[w]),
                )
            )
        for w in decode:
            load = WorkerLoad(w, "decode", rng.randint(0, 128), 0, rng.random() * 0.8, 50_000, 0, rng.randint(0, 128))
            router.load.update(
                dataclasses.replace(load, num_total_blocks=100_000, recent_finished=tuple(self.finished[w]))
            )


def run_scale(args: argparse.Namespace, workload: Workload, batches: list[tuple[str, list[BlockStored]]]) -> None:
    prefill = [f"prefill-{i}" for i in range(args.prefill)]
    decode = [f"decode-{i}" for i in range(args.decode)]
    config = RouterConfig(pending_block_ttl_s=args.pending_block_ttl_s)
    router = Router(prefill, decode, args.scale_policy, args.block_size, config)
    seq: Counter[str] = Counter()
    for worker, events in batches:
        assert router.index.apply(worker, seq[worker], events)
        seq[worker] += 1
    indexed_entries = sum(router.index.num_keys(w) for w in prefill)
    caches = WorkerCaches(batches, {w: router.index.num_keys(w) for w in prefill})
    rng = random.Random(args.seed + 2)
    reports = ScaleReports(rng, prefill, decode)
    requests = []
    for i in range(args.scale_requests):  # queued: all drawn before the first placement
        block_hashes, num_tokens = workload.block_hashes()
        requests.append(RouteRequest(f"s{i}", block_hashes=block_hashes, num_prompt_tokens=num_tokens, max_tokens=256))
    reports.refresh(router, caches.num_blocks, prefill, decode)
    gc.collect()
    gc.freeze()  # the harness's own data (events with token ids, the queued requests) out of the collector's way
    gc_pauses_ns: list[int] = []
    gc_started = [0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter_ns()
        else:
            gc_pauses_ns.append(time.perf_counter_ns() - gc_started[0])

    gc.callbacks.append(on_gc)
    latencies_ns: list[int] = []
    event_ns = snapshot_ns = 0
    unconfirmed: deque[tuple[str, str, RouteRequest]] = deque()
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    place_cpu_ns = 0
    loop_start = clock()
    for i, request in enumerate(requests):
        cpu_start = cpu_clock()
        start = clock()
        placement = router.place(request)
        latencies_ns.append(clock() - start)
        place_cpu_ns += cpu_clock() - cpu_start
        router.acknowledge(request.request_id)
        unconfirmed.append((placement.prefill_worker, placement.decode_worker, request))
        start = clock()
        while len(unconfirmed) > args.confirm_lag:
            worker, decode_worker, done = unconfirmed.popleft()
            events = caches.store(worker, list(done.block_hashes or ()), args.block_size)
            assert router.index.apply(worker, seq[worker], events)
            seq[worker] += 1
            router.index.release_pending(done.request_id)  # it finished: its claims are settled or moot
            reports.finish(done.request_id, worker, decode_worker)
        event_ns += clock() - start
        if i % 8 == 7:
            start = clock()
            reports.refresh(router, caches.num_blocks, prefill, decode)
            snapshot_ns += clock() - start
        requests[i] = None  # type: ignore[call-overload]  # placed: the router keeps what it needs
    loop_ns = clock() - loop_start
    gc.callbacks.remove(on_gc)
    gc.unfreeze()
    latencies_ns.sort()
    place_s = sum(latencies_ns) / 1e9
    n = len(latencies_ns)
    policy = router.policy
    stats = router.stats()
    print(
        f"preble-scale ({args.scale_policy}): {n} queued requests placed back to back; "
        f"index {indexed_entries} (worker, block) entries, "
        f"{args.prefill} prefill + {args.decode} decode workers, block_size {args.block_size}, 1k-8k-token prompts, "
        f"confirm lag {args.confirm_lag}"
    )
    p50_us, p99_us = percentile(latencies_ns, 50) / 1000, percentile(latencies_ns, 99) / 1000
    print(
        f"place():     p50 {p50_us:.0f} us, p99 {p99_us:.0f} us, max {latencies_ns[-1] / 1000:.0f} us, "
        f"mean {place_s / n * 1e6:.0f} us; {n / place_s:,.0f} req/s (on CPU time: {place_cpu_ns / n / 1000:.0f} us, "
        f"{n / (place_cpu_ns / 1e9):,.0f} req/s)"
    )
    router_s = place_s + (event_ns + snapshot_ns) / 1e9
    print(
        f"router loop: place + index events + snapshots {router_s:.2f} s: {n / router_s:,.0f} req/s "
        f"(the harness included: {n / (loop_ns / 1e9):,.0f} req/s)"
    )
    reasons = ", ".join(f"{reason} {count}" for (_, reason), count in sorted(stats.decisions.items()) if _ != "encode")
    print(f"decisions: {reasons}; hit rate {stats.predicted_hit_tokens / stats.num_prompt_tokens:.3f}")
    longest_gc_ms = max(gc_pauses_ns, default=0) / 1e6
    print(
        f"garbage collections during the loop: {len(gc_pauses_ns)}, {sum(gc_pauses_ns) / 1e9:.2f} s in all, "
        f"the longest {longest_gc_ms:.1f} ms"
    )
    if isinstance(policy, Preble):
        a, b, c = policy.fit.coefficients
        print(
            f"preble: nodes moved by rebalancing {policy.num_moves}; tree {len(policy.tree)} nodes, "
            f"{policy.tree.num_blocks} blocks; prefill-time fit a {a:.4g} s, b {b:.4g} s/token, c {c:.4g} s/pair "
            f"(the engines' {STEP_COST})"
        )


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q / 100))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, default=8, help="prefill workers")
    parser.add_argument("--decode", type=int, default=4, help="decode workers")
    parser.add_argument("--blocks", type=int, default=100_000, help="(worker, block) entries to index")
    parser.add_argument("--families", type=int, default=64, help="shared prefixes")
    parser.add_argument("--requests", type=int, default=2000, help="timed placements per policy")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pending-block-ttl-s",
        type=float,
        default=RouterConfig().pending_block_ttl_s,
        help="seconds a placement's block claims live at most; 0: no claims",
    )
    parser.add_argument(
        "--confirm-lag",
        type=int,
        default=32,
        help="placements between a placement and its worker's events; -1: no events",
    )
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--preble-scale", action="store_true", help="the router-scale case for preble (see above)")
    parser.add_argument("--scale-requests", type=int, default=50_000, help="queued requests of --preble-scale")
    parser.add_argument("--scale-policy", default="preble", help="--preble-scale with another policy, for reference")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    workload = Workload(rng, args.families, args.block_size)
    prefill = [f"prefill-{i}" for i in range(args.prefill)]
    decode = [f"decode-{i}" for i in range(args.decode)]
    batches = fill_events(workload, rng, prefill, args.blocks)
    if args.preble_scale:
        run_scale(args, workload, batches)
        return
    prompts = [workload.prompt() for _ in range(args.requests)]

    hash_us = []
    for prompt in prompts[:200]:
        start = time.perf_counter_ns()
        hash_request_blocks(prompt.token_ids, args.block_size)
        hash_us.append((time.perf_counter_ns() - start) / 1000)
    hash_us.sort()

    results = [run_policy(policy, args, batches, prompts, prefill, decode) for policy in POLICIES]
    first = results[0]
    print(
        f"index: {first['indexed_entries']} (worker, block) entries, {first['distinct_blocks']} distinct blocks, "
        f"{args.prefill} prefill + {args.decode} decode workers, block_size {args.block_size}; "
        f"{args.requests} placements of 1k-8k-token prompts per policy; pending_block_ttl_s "
        f"{args.pending_block_ttl_s:g}, confirm lag {args.confirm_lag if args.confirm_lag >= 0 else 'never'}"
    )
    print(f"{'policy':<16} {'p50 us':>8} {'p99 us':>8} {'max us':>8} {'mean us':>8} {'hit rate':>9}  reasons")
    for r in results:
        reasons = ", ".join(f"{k} {v}" for k, v in r["reasons"].items())  # type: ignore[attr-defined]
        print(
            f"{r['policy']:<16} {r['p50_us']:>8.1f} {r['p99_us']:>8.1f} {r['max_us']:>8.1f} {r['mean_us']:>8.1f} "
            f"{r['hit_rate']:>9.3f}  {reasons}"
        )
    print(
        f"hashing token ids (not in place() above): p50 {percentile(hash_us, 50):.0f} us, "
        f"p99 {percentile(hash_us, 99):.0f} us per prompt"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "results": results,
            "hash_p50_us": percentile(hash_us, 50),
            "hash_p99_us": percentile(hash_us, 99),
            "args": vars(args) | {"json": str(args.json)},
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
