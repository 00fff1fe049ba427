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

    python benchmarks/router_placement.py
    python benchmarks/router_placement.py --pending-block-ttl-s 0     # no claims: the router before them
    python benchmarks/router_placement.py --confirm-lag -1            # no events: claims pile up
    python benchmarks/router_placement.py --requests 5000 --json results/router_placement.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.block_hash import hash_request_blocks
from services.common.kv_events import BlockRemoved, BlockStored, KVEvent
from services.router import POLICIES, Router, RouterConfig, RouteRequest, WorkerLoad

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
    args = parser.parse_args()

    rng = random.Random(args.seed)
    workload = Workload(rng, args.families, args.block_size)
    prefill = [f"prefill-{i}" for i in range(args.prefill)]
    decode = [f"decode-{i}" for i in range(args.decode)]
    batches = fill_events(workload, rng, prefill, args.blocks)
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
