"""Router policies on a shared-prefix workload: prefix-hit rate and latency of each, one workload for all.

Preble's setting: prompts share long prefixes (system prompts, documents, tool descriptions) whose
popularity follows Zipf-1.1 over many groups. Each policy gets a fresh `tristage serve --mode
colocated --replicas W` (W workers, empty caches) and the identical request sequence (same seed,
same arrival times) from tristage-loadgen. The KV cache of each worker is sized to hold only a
fraction of all prefixes (--gpu-memory-utilization), so where a prefix lands decides whether it is
recomputed.

    python benchmarks/policy_comparison.py --workers 4 --out $OUT/policies.json
    python benchmarks/policy_comparison.py --tiny --workers 2     # a tiny config on CPU, to check the script
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import LLAMA_31_8B, TINY, start_serve, write_model_dir

PORT = 8791
POLICIES = ("round_robin", "least_load", "prefix_affinity", "preble")


def metric(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def run_policy(model_dir: str, policy: str, workers: int, workload: list[str], serve_args: list[str]) -> dict:
    serve = start_serve(
        model_dir, PORT, "--mode", "colocated", "--replicas", str(workers), "--router-policy", policy, *serve_args
    )
    out = tempfile.mkdtemp(prefix=f"policy-{policy}-")
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "loadgen",
                "run",
                "--base-url",
                f"http://127.0.0.1:{PORT}",
                "--model",
                "bench",
                "--endpoint",
                "completions",
                "--tokenizer",
                model_dir,
                "--prompt-token-ids",
                "--no-progress",
                "--no-plots",
                "--out",
                out,
                *workload,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        text = httpx.get(f"http://127.0.0.1:{PORT}/metrics", timeout=30).text
    finally:
        serve.terminate()
        serve.wait(120)
    summary = json.loads(Path(out, "summary.json").read_text())
    queried, hits = metric(text, "vllm:prefix_cache_queries_total"), metric(text, "vllm:prefix_cache_hits_total")
    result = {
        "completed": summary["completed"],
        "num_requests": summary["num_requests"],
        "prefix_hit_rate": hits / queried if queried else 0.0,
        "e2e_mean_s": summary["e2e"]["mean"],
        "e2e_p99_s": summary["e2e"]["p99"],
        "ttft_mean_s": summary["ttft"]["mean"],
        "ttft_p99_s": summary["ttft"]["p99"],
    }
    print(f"{policy}: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.2,
        help="per GPU; workers sharing a GPU split it (0.2 of an H200 leaves ~11 GB of KV for 8B)",
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    model_dir = write_model_dir(TINY if args.tiny else LLAMA_31_8B)
    if args.tiny:
        sizes = dict(groups=16, prefix=512, suffix=32, output=8, requests=60, rate=10)
        serve_args = ["--device", "cpu", "--max-model-len", "1024"]
    else:  # each worker's KV holds about a fifth of all prefixes (8B: 128 KiB a token)
        sizes = dict(groups=200, prefix=4096, suffix="uniform:min=64,max=256", output=32, requests=600, rate=24)
        serve_args = ["--gpu-memory-utilization", str(args.gpu_memory_utilization), "--max-model-len", "8192"]
    workload = [
        "--workload",
        "shared-prefix",
        "--num-groups",
        str(sizes["groups"]),
        "--zipf",
        "1.1",
        "--prefix-len",
        str(sizes["prefix"]),
        "--suffix-len",
        str(sizes["suffix"]),
        "--output-len",
        str(sizes["output"]),
        "--num-requests",
        str(sizes["requests"]),
        "--rate",
        str(sizes["rate"]),
        "--seed",
        "7",
    ]
    results: dict[str, dict] = {}
    for policy in args.policies.split(","):
        results[policy] = run_policy(model_dir, policy, args.workers, workload, serve_args)
        if args.out:  # after each policy, so a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps({"workload": workload, "results": results}, indent=1))
    base = results.get("round_robin")
    for policy, r in results.items():
        speedup = f"{base['e2e_mean_s'] / r['e2e_mean_s']:.2f} x" if base else "-"
        print(
            f"| {policy} | {r['prefix_hit_rate']:.1%} | {r['e2e_mean_s'] * 1e3:.0f} ms | "
            f"{r['e2e_p99_s'] * 1e3:.0f} ms | {r['ttft_mean_s'] * 1e3:.0f} ms | {speedup} |"
        )


if __name__ == "__main__":
    main()
