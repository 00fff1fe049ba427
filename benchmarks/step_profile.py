"""Where an engine step's time goes under continuous load: the offline engine in a closed loop.

`--concurrency` requests of `--input-len` prompt / `--output-len` output tokens are kept in flight (a
finished one is replaced at once, as a closed-loop client does); every step is cut into its phases,
with a device synchronisation at each cut so GPU work is charged to the phase that queued it:

    schedule   the scheduler picks the batch
    execute    inputs built and sent, the forward (graph or eager), logits
    sample     sampling and the device-to-host copy of the tokens
    process    tokens appended, detokenized, stops checked, outputs built

Steps are grouped by the path they took (decode graph, mixed graph, eager). The synchronisations
remove what little overlap the engine has, so the sum is an upper bound of an unprofiled step.

    python benchmarks/step_profile.py --out results/step_profile.json
    python benchmarks/step_profile.py --tiny      # a tiny config on CPU, to check the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import LLAMA_31_8B, TINY, write_model_dir
from benchmarks.engine_bench import prompt_ids, sync

PHASES = ("schedule", "execute", "sample", "process")


def profile(model_dir: str, concurrency: int, input_len: int, output_len: int, num_steps: int, extra: dict) -> dict:
    from services.engine import LLMEngine, SamplingParams

    engine = LLMEngine(model=model_dir, load_format="dummy", max_num_seqs=concurrency, **extra)
    vocab = engine.runner.model.spec.vocab_size
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    next_id = 0

    def add() -> None:
        nonlocal next_id
        engine.add_request(f"r{next_id}", prompt_ids(input_len, vocab, seed=next_id), params)
        next_id += 1

    for _ in range(concurrency):
        add()
    runner, scheduler = engine.runner, engine.scheduler
    by_path: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    tokens_by_path: dict[str, list[int]] = defaultdict(list)
    warm_steps = output_len  # one full generation before measuring: arrivals are spread by then
    wall_start = 0.0
    finished_measured = 0
    for step in range(warm_steps + num_steps):
        if step == warm_steps:
            sync()
            wall_start, finished_measured = time.perf_counter(), 0
        before = dict(runner.steps_by_path)
        t0 = time.perf_counter()
        batch = scheduler.schedule()
        t1 = time.perf_counter()
        logits, sampled = runner.execute(batch, engine.kv_cache.block_ids)
        sync()
        t2 = time.perf_counter()
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += num_new
        result = engine.sampler(logits, sampled) if sampled else None
        t3 = time.perf_counter()
        outputs = engine._process(sampled, result) if result is not None else []
        t4 = time.perf_counter()
        path = next(p for p, n in runner.steps_by_path.items() if n != before.get(p, 0))
        if step >= warm_steps:
            for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                by_path[path][phase].append(seconds)
            tokens_by_path[path].append(sum(batch.num_new_tokens))
        done = sum(1 for o in outputs if o.finished)
        finished_measured += done if step >= warm_steps else 0
        for _ in range(done):
            add()
    sync()
    wall_s = time.perf_counter() - wall_start
    summary: dict = {"requests_per_s": finished_measured / wall_s, "steps": num_steps, "paths": {}}
    for path, phases in by_path.items():
        summary["paths"][path] = {
            "steps": len(phases["execute"]),
            "mean_tokens": statistics.mean(tokens_by_path[path]),
            **{f"{phase}_ms": statistics.mean(phases[phase]) * 1e3 for phase in PHASES},
        }
    return summary


def report(summary: dict) -> str:
    lines = [
        f"closed loop: {summary['requests_per_s']:.1f} req/s over {summary['steps']} profiled steps",
        "| path | steps | mean tokens | " + " | ".join(f"{p} ms" for p in PHASES) + " | total ms |",
        "|---|---|---|" + "---|" * (len(PHASES) + 1),
    ]
    for path, row in sorted(summary["paths"].items()):
        total = sum(row[f"{p}_ms"] for p in PHASES)
        cells = " | ".join(f"{row[f'{p}_ms']:.2f}" for p in PHASES)
        lines.append(f"| {path} | {row['steps']} | {row['mean_tokens']:.0f} | {cells} | {total:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=180)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--mixed-cuda-graph-max-tokens", type=int, default=None)
    parser.add_argument("--prefill-attention", choices=["varlen", "sdpa"], default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    extra: dict = {}
    if args.mixed_cuda_graph_max_tokens is not None:
        extra["mixed_cuda_graph_max_tokens"] = args.mixed_cuda_graph_max_tokens
    if args.prefill_attention is not None:
        extra["varlen_prefill_attention"] = args.prefill_attention == "varlen"
    if args.tiny:
        args.concurrency, args.input_len, args.output_len, args.steps = 8, 16, 8, 20
    model_dir = write_model_dir(TINY if args.tiny else LLAMA_31_8B)
    summary = profile(model_dir, args.concurrency, args.input_len, args.output_len, args.steps, extra)
    summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary["engine_overrides"] = extra
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"## step profile: {summary['device']}, {extra or 'defaults'}")
    print(report(summary))


if __name__ == "__main__":
    main()
