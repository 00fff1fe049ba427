"""What the gateway, Ray and ZeroMQ add: TTFT and inter-token latency through HTTP against the
offline engine, same GPU, same model, same engine settings, same workload.

    offline  LLMEngine in this process, a closed loop of C requests (a new one added as one finishes); a
             request's TTFT is the time from adding it to its first delta, its ITLs the gaps between deltas
    http     `tristage serve` in a subprocess, tristage-loadgen keeping C streaming /v1/completions
             requests in flight (prompts as token ids, fixed output length); times taken at the client

Each concurrency C runs C x (rounds + 1) requests; the first C warm up and are dropped; figures are
means over the rest. Every part is its own
process, so the two engines never share the GPU:

    python benchmarks/http_overhead.py --part offline --out results/offline.json
    python benchmarks/http_overhead.py --part http --out results/http.json
    python benchmarks/http_overhead.py --report results/offline.json results/http.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import LLAMA_31_8B, TINY, start_serve, write_model_dir

INPUT_TOKENS, OUTPUT_TOKENS = 512, 128
CONCURRENCIES = (1, 32, 256)


def rounds_for(concurrency: int) -> int:
    return 5 if concurrency == 1 else 2


def prompt(vocab: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(0, vocab - 3) for _ in range(INPUT_TOKENS)]


# ------------------------------------------------------------------ offline


def bench_offline(model_dir: str, vocab: int) -> dict:
    import torch

    from services.engine import LLMEngine, SamplingParams

    engine = LLMEngine(model=model_dir, load_format="dummy")
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, min_tokens=OUTPUT_TOKENS, ignore_eos=True)
    result = {}
    for c in CONCURRENCIES:
        # a closed loop of c requests, as loadgen keeps c streams in flight; the first c are warm-up
        num_requests = c * (rounds_for(c) + 1)
        t_add: dict[str, float] = {}
        last: dict[str, float] = {}
        ttfts, itls = [], []
        next_index = 0

        def add_one(c: int = c, t_add: dict[str, float] = t_add) -> None:  # this round's c and t_add
            nonlocal next_index
            rid = f"{c}-{next_index}"
            engine.add_request(rid, prompt(vocab, next_index), params)
            t_add[rid] = time.perf_counter()
            next_index += 1

        for _ in range(c):
            add_one()
        while engine.has_unfinished_requests():
            outputs = engine.step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            for out in outputs:
                rid = out.request_id
                measured = int(rid.split("-")[1]) >= c
                if rid not in last:
                    if measured:
                        ttfts.append(now - t_add[rid])
                elif measured:
                    itls.append(now - last[rid])
                last[rid] = now
                if out.finished and next_index < num_requests:
                    add_one()
        result[str(c)] = {"ttft_mean_s": statistics.mean(ttfts), "itl_mean_s": statistics.mean(itls)}
        print(
            f"offline c={c}: TTFT {result[str(c)]['ttft_mean_s'] * 1e3:.1f} ms, "
            f"ITL {result[str(c)]['itl_mean_s'] * 1e3:.2f} ms",
            flush=True,
        )
    return result


# ------------------------------------------------------------------ http


def bench_http(model_dir: str, out_dir: str, mode: str = "colocated") -> dict:
    port = 8765
    serve = start_serve(model_dir, port, "--mode", mode, timeout_s=600)
    try:
        result = {}
        for c in CONCURRENCIES:
            # one loadgen process per concurrency, a closed loop of c streams: the first wave warms the
            # client and the server up and is dropped, as the offline part drops its first round
            run_dir = os.path.join(out_dir, f"http_c{c}")
            num_requests = c * (rounds_for(c) + 1)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "loadgen",
                    "run",
                    "--base-url",
                    f"http://127.0.0.1:{port}",
                    "--model",
                    "bench",
                    "--endpoint",
                    "completions",
                    "--workload",
                    "random",
                    "--input-len",
                    str(INPUT_TOKENS),
                    "--output-len",
                    str(OUTPUT_TOKENS),
                    "--num-requests",
                    str(num_requests),
                    "--concurrency",
                    str(c),
                    "--tokenizer",
                    model_dir,
                    "--prompt-token-ids",
                    "--no-progress",
                    "--no-plots",
                    "--out",
                    run_dir,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            records = [json.loads(line) for line in Path(run_dir, "results.jsonl").read_text().splitlines()]
            measured = [r for r in records if r["index"] >= c]
            assert len(measured) == num_requests - c and all(r["ttft_s"] is not None for r in measured)
            ttfts = [r["ttft_s"] for r in measured]
            itls = [gap for r in measured for gap in r["itl_s"]]
            result[str(c)] = {"ttft_mean_s": statistics.mean(ttfts), "itl_mean_s": statistics.mean(itls)}
            print(
                f"http c={c}: TTFT {result[str(c)]['ttft_mean_s'] * 1e3:.1f} ms, "
                f"ITL {result[str(c)]['itl_mean_s'] * 1e3:.2f} ms",
                flush=True,
            )
        return result
    finally:
        serve.terminate()
        serve.wait(120)


# ------------------------------------------------------------------ report


def report(offline: dict, http: dict) -> str:
    lines = [
        "| streams | TTFT offline | TTFT http | added | ITL offline | ITL http | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in (c for c in offline if c in http):
        o, h = offline[c], http[c]
        lines.append(
            f"| {c} | {o['ttft_mean_s'] * 1e3:.1f} ms | {h['ttft_mean_s'] * 1e3:.1f} ms | "
            f"{(h['ttft_mean_s'] - o['ttft_mean_s']) * 1e3:+.1f} ms | {o['itl_mean_s'] * 1e3:.2f} ms | "
            f"{h['itl_mean_s'] * 1e3:.2f} ms | {h['itl_mean_s'] / o['itl_mean_s']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["offline", "http"])
    parser.add_argument("--out")
    parser.add_argument("--tiny", action="store_true", help="a tiny config, to check the script")
    parser.add_argument("--report", nargs=2, metavar="JSON")
    parser.add_argument("--concurrency", help="comma-separated stream counts (default 1,32,256)")
    parser.add_argument(
        "--mode",
        default="colocated",
        choices=["colocated", "disaggregated"],
        help="the cluster's mode for the http part (colocated: the same engine, one actor)",
    )
    args = parser.parse_args()
    if args.concurrency:
        global CONCURRENCIES
        CONCURRENCIES = tuple(int(c) for c in args.concurrency.split(","))
    if args.report:
        print(report(*(json.loads(Path(p).read_text()) for p in args.report)))
        return
    config = TINY if args.tiny else LLAMA_31_8B
    model_dir = write_model_dir(config)
    if args.part == "offline":
        result = bench_offline(model_dir, config["vocab_size"])
    else:
        result = bench_http(model_dir, tempfile.mkdtemp(prefix="http-runs-"), args.mode)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
