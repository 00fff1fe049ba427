"""LayerKV's host tier for the prefix cache (issue 16): TTFT of later turns of multi-turn conversations
whose histories outgrow the device KV pool, with the host tier (`tristage serve --kv-offloading-size`)
and without it, on the same server otherwise.

Setting: Llama-3.1-8B shapes, dummy weights, one colocated worker (`--mode colocated --replicas 1`).
Workload (tristage-loadgen's multi-turn): --conversations N (64) of --turns T (6); each turn sends the
whole history (earlier user messages and the replies received, as completions text) plus a new user
message of --input-tokens (1024), and asks for --output-tokens (64). Loadgen sends turn-major
(c0t0 c1t0 ... c0t1 c1t1 ...) at Poisson --rate (2 req/s), a turn waiting for its conversation's last
reply: between two turns of one conversation every other conversation takes a turn, so the device
pool cycles through all N histories and LRU evicts a conversation's history before its next turn.

KV sizing, from the config (printed with the results):

    kv_bytes_per_token = 2 (k, v) * layers * kv_heads * head_dim * dtype bytes  (bf16: 2; float32 on CPU)
    final_history      = T * (input_tokens + output_tokens)     one conversation's KV at its last turn
    all_histories      = N * final_history
    device blocks      = ceil(--device-fraction (0.25) * all_histories / block_size)   (serve's --num-kv-blocks),
                         at least MIN_RESIDENT_HISTORIES final histories, so the longest turns can run
                         (the flag gets one more: the engine's padding block holds no KV)
    host tier GiB      = all_histories * kv_bytes_per_token * HOST_MARGIN / 2^30  (room for every history
                         and the warm-up's prompts), 0 in the baseline

By default: 128 KiB a token, a final history 6528 tokens, all 417,792; a device pool of 6528 blocks
(104,448 tokens, the issue's "about 100k") and a host tier of 56.1 GiB, pinned: the machine needs that
much host memory free (fewer --conversations shrink it).

Modes, each a fresh server with empty caches, warmed up with 16 random prompts (--tiny: 2; not
counted), then the conversations (same seed, same arrival times):
  tier-off   --kv-offloading-size 0: an evicted block is dropped and recomputed on its next hit
  host-tier  --kv-offloading-size <host tier GiB>: an evicted block is copied to host memory and copied
             back on its next hit

Reported per mode: TTFT mean / p50 / p99 of turn 1 and of turns >= 2 (and the mean of each turn), the
prefix-hit rates (prompt tokens found on the device, and restored from the host tier, over the tokens
looked up) and the host tier's hit tokens and copied bytes, all from the worker's own /metrics
(serve's --worker-metrics-port), scraped before and after the conversations.
The rate should stay below what the baseline can serve: the table's req/s under the offered rate
says the server fell behind, and TTFT then holds queueing that grows with the run's length.
--tiny checks the script (and that the host tier gets hits); its TTFTs on a CPU mean nothing.

Target (issue 16, "Targets", the second): mean TTFT of turns >= 2 without the tier / with it >= 3.
The first target (Poisson prompts of 4k-64k tokens, admitted by layer-wise offload) needs per-layer
block tables, which do not exist yet: this script covers the host-tier target only.

    python benchmarks/layerkv.py --out results/layerkv.json
    python benchmarks/layerkv.py --rate 3 --device-fraction 0.2          # tunables, see --help
    python benchmarks/layerkv.py --serve-arg=--max-num-seqs --serve-arg=64   # flags for serve
    python benchmarks/layerkv.py --tiny      # tiny config and sizes on CPU, to check the script
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import LLAMA_31_8B, TINY, add_serve_arg, start_serve, write_model_dir
from benchmarks.policy_comparison import samples
from loadgen.metrics import distribution

PORT = 8791
BASE_URL = f"http://127.0.0.1:{PORT}"
BLOCK_SIZE = 16  # serve's default KV block, in tokens
HOST_MARGIN = 1.1  # host tier room over all histories: the warm-up's prompts are evicted there too
MIN_RESIDENT_HISTORIES = 2  # the device pool holds at least this many final histories
PADDING_BLOCKS = 1  # serve's --num-kv-blocks counts the engine's padding block, which holds no KV
TARGET_LATER_TURNS_RATIO = 3.0
SEEDS = {"warmup": 1, "conversations": 2}  # different prompts: the warm-up shares no prefix with a conversation
MODES = ("tier-off", "host-tier")
# the worker's counters, deltas over the conversations (Prometheus names, `_total` added to counters)
COUNTERS = {
    "queried_tokens": "vllm:prefix_cache_queries_total",
    "device_hit_tokens": "vllm:prefix_cache_hits_total",
    "host_hit_tokens": "tristage:kv_host_hit_tokens_total",
    "offloaded_bytes": "tristage:kv_offloaded_bytes_total",
    "onloaded_bytes": "tristage:kv_onloaded_bytes_total",
    "preemptions": "vllm:num_preemptions_total",
}


@dataclass(frozen=True)
class Sizes:
    num_conversations: int
    num_turns: int
    input_tokens: int  # each turn's new user message
    output_tokens: int
    rate: float  # requests/s, Poisson
    num_warmup_requests: int


FULL_SIZES = Sizes(64, 6, 1024, 64, 2.0, 16)
TINY_SIZES = Sizes(8, 3, 64, 8, 4.0, 2)


@dataclass(frozen=True)
class KVSizing:
    kv_bytes_per_token: int
    final_history_tokens: int  # one conversation's KV at its last turn: T * (input + output)
    all_histories_tokens: int
    device_blocks: int  # serve's --num-kv-blocks, both modes
    host_tier_gib: float  # serve's --kv-offloading-size in host-tier mode

    @property
    def device_tokens(self) -> int:
        return self.device_blocks * BLOCK_SIZE


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * dtype_bytes


def size_kv(config: dict, sizes: Sizes, device_fraction: float, dtype_bytes: int) -> KVSizing:
    """The device pool holds `device_fraction` of all final histories, the host tier all of them."""
    per_token = kv_bytes_per_token(config, dtype_bytes)
    final_history = sizes.num_turns * (sizes.input_tokens + sizes.output_tokens)
    all_histories = sizes.num_conversations * final_history
    device_blocks = max(
        math.ceil(device_fraction * all_histories / BLOCK_SIZE),
        MIN_RESIDENT_HISTORIES * math.ceil(final_history / BLOCK_SIZE),
    )
    host_mib = math.ceil(all_histories * per_token * HOST_MARGIN / 2**20)
    return KVSizing(per_token, final_history, all_histories, device_blocks, host_mib / 1024)


# ---------------------------------------------------------------------------------------------- runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(metrics_port: int) -> dict[str, Any]:
    """The worker's counters (COUNTERS) and its KV room, from its own /metrics."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30, trust_env=False).text
    counters = {key: sum(value for _, value in samples(text, name)) for key, name in COUNTERS.items()}
    cache = [labels for labels, _ in samples(text, "vllm:cache_config_info")]
    return {"counters": counters, "device_kv_tokens": int(cache[0]["num_gpu_blocks"]) * int(cache[0]["block_size"])}


def run_loadgen(model_dir: str, out_dir: Path, time_limit_s: float, workload_args: list[str]) -> dict[str, Any]:
    """One `python -m loadgen run` against the server; its summary.json. Prompts go as text (a
    multi-turn history is text, so its first turn must be too, for the same tokens)."""
    subprocess.run(
        [
            *(sys.executable, "-m", "loadgen", "run", "--base-url", BASE_URL, "--model", "bench"),
            *("--endpoint", "completions", "--tokenizer", model_dir, "--time-limit", str(time_limit_s)),
            *("--no-progress", "--no-plots", "--out", str(out_dir), *workload_args),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(Path(out_dir, "summary.json").read_text())


def warmup_args(sizes: Sizes) -> list[str]:
    return [
        *("--workload", "random", "--seed", str(SEEDS["warmup"]), "--num-requests", str(sizes.num_warmup_requests)),
        *("--input-len", str(sizes.input_tokens), "--output-len", str(sizes.output_tokens), "--concurrency", "4"),
    ]


def conversation_args(sizes: Sizes) -> list[str]:
    return [
        *("--workload", "multi-turn", "--turns", str(sizes.num_turns), "--seed", str(SEEDS["conversations"])),
        *("--num-requests", str(sizes.num_conversations * sizes.num_turns)),
        *("--input-len", str(sizes.input_tokens), "--output-len", str(sizes.output_tokens)),
        *("--rate", str(sizes.rate)),
    ]


def ttft_by_turn(run_dir: Path) -> tuple[dict[str, Any], dict[int, Any]]:
    """TTFT distributions (seconds) of turn 1, of turns >= 2, and of each turn (1-based; loadgen's are
    0-based), over the requests that completed."""
    records = [json.loads(line) for line in Path(run_dir, "results.jsonl").read_text().splitlines() if line]
    done = [(r["turn"] + 1, r["ttft_s"]) for r in records if r["ok"] and r["ttft_s"] is not None]
    groups = {
        "first_turn": distribution([t for turn, t in done if turn == 1]),
        "later_turns": distribution([t for turn, t in done if turn >= 2]),
    }
    per_turn = {turn: distribution([t for n, t in done if n == turn]) for turn in sorted({n for n, _ in done})}
    return groups, per_turn


def run_mode(
    model_dir: str, mode: str, sizes: Sizes, sizing: KVSizing, serve_args: list[str], time_limit_s: float
) -> dict[str, Any]:
    """A fresh server in `mode`: warm-up, metrics, the conversations, metrics; then stop it."""
    host_gib = sizing.host_tier_gib if mode == "host-tier" else 0.0
    metrics_port = free_port()
    started = time.perf_counter()
    serve = start_serve(
        model_dir, PORT, "--mode", "colocated", "--replicas", "1",
        "--num-kv-blocks", str(sizing.device_blocks + PADDING_BLOCKS), "--kv-offloading-size", str(host_gib),
        "--worker-metrics-port", str(metrics_port), *serve_args, timeout_s=900,
    )  # fmt: skip
    serve_start_s = time.perf_counter() - started  # the host tier's pinned allocation included
    work_dir = Path(tempfile.mkdtemp(prefix=f"layerkv-{mode}-"))
    try:
        run_loadgen(model_dir, work_dir / "warmup", time_limit_s, warmup_args(sizes))
        before = scrape(metrics_port)
        summary = run_loadgen(model_dir, work_dir / "conversations", time_limit_s, conversation_args(sizes))
        after = scrape(metrics_port)
    finally:
        serve.terminate()
        serve.wait(120)
    counters = {key: after["counters"][key] - before["counters"][key] for key in COUNTERS}
    queried = max(1.0, counters["queried_tokens"])
    ttft, per_turn = ttft_by_turn(work_dir / "conversations")
    result = {
        "host_tier_gib": host_gib,
        "serve_start_s": serve_start_s,
        "device_kv_tokens": after["device_kv_tokens"],
        "num_requests": summary["num_requests"],
        "completed": summary["completed"],
        "failed": summary["num_requests"] - summary["completed"],
        "errors": summary["errors"],
        "duration_s": summary["duration_s"],
        "mean_input_tokens": summary["input_tokens"]["mean"],
        "ttft": ttft,
        "ttft_per_turn": per_turn,
        "device_hit_rate": counters["device_hit_tokens"] / queried,
        "host_hit_rate": counters["host_hit_tokens"] / queried,
        "counters": counters,
        "loadgen_dir": str(work_dir),
    }
    print(f"{mode}: {json.dumps({k: v for k, v in result.items() if k != 'ttft_per_turn'})}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------- report


def later_turns_ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Tier off over host tier, for the TTFT of turns >= 2 (the target's is the mean's)."""
    if not all(mode in results for mode in MODES):
        return {}
    off, host = (results[mode]["ttft"]["later_turns"] for mode in MODES)
    return {stat: off[stat] / host[stat] if off[stat] and host[stat] else None for stat in ("mean", "p50", "p99")}


def _ms(d: dict[str, Any]) -> str:
    return " / ".join("-" if d[s] is None else f"{d[s] * 1e3:.0f}" for s in ("mean", "p50", "p99"))


def report_lines(results: dict[str, dict[str, Any]], sizing: KVSizing, rate: float, header: str) -> list[str]:
    """The markdown report; req/s below the offered rate means the server fell behind (queueing in TTFT)."""
    reported = ", ".join(f"{mode} {r['device_kv_tokens']}" for mode, r in results.items())
    lines = [
        header,
        f"KV: {sizing.kv_bytes_per_token} bytes/token; a final history {sizing.final_history_tokens} tokens, all "
        f"{sizing.all_histories_tokens}; device pool {sizing.device_blocks} blocks ({sizing.device_tokens} tokens, "
        f"{sizing.device_tokens / sizing.all_histories_tokens:.0%} of all); host tier {sizing.host_tier_gib:.3g} GiB; "
        f"device tokens the worker reported: {reported}",
        "",
        "| mode | host GiB | turn 1 TTFT mean / p50 / p99 ms | turns >= 2 TTFT mean / p50 / p99 ms | device hits "
        "| host hits | host hit tokens | offloaded / onloaded MiB | preemptions | req/s (offered) | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        c = r["counters"]
        lines.append(
            f"| {mode} | {r['host_tier_gib']:.3g} | {_ms(r['ttft']['first_turn'])} | {_ms(r['ttft']['later_turns'])} "
            f"| {r['device_hit_rate']:.1%} | {r['host_hit_rate']:.1%} | {c['host_hit_tokens']:.0f} "
            f"| {c['offloaded_bytes'] / 2**20:.0f} / {c['onloaded_bytes'] / 2**20:.0f} | {c['preemptions']:.0f} "
            f"| {r['completed'] / r['duration_s']:.2f} ({rate:g}) | {r['failed']} |"
        )
    turns = sorted({turn for r in results.values() for turn in r["ttft_per_turn"]})
    lines += ["", "| mode | " + " | ".join(f"turn {t} mean TTFT ms" for t in turns) + " |"]
    lines.append("|---|" + "---|" * len(turns))
    for mode, r in results.items():
        means = [r["ttft_per_turn"].get(t, {}).get("mean") for t in turns]
        lines.append(f"| {mode} | " + " | ".join("-" if m is None else f"{m * 1e3:.0f}" for m in means) + " |")
    ratios = later_turns_ratios(results)
    if ratios:
        shown = ", ".join(f"{stat} {'-' if x is None else f'{x:.2f}'}" for stat, x in ratios.items())
        lines.append(f"\nturns >= 2 TTFT, tier off / host tier: {shown} (target: mean >= {TARGET_LATER_TURNS_RATIO:g})")
    return lines


# ---------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, help=f"default {FULL_SIZES.num_conversations}")
    parser.add_argument("--turns", type=int, help=f"per conversation, default {FULL_SIZES.num_turns}")
    parser.add_argument("--input-tokens", type=int, help=f"each turn's new message, default {FULL_SIZES.input_tokens}")
    parser.add_argument("--output-tokens", type=int, help=f"per turn, default {FULL_SIZES.output_tokens}")
    parser.add_argument("--rate", type=float, help=f"requests/s, Poisson, default {FULL_SIZES.rate:g}")
    parser.add_argument(
        "--device-fraction", type=float, default=0.25, help="device KV pool, of all conversations' final histories"
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    add_serve_arg(parser)
    parser.add_argument("--time-limit", type=float, default=1800.0, help="seconds per loadgen run")
    parser.add_argument("--out", default="results/layerkv.json", help="all figures, as JSON")
    parser.add_argument("--tiny", action="store_true", help="tiny config and sizes on CPU, to check the script")
    args = parser.parse_args()
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    if not 0 < args.device_fraction < 1:
        parser.error("--device-fraction must be in (0, 1): the histories must outgrow the device pool")
    return args


def sizes_from_args(args: argparse.Namespace) -> Sizes:
    base = TINY_SIZES if args.tiny else FULL_SIZES
    given = {
        "num_conversations": args.conversations,
        "num_turns": args.turns,
        "input_tokens": args.input_tokens,
        "output_tokens": args.output_tokens,
        "rate": args.rate,
    }
    return Sizes(**{**asdict(base), **{k: v for k, v in given.items() if v is not None}})


def main() -> None:
    args = parse_args()
    config_name, config = ("TINY", TINY) if args.tiny else ("Llama-3.1-8B", LLAMA_31_8B)
    sizes = sizes_from_args(args)
    dtype_bytes = 4 if args.tiny else 2  # serve's dtype auto: float32 on CPU, bfloat16 on CUDA
    sizing = size_kv(config, sizes, args.device_fraction, dtype_bytes)
    serve_args = [*(["--device", "cpu"] if args.tiny else []), *args.serve_arg]
    header = f"## LayerKV host tier, multi-turn: {config_name} shapes, dummy weights, {asdict(sizes)}"
    print(header + f"\nKV sizing: {asdict(sizing)}", flush=True)
    model_dir = write_model_dir(config)
    report: dict[str, Any] = {
        "config": config_name,
        "sizes": asdict(sizes),
        "device_fraction": args.device_fraction,
        "kv_sizing": {**asdict(sizing), "device_tokens": sizing.device_tokens},
        "serve_args": serve_args,
    }
    results: dict[str, dict[str, Any]] = {}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    for mode in args.modes.split(","):
        results[mode] = run_mode(model_dir, mode, sizes, sizing, serve_args, args.time_limit)
        report.update(results=results, later_turns_ratios=later_turns_ratios(results))
        Path(args.out).write_text(json.dumps(report, indent=1))  # after each mode: a run cut short keeps it
    print(f"figures in {args.out}")
    print("\n".join(report_lines(results, sizing, sizes.rate, header)))


if __name__ == "__main__":
    main()
