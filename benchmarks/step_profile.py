"""Where an engine step's time goes under continuous load: the offline engine in a closed loop.

`--concurrency` requests of `--input-len` prompt / `--output-len` output tokens are kept in flight (a
finished one is replaced at once, as a closed-loop client does). After one generation's worth of
warm-up steps it reports requests per second and the mean step time; with `--no-overlap-outputs` it
then also cuts each step into the engine's phases, with a device synchronisation after the launch
so GPU work is charged to it:

    launch    schedule, inputs built and sent, the forward (graph or eager), sampling queued
    collect   tokens to the host, appended, stops applied
    finish    detokenized, outputs built

grouped by the path the step took (decode graph, mixed graph, eager). With overlap (the default)
`finish` of one step runs while the next step's forward does, so it has no phase of its own.

    python benchmarks/step_profile.py --out results/step_profile.json
    python benchmarks/step_profile.py --no-overlap-outputs   # the plain order, and its phases
    python benchmarks/step_profile.py --no-async-scheduling  # collect a step's tokens before launching the next
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

PHASES = ("launch", "collect", "finish")


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

    def closed_loop(steps: int, phases: dict[str, dict[str, list[float]]] | None) -> tuple[int, float]:
        """Run `steps` steps, replacing finished requests; (requests finished, seconds)."""
        runner, finished = engine.runner, 0
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            before = dict(runner.steps_by_path)
            if phases is None:
                outputs = engine.step()
            else:  # the engine's own phases, in the order of a step without overlap, each one synced
                t0 = time.perf_counter()
                engine._launch()
                sync()
                t1 = time.perf_counter()
                collected = engine._collect(engine._take_in_flight())
                t2 = time.perf_counter()
                outputs = engine._finish(collected)
                t3 = time.perf_counter()
                path = next((p for p, n in runner.steps_by_path.items() if n != before.get(p, 0)), "idle")
                for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2)):
                    phases[path][phase].append(seconds)
            done = sum(1 for o in outputs if o.finished)
            finished += done
            for _ in range(done):
                add()
        sync()
        return finished, time.perf_counter() - start

    for _ in range(concurrency):
        add()
    closed_loop(output_len, None)  # one full generation first: arrivals are spread by then
    finished, seconds = closed_loop(num_steps, None)
    by_path: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    if not engine.config.overlap_outputs:
        closed_loop(num_steps, by_path)
    summary: dict = {"requests_per_s": finished / seconds, "step_ms": seconds / num_steps * 1e3, "steps": num_steps}
    summary["paths"] = {
        path: {"steps": len(phases["launch"]), **{f"{p}_ms": statistics.mean(phases[p]) * 1e3 for p in PHASES}}
        for path, phases in by_path.items()
    }
    return summary


def report(summary: dict) -> str:
    lines = [
        f"closed loop: {summary['requests_per_s']:.1f} req/s, {summary['step_ms']:.2f} ms a step "
        f"over {summary['steps']} steps"
    ]
    if summary["paths"]:
        lines += [
            "phases (synced, without overlap):",
            "| path | steps | " + " | ".join(f"{p} ms" for p in PHASES) + " | total ms |",
            "|---|---|" + "---|" * (len(PHASES) + 1),
        ]
        for path, row in sorted(summary["paths"].items()):
            total = sum(row[f"{p}_ms"] for p in PHASES)
            cells = " | ".join(f"{row[f'{p}_ms']:.2f}" for p in PHASES)
            lines.append(f"| {path} | {row['steps']} | {cells} | {total:.2f} |")
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
    parser.add_argument("--no-overlap-outputs", action="store_true", help="and profile the phases of a step")
    parser.add_argument("--no-async-scheduling", action="store_true", help="collect a step before launching the next")
    parser.add_argument("--max-prefill-tokens-beside-decodes", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    extra: dict = {}
    if args.mixed_cuda_graph_max_tokens is not None:
        extra["mixed_cuda_graph_max_tokens"] = args.mixed_cuda_graph_max_tokens
    if args.prefill_attention is not None:
        extra["varlen_prefill_attention"] = args.prefill_attention == "varlen"
    if args.no_overlap_outputs:
        extra["overlap_outputs"] = False
    if args.no_async_scheduling:
        extra["async_scheduling"] = False
    if args.max_prefill_tokens_beside_decodes is not None:
        extra["max_prefill_tokens_beside_decodes"] = args.max_prefill_tokens_beside_decodes
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
