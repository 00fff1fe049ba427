"""Router policies on one workload: prefix-hit rate, latency and load balance of each, side by side.

Each policy gets a fresh `tristage serve --mode colocated --replicas W` (W workers, empty caches) and the
identical requests (same seed, same arrival times) from tristage-loadgen: the router's policy is the
only difference between the runs.

Workloads (--workload):
  preble     Preble's synthetic setting (the default): 200 prefix groups of 4096 tokens with Zipf-1.1
             popularity, a 64-256-token suffix each, 32 output tokens, 600 requests
  multiturn  conversations that resend their history (tristage-loadgen's multi-turn workload): 160
             conversations of 5 turns, each turn a new 512-1536-token user message and 32 output tokens

The one-GPU setting, where placement matters: Llama-3.2-1B shapes (dummy weights) and W workers (4 to
8) sharing the GPU, each with KV room for about --kv-fraction (0.1) of the workload's shared tokens
(every prefix, or every conversation's final history), so where a request lands decides whether its
prefix is recomputed. Each worker gets exactly that room (serve's --num-kv-blocks, kv_fraction *
shared_tokens / block size), and the serve's --gpu-memory-utilization (per GPU, split between the
workers on it) is derived from it, unless given, to check that the workers fit:

    kv_bytes  = kv_fraction * shared_tokens * kv_bytes_per_token(model)
    flag      = ceil(W / num_gpus) * (kv_bytes + weight_bytes + activation_bytes) / gpu_bytes

activation_bytes estimates what the engine's profile reserves beyond the weights (its peak step and
headroom, services.engine.model_runner); the KV room each worker reported (vllm:cache_config_info)
is listed with the results.

Local scheduling (--local-schedulers, default fcfs): every policy runs once under each of the
engines' admission orders (serve's --scheduling-policy), so Preble's local priority scheduler is
compared with FCFS at the same placement policy; a run under `preble` is reported as
`<policy>+preble-local`, with its p99 TTFT over the FCFS run's (target <= 0.8).

Offered load: a closed-loop probe on a cluster of its own (--probe-concurrency requests in flight,
--probe-requests of them, under --probe-policy, by default round_robin: the cluster without cache-aware
placement, so every policy is offered a load it can carry) measures the capacity in requests/s; the
policies then get Poisson arrivals at --load (0.75) times that. A probe starts with cold caches, so it
underestimates a cache-friendly steady state: the load is, if anything, lighter than asked.

Reported per policy: the prefix-hit rate (prompt tokens the workers found in their prefix caches over
those they looked up), mean and p99 E2E and TTFT, and the max/min ratio over workers of requests served
and of prompt tokens computed (each floored at 1); then, of mean and p99 E2E, the ratios
preble/prefix_affinity, preble/kv_overlap and round_robin/preble.

    python benchmarks/policy_comparison.py --workers 4 --out $OUT/policies.json
    python benchmarks/policy_comparison.py --workers 8 --workload multiturn --out $OUT/multiturn.json
    python benchmarks/policy_comparison.py --policies preble --local-schedulers fcfs,preble --rate 20
    python benchmarks/policy_comparison.py --serve-arg=--max-num-seqs --serve-arg=64   # flags for serve
    python benchmarks/policy_comparison.py --model llama-3.1-8b --workers 4     # the 8B setting, 2 GPUs
    python benchmarks/policy_comparison.py --tiny      # a tiny model on the CPU: the script end to end
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import LLAMA_31_8B, LLAMA_32_1B, TINY, add_serve_arg, start_serve, write_model_dir

PORT = 8791
BASE_URL = f"http://127.0.0.1:{PORT}"
SEED = 7
POLICIES = ("round_robin", "least_load", "prefix_affinity", "preble", "kv_overlap", "precise_prefix")
RATIOS = (("preble", "prefix_affinity"), ("preble", "kv_overlap"), ("round_robin", "preble"))
MODELS = {"llama-3.2-1b": LLAMA_32_1B, "llama-3.1-8b": LLAMA_31_8B}
DTYPE_BYTES = 2  # bfloat16 weights and KV on a GPU
MAX_MODEL_LEN = 8192
MAX_NUM_BATCHED_TOKENS = 2048  # the serve's defaults, which the activation estimate assumes
MAX_NUM_SEQS = 256
BLOCK_SIZE = 16  # the serve's default KV block, in tokens
LOCAL_SCHEDULERS = ("fcfs", "preble")  # serve's --scheduling-policy


# ---------------------------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    name: str
    flags: tuple[str, ...]  # tristage-loadgen's workload flags, --num-requests included
    shared_tokens: int  # tokens the workers could share: every prefix, or every final history
    token_ids: bool  # prompts go as token ids (a multi-turn history goes as text)


def preble_workload(tiny: bool) -> Workload:
    groups, prefix, suffix, output, requests = (
        (16, 512, "32", 8, 60) if tiny else (200, 4096, "uniform:min=64,max=256", 32, 600)
    )
    flags = ("--workload", "shared-prefix", "--num-groups", str(groups), "--zipf", "1.1")
    flags += ("--prefix-len", str(prefix), "--suffix-len", suffix, "--output-len", str(output))
    return Workload("preble", (*flags, "--num-requests", str(requests)), groups * prefix, True)


def multiturn_workload(tiny: bool) -> Workload:
    conversations, turns, (shortest, longest), output = (6, 3, (48, 80), 8) if tiny else (160, 5, (512, 1536), 32)
    flags = ("--workload", "multi-turn", "--turns", str(turns), "--output-len", str(output))
    flags += ("--input-len", f"uniform:min={shortest},max={longest}", "--num-requests", str(conversations * turns))
    shared_tokens = conversations * turns * ((shortest + longest) // 2 + output)
    return Workload("multiturn", flags, shared_tokens, False)


WORKLOADS = {"preble": preble_workload, "multiturn": multiturn_workload}


# ---------------------------------------------------------------------------------------------- KV sizing


def kv_bytes_per_token(config: dict) -> int:
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * DTYPE_BYTES


def weight_bytes(config: dict) -> int:
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim", hidden // config["num_attention_heads"])
    attention = hidden * head_dim * (2 * config["num_attention_heads"] + 2 * config["num_key_value_heads"])
    mlp = 3 * hidden * config["intermediate_size"]
    embeddings = config["vocab_size"] * hidden * (1 if config["tie_word_embeddings"] else 2)
    return (layers * (attention + mlp + 2 * hidden) + embeddings + hidden) * DTYPE_BYTES


def activation_bytes(config: dict) -> int:
    """The engine's profiled peak beyond the weights (an MLP pass of the largest step, the logits of
    max_num_seqs rows in float32) plus its headroom (a quarter of that, and 256 MiB)."""
    mlp = MAX_NUM_BATCHED_TOKENS * (2 * config["intermediate_size"] + config["hidden_size"]) * DTYPE_BYTES
    logits = min(MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS) * config["vocab_size"] * 4
    return (mlp + logits) * 5 // 4 + 256 * 2**20


def gpus() -> tuple[int, int]:
    """(GPUs on this machine, bytes of the smallest), from nvidia-smi."""
    query = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
    mib = [int(line) for line in subprocess.run(query, capture_output=True, text=True, check=True).stdout.split()]
    return len(mib), min(mib) * 2**20


def memory_utilization(config: dict, workers: int, kv_tokens_per_worker: int) -> float:
    """The serve's --gpu-memory-utilization that leaves each worker about kv_tokens_per_worker of KV."""
    num_gpus, gpu_bytes = gpus()
    per_worker = kv_tokens_per_worker * kv_bytes_per_token(config) + weight_bytes(config) + activation_bytes(config)
    flag = -(-workers // num_gpus) * per_worker / gpu_bytes
    if flag > 0.95:
        raise SystemExit(f"{workers} workers with {kv_tokens_per_worker} KV tokens each need {flag:.2f} of a GPU")
    return round(flag, 4)


# ---------------------------------------------------------------------------------------------- metrics

_SAMPLE = re.compile(r"^(?P<name>[^{\s]+)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of the metric `name` in Prometheus text."""
    found = []
    for line in text.splitlines():
        match = _SAMPLE.match(line) if line.startswith(name) else None
        if match and match["name"] == name:
            found.append((dict(_LABEL.findall(match["labels"] or "")), float(match["value"])))
    return found


def per_worker(text: str, name: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for labels, value in samples(text, name):
        if "worker" in labels:
            totals[labels["worker"]] = totals.get(labels["worker"], 0.0) + value
    return totals


def max_min_ratio(values: dict[str, float]) -> float:
    return max(values.values()) / max(1.0, min(values.values())) if values else math.nan


def cluster_stats(text: str) -> dict[str, Any]:
    """What the workers' /metrics tell: prefix hits, the work each did, their KV room, the router's reasons."""
    queried = per_worker(text, "vllm:prefix_cache_queries_total")
    hits = per_worker(text, "vllm:prefix_cache_hits_total")
    computed = {w: queried[w] - hits.get(w, 0.0) for w in queried}
    served = per_worker(text, "vllm:request_inference_time_seconds_count")
    kv_tokens = {
        labels["worker"]: int(labels["num_gpu_blocks"]) * int(labels["block_size"])
        for labels, _ in samples(text, "vllm:cache_config_info")
    }
    decisions = {labels["reason"]: value for labels, value in samples(text, "tristage:router_decisions_total")}
    return {
        "prefix_hit_rate": sum(hits.values()) / max(1.0, sum(queried.values())),
        "load_ratio_requests": max_min_ratio(served),
        "load_ratio_computed_tokens": max_min_ratio(computed),
        "requests_per_worker": served,
        "computed_tokens_per_worker": computed,
        "kv_tokens_per_worker": kv_tokens,
        "decisions": decisions,
    }


# ---------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Setting:
    model_dir: str
    workers: int
    workload: Workload
    serve_args: tuple[str, ...]
    time_limit_s: float


@contextmanager
def cluster(setting: Setting, policy: str, *extra_args: str) -> Iterator[None]:
    serve = start_serve(
        setting.model_dir, PORT, "--mode", "colocated", "--replicas", str(setting.workers),
        "--router-policy", policy, *setting.serve_args, *extra_args,
    )  # fmt: skip
    try:
        yield
    finally:
        serve.terminate()
        serve.wait(120)


def loadgen(setting: Setting, *arrival_flags: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One tristage-loadgen run against the cluster: its summary, then the cluster's stats after it."""
    out = tempfile.mkdtemp(prefix="policy-run-")
    ids = ["--prompt-token-ids"] if setting.workload.token_ids else []
    command = [sys.executable, "-m", "loadgen", "run", "--base-url", BASE_URL, "--model", "bench"]
    command += ["--endpoint", "completions", "--tokenizer", setting.model_dir, *ids, "--seed", str(SEED)]
    command += ["--time-limit", str(setting.time_limit_s), "--no-progress", "--no-plots", "--out", out]
    subprocess.run([*command, *setting.workload.flags, *arrival_flags], check=True, stdout=subprocess.DEVNULL)
    text = httpx.get(f"{BASE_URL}/metrics", timeout=30).text
    return json.loads(Path(out, "summary.json").read_text()), cluster_stats(text)


def measure_capacity(setting: Setting, policy: str, concurrency: int, num_requests: int) -> dict[str, Any]:
    """Requests/s the cluster completes in a closed loop of `concurrency` requests in flight."""
    with cluster(setting, policy):
        summary, stats = loadgen(setting, "--concurrency", str(concurrency), "--num-requests", str(num_requests))
    probe = {
        "policy": policy,
        "concurrency": concurrency,
        "num_requests": num_requests,
        "completed": summary["completed"],
        "capacity_rps": summary["request_throughput"],
        "kv_tokens_per_worker": stats["kv_tokens_per_worker"],
    }
    print(f"capacity probe: {probe}", flush=True)
    return probe


def run_name(policy: str, local: str) -> str:
    return policy if local == "fcfs" else f"{policy}+{local}-local"


def run_policy(setting: Setting, policy: str, rate: float, local: str = "fcfs") -> dict[str, Any]:
    with cluster(setting, policy, "--scheduling-policy", local):
        summary, stats = loadgen(setting, "--rate", f"{rate:.4f}")
    result = {
        "completed": summary["completed"],
        "num_requests": summary["num_requests"],
        "request_throughput": summary["request_throughput"],
        "e2e_mean_s": summary["e2e"]["mean"],
        "e2e_p99_s": summary["e2e"]["p99"],
        "ttft_mean_s": summary["ttft"]["mean"],
        "ttft_p99_s": summary["ttft"]["p99"],
        **stats,
    }
    brief = {k: v for k, v in result.items() if not isinstance(v, dict)}
    print(f"{run_name(policy, local)}: {brief}", flush=True)
    return result


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    pairs = [(a, b) for a, b in RATIOS if a in results and b in results]
    pairs += [(run_name(p, "preble"), p) for p in results if run_name(p, "preble") in results]
    return {
        f"{a}/{b}": {
            key: results[a][f"{key}_s"] / results[b][f"{key}_s"] for key in ("e2e_mean", "e2e_p99", "ttft_p99")
        }
        for a, b in pairs
    }


def print_report(results: dict[str, dict[str, Any]]) -> None:
    print("| policy | prefix hits | mean E2E | p99 E2E | mean TTFT | p99 TTFT | requests max/min | computed max/min |")
    print("|---|---|---|---|---|---|---|---|")
    for policy, r in results.items():
        ms = [f"{r[key] * 1e3:.0f} ms" for key in ("e2e_mean_s", "e2e_p99_s", "ttft_mean_s", "ttft_p99_s")]
        print(
            f"| {policy} | {r['prefix_hit_rate']:.1%} | {' | '.join(ms)} | "
            f"{r['load_ratio_requests']:.2f} | {r['load_ratio_computed_tokens']:.2f} |"
        )
    for name, ratio in ratios(results).items():
        print(
            f"{name}: mean E2E {ratio['e2e_mean']:.2f} x, p99 E2E {ratio['e2e_p99']:.2f} x, "
            f"p99 TTFT {ratio['ttft_p99']:.2f} x"
        )


# ---------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="preble")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-3.2-1b", help="shapes (dummy weights)")
    parser.add_argument("--workers", type=int, help="colocated workers (default 4; --tiny: 2)")
    parser.add_argument("--kv-fraction", type=float, default=0.1, help="each worker's KV room, of the shared tokens")
    parser.add_argument("--gpu-memory-utilization", type=float, help="per GPU (default: derived from --kv-fraction)")
    parser.add_argument("--load", type=float, default=0.75, help="offered load, of the measured capacity")
    parser.add_argument("--rate", type=float, help="requests/s: skip the capacity probe")
    parser.add_argument("--probe-policy", default="round_robin")
    parser.add_argument("--probe-concurrency", type=int, help="requests in flight (default 8 per worker)")
    parser.add_argument("--probe-requests", type=int, help="default 4 x the probe's concurrency")
    parser.add_argument("--local-schedulers", default="fcfs", help="comma-separated: fcfs, preble")
    add_serve_arg(parser)
    parser.add_argument("--time-limit", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, to check the script")
    parser.add_argument("--out", help="JSON results, rewritten after each policy")
    args = parser.parse_args()
    unknown = set(args.local_schedulers.split(",")) - set(LOCAL_SCHEDULERS)
    if unknown:
        parser.error(f"unknown local schedulers {sorted(unknown)}; choose from {LOCAL_SCHEDULERS}")
    return args


def build_setting(args: argparse.Namespace) -> tuple[Setting, dict[str, Any]]:
    workers = args.workers or (2 if args.tiny else 4)
    workload = WORKLOADS[args.workload](args.tiny)
    config = TINY if args.tiny else MODELS[args.model]
    kv_tokens = round(args.kv_fraction * workload.shared_tokens)
    sizing: dict[str, Any] = {"model": "tiny" if args.tiny else args.model}
    if args.tiny:  # the CPU's default KV budget, which holds everything: sizing is not the point
        serve_args: tuple[str, ...] = ("--device", "cpu", "--max-model-len", "1024")
    else:
        utilization = args.gpu_memory_utilization or memory_utilization(config, workers, kv_tokens)
        blocks = -(-kv_tokens // BLOCK_SIZE)
        sizing.update(target_kv_tokens_per_worker=kv_tokens, gpu_memory_utilization=utilization, kv_blocks=blocks)
        serve_args = ("--gpu-memory-utilization", str(utilization), "--max-model-len", str(MAX_MODEL_LEN))
        serve_args += ("--num-kv-blocks", str(blocks))
    serve_args += tuple(args.serve_arg)
    setting = Setting(write_model_dir(config), workers, workload, serve_args, args.time_limit)
    return setting, sizing


def main() -> None:
    args = parse_args()
    setting, sizing = build_setting(args)
    report: dict[str, Any] = {"setting": {**asdict(setting), **sizing, "load": args.load}}
    if args.rate:
        rate = args.rate
    else:
        concurrency = args.probe_concurrency or (4 if args.tiny else 8 * setting.workers)
        probe = measure_capacity(setting, args.probe_policy, concurrency, args.probe_requests or 4 * concurrency)
        report["capacity_probe"], rate = probe, args.load * probe["capacity_rps"]
    report["rate_rps"] = rate
    print(f"offered load: Poisson at {rate:.2f} requests/s", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for policy in args.policies.split(","):
        for local in args.local_schedulers.split(","):
            results[run_name(policy, local)] = run_policy(setting, policy, rate, local)
        report.update(results=results, ratios=ratios(results))
        if args.out:  # after each policy, so a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(report, indent=1))
    print_report(results)


if __name__ == "__main__":
    main()
