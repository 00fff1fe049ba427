"""Serving throughput on one GPU: `tristage serve` driven by tristage-loadgen over HTTP, against the
engine's own decode step measured in the same run.

Llama-3.1-8B shapes, dummy weights, prompts sent as token ids to /v1/completions, output lengths fixed
per request (ignore_eos, min_tokens = max_tokens).

  yardstick  in its own process, before any server starts (so its GPU memory is gone by then):
             the engine's decode step at batch 256 and at batch 1, 1k-token context
             (benchmarks/engine_bench.py), and the weight-read floor = weight bytes / copy bandwidth
  closed     1024 requests of 200 prompt / 180 output tokens, 256 in flight (a closed loop), after
             64 warm-up requests that are not counted
  sharegpt   1024 requests sent at once (--rate inf), lognormal prompt and output lengths (sigma 0.9,
             at most 2048 tokens) with means 200 / 180, like ShareGPT's 202 / 179 in vLLM's benchmark

each against every mode of --modes: colocated (one engine actor) and disaggregated (one prefill and
one decode actor on the same GPU; serve gives each half of its memory).

Ratios, each of two figures of this run, and their targets:
  req/s / 44                          >= 1      the target throughput
  req/s / 37                          >= 1      vLLM v0.6.0's published figure, Llama-3-8B on one H100,
                                                ShareGPT at rate inf (compare the sharegpt rows)
  mean TPOT / decode step b256        <= 1.5
  p99 ITL / decode step b256          <= 2.5
  decode step b1 / weight-read floor  <= 1.15

    python benchmarks/serving_throughput.py --out results/serving_throughput.json
    python benchmarks/serving_throughput.py --serve-arg=--no-prefix-caching   # flags for serve, repeatable
    python benchmarks/serving_throughput.py --tiny      # tiny config and sizes on CPU, to check the script
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_models import LLAMA_31_8B, TINY, add_serve_arg, start_serve, write_model_dir
from services.engine.config import SMALL_BATCH_LINEAR_KERNELS, EngineConfig

PORT = 8791
TARGET_REQUESTS_PER_S = 44.0
VLLM_060_H100_SHAREGPT_REQUESTS_PER_S = 37.0
YARDSTICK_BATCH = 256
MODE_ARGS = {
    "colocated": ["--mode", "colocated", "--replicas", "1"],
    "disaggregated": ["--mode", "disaggregated", "--prefill", "1", "--decode", "1"],
}
LOGNORMAL_SIGMA = 0.9  # ShareGPT's lengths spread about this much around their median (log scale)
SEEDS = {"warmup": 1, "closed": 2, "sharegpt": 3}  # different prompts: no prefix-cache hits across runs


@dataclass(frozen=True)
class Sizes:
    num_requests: int
    num_warmup_requests: int
    concurrency: int  # closed: requests in flight
    mean_input_tokens: int
    mean_output_tokens: int
    max_tokens: int  # sharegpt: cap on a prompt's and an output's length


FULL_SIZES = Sizes(1024, 64, 256, 200, 180, 2048)
TINY_SIZES = Sizes(32, 8, 8, 16, 8, 64)


# ------------------------------------------------------------------ yardstick


def measure_yardstick(model_dir: str, tiny: bool, small_batch_linear: str) -> dict[str, Any]:
    """Decode steps at batch 1 and 256 (1k-token context) and the weight-read floor, in this process,
    with the skinny-product kernel the server runs (services/engine/small_batch_linear.py)."""
    from benchmarks.engine_bench import (
        build_engine,
        decode_step_time,
        measure_floors,
        mixed_step_times,
        weight_bytes_read_per_step,
    )
    from services.engine import SamplingParams

    floors = measure_floors(tiny)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the copy buffers: their memory goes to the engine's KV cache
    engine = build_engine(model_dir, small_batch_linear=small_batch_linear)
    vocab_size = engine.runner.model.spec.vocab_size
    step_b1_s, _ = decode_step_time(engine, 1, SamplingParams, vocab_size, tiny)
    step_b256_s, _ = decode_step_time(engine, YARDSTICK_BATCH, SamplingParams, vocab_size, tiny)
    mixed_s = mixed_step_times(engine, SamplingParams, vocab_size, tiny)
    weight_bytes = weight_bytes_read_per_step(engine.runner.model)
    return {
        "device": floors["device"],
        "copy_bandwidth_bytes_per_s": floors["copy_bandwidth_bytes_per_s"],
        "weight_bytes_read_per_step": weight_bytes,
        "weight_read_floor_s": weight_bytes / floors["copy_bandwidth_bytes_per_s"],
        "decode_step_b1_s": step_b1_s,
        "decode_step_b256_s": step_b256_s,
        "mixed_step_s": mixed_s,
    }


def yardstick_in_subprocess(model_dir: str, tiny: bool, small_batch_linear: str) -> dict[str, Any]:
    """This script with --yardstick-json: the engine's GPU memory is freed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix="yardstick-"), "yardstick.json")
    command = [sys.executable, __file__, "--yardstick-json", str(path), "--model-dir", model_dir]
    command += ["--small-batch-linear", small_batch_linear]
    subprocess.run([*command, *(["--tiny"] if tiny else [])], check=True)
    return json.loads(path.read_text())


# ------------------------------------------------------------------ workloads


def capped_lognormal_mean(median_tokens: int, sigma: float, max_tokens: int) -> float:
    """E[min(X, max)] for X ~ lognormal(ln median, sigma): X's mean below the cap plus the cap times P(X > cap)."""
    z = (math.log(max_tokens) - math.log(median_tokens)) / sigma
    uncapped_mean = median_tokens * math.exp(sigma**2 / 2)
    return uncapped_mean * _normal_cdf(z - sigma) + max_tokens * (1 - _normal_cdf(z))


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def lognormal_spec(mean_tokens: int, max_tokens: int, sigma: float = LOGNORMAL_SIGMA) -> str:
    """loadgen's lognormal length spec with the whole-token median whose capped mean is nearest `mean_tokens`.

    Uncapped, mean = median * exp(sigma^2 / 2); the cap lowers it (by about 0.3 tokens at mean 200, sigma
    0.9, cap 2048), so the median is chosen on the capped mean. Left out: rounding draws to whole tokens
    and clipping them at 1 (far below a token each), and the median being whole (mean within ~1 token).
    """
    median = min(
        range(1, mean_tokens + 1), key=lambda m: abs(capped_lognormal_mean(m, sigma, max_tokens) - mean_tokens)
    )
    return f"lognormal:median={median},sigma={sigma:g},max={max_tokens}"


def closed_args(sizes: Sizes, num_requests: int, seed: int) -> list[str]:
    return [
        *("--workload", "random", "--seed", str(seed), "--num-requests", str(num_requests)),
        *("--input-len", str(sizes.mean_input_tokens), "--output-len", str(sizes.mean_output_tokens)),
        *("--concurrency", str(sizes.concurrency)),
    ]


def sharegpt_args(sizes: Sizes) -> list[str]:
    input_len = lognormal_spec(sizes.mean_input_tokens, sizes.max_tokens)
    output_len = lognormal_spec(sizes.mean_output_tokens, sizes.max_tokens)
    return [
        *("--workload", "random", "--seed", str(SEEDS["sharegpt"]), "--num-requests", str(sizes.num_requests)),
        *("--input-len", input_len, "--output-len", output_len),
        *("--rate", "inf"),  # all at once; the server admits what it can
    ]


# ------------------------------------------------------------------ serving


def run_loadgen(model_dir: str, out_dir: Path, workload_args: list[str]) -> dict[str, Any]:
    """One `python -m loadgen run` against the server on PORT; its summary.json."""
    subprocess.run(
        [
            *(sys.executable, "-m", "loadgen", "run", "--base-url", f"http://127.0.0.1:{PORT}", "--model", "bench"),
            *("--endpoint", "completions", "--tokenizer", model_dir, "--prompt-token-ids"),
            *("--no-progress", "--no-plots", "--out", str(out_dir), *workload_args),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads(Path(out_dir, "summary.json").read_text())


def serving_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures of one loadgen run; failed counts every request that did not complete (any error,
    a time-out, not sent)."""
    return {
        "requests_per_s": summary["request_throughput"],
        "output_tokens_per_s": summary["output_token_throughput"],
        "tpot_mean_s": summary["tpot"]["mean"],
        "itl_p50_s": summary["itl"]["p50"],
        "itl_p99_s": summary["itl"]["p99"],
        "ttft_p50_s": summary["ttft"]["p50"],
        "ttft_p99_s": summary["ttft"]["p99"],
        "failed": summary["num_requests"] - summary["completed"],
        "errors": summary["errors"],
        "mean_input_tokens": summary["input_tokens"]["mean"],
        "mean_output_tokens": summary["output_tokens"]["mean"],
        "duration_s": summary["duration_s"],
    }


def run_mode(model_dir: str, mode: str, sizes: Sizes, serve_args: list[str]) -> dict[str, Any]:
    """Start serve in `mode`, warm it up, run closed then sharegpt; stop it (its workers go with it)."""
    serve = start_serve(model_dir, PORT, *MODE_ARGS[mode], *serve_args, timeout_s=600)
    work_dir = Path(tempfile.mkdtemp(prefix=f"serving-{mode}-"))
    try:
        run_loadgen(model_dir, work_dir / "warmup", closed_args(sizes, sizes.num_warmup_requests, SEEDS["warmup"]))
        closed = run_loadgen(model_dir, work_dir / "closed", closed_args(sizes, sizes.num_requests, SEEDS["closed"]))
        sharegpt = run_loadgen(model_dir, work_dir / "sharegpt", sharegpt_args(sizes))
    finally:
        serve.terminate()
        serve.wait(120)
    result = {"closed": serving_figures(closed), "sharegpt": serving_figures(sharegpt)}
    for workload, figures in result.items():
        print(f"{mode} {workload}: {figures}", flush=True)
    return result


# ------------------------------------------------------------------ report


def ratios(figures: dict[str, Any], yardstick: dict[str, Any] | None) -> dict[str, float | None]:
    step_s = yardstick["decode_step_b256_s"] if yardstick else None
    return {
        "requests_per_s_over_target": figures["requests_per_s"] / TARGET_REQUESTS_PER_S,
        "requests_per_s_over_vllm": figures["requests_per_s"] / VLLM_060_H100_SHAREGPT_REQUESTS_PER_S,
        "tpot_mean_over_step_b256": _ratio(figures["tpot_mean_s"], step_s),
        "itl_p99_over_step_b256": _ratio(figures["itl_p99_s"], step_s),
    }


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def _ms(value_s: float | None) -> str:
    return "-" if value_s is None else f"{value_s * 1e3:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def header(device: str, config_name: str, serve_args: list[str], yardstick: dict[str, Any] | None) -> list[str]:
    lines = [f"## serving throughput: {device}, {config_name} shapes, dummy weights, serve args {serve_args or 'none'}"]
    if yardstick:
        floor_s, step_b1_s = yardstick["weight_read_floor_s"], yardstick["decode_step_b1_s"]
        lines.append(
            f"yardstick: decode step b{YARDSTICK_BATCH} (1k context) {_ms(yardstick['decode_step_b256_s'])} ms; "
            f"b1 {_ms(step_b1_s)} ms against the weight-read floor {_ms(floor_s)} ms "
            f"({yardstick['weight_bytes_read_per_step'] / 1e9:.2f} GB / "
            f"{yardstick['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s): "
            f"b1 / floor = {step_b1_s / floor_s:.2f} (target <= 1.15)"
        )
        mixed = ", ".join(f"{path} {_ms(t)} ms" for path, t in yardstick.get("mixed_step_s", {}).items())
        lines.append(f"mixed step (decodes + one prompt, see engine_bench.mixed_step_times): {mixed}")
    return lines


def table(results: dict[str, dict[str, Any]], yardstick: dict[str, Any] | None) -> list[str]:
    lines = [
        "| mode | workload | req/s | out tok/s | mean in/out tok | mean TPOT ms | ITL p50 / p99 ms "
        "| TTFT p50 / p99 ms | failed | req/s / 44 (>= 1) | req/s / 37 vLLM (>= 1) "
        "| TPOT / step b256 (<= 1.5) | p99 ITL / step b256 (<= 2.5) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, workloads in results.items():
        for workload, f in workloads.items():
            r = ratios(f, yardstick)
            lines.append(
                f"| {mode} | {workload} | {f['requests_per_s']:.1f} | {f['output_tokens_per_s']:.0f} "
                f"| {f['mean_input_tokens']:.0f} / {f['mean_output_tokens']:.0f} | {_ms(f['tpot_mean_s'])} "
                f"| {_ms(f['itl_p50_s'])} / {_ms(f['itl_p99_s'])} | {_ms(f['ttft_p50_s'])} / {_ms(f['ttft_p99_s'])} "
                f"| {f['failed']} | {_x(r['requests_per_s_over_target'])} | {_x(r['requests_per_s_over_vllm'])} "
                f"| {_x(r['tpot_mean_over_step_b256'])} | {_x(r['itl_p99_over_step_b256'])} |"
            )
    return lines


def device_name() -> str:
    """Asked after serving, so this process holds no CUDA context while the servers run."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="colocated,disaggregated", help="comma-separated: colocated, disaggregated")
    add_serve_arg(parser)
    parser.add_argument(
        "--small-batch-linear",
        choices=SMALL_BATCH_LINEAR_KERNELS,
        default=EngineConfig.small_batch_linear,
        help="decode's matrix products, for the yardstick's engine and the server (serve's flag of the name)",
    )
    parser.add_argument("--out", default="results/serving_throughput.json", help="all figures, as JSON")
    parser.add_argument("--tiny", action="store_true", help="tiny config and sizes on CPU, to check the script")
    parser.add_argument("--skip-yardstick", action="store_true", help="serving figures only (no step ratios)")
    parser.add_argument("--model-dir", help="reuse a model directory (default: write the config's)")
    parser.add_argument("--yardstick-json", help="only measure the yardstick, into this file (run as a subprocess)")
    args = parser.parse_args()
    unknown = set(args.modes.split(",")) - MODE_ARGS.keys()
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {sorted(MODE_ARGS)}")
    return args


def main() -> None:
    args = parse_args()
    config_name, config = ("TINY", TINY) if args.tiny else ("Llama-3.1-8B", LLAMA_31_8B)
    model_dir = args.model_dir or write_model_dir(config)
    if args.yardstick_json:
        measured = measure_yardstick(model_dir, args.tiny, args.small_batch_linear)
        Path(args.yardstick_json).write_text(json.dumps(measured, indent=1))
        return
    sizes = TINY_SIZES if args.tiny else FULL_SIZES
    serve_args = [*args.serve_arg, "--small-batch-linear", args.small_batch_linear]
    serve_args += ["--device", "cpu"] if args.tiny else []
    yardstick = None if args.skip_yardstick else yardstick_in_subprocess(model_dir, args.tiny, args.small_batch_linear)
    results = {mode: run_mode(model_dir, mode, sizes, serve_args) for mode in args.modes.split(",")}
    device = device_name()
    report = {
        "device": device,
        "config": config_name,
        "serve_args": serve_args,
        "sizes": asdict(sizes),
        "sharegpt_lengths": {
            "input": lognormal_spec(sizes.mean_input_tokens, sizes.max_tokens),
            "output": lognormal_spec(sizes.mean_output_tokens, sizes.max_tokens),
        },
        "yardstick": yardstick,
        "results": results,
        "ratios": {mode: {w: ratios(f, yardstick) for w, f in r.items()} for mode, r in results.items()},
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"figures in {args.out}")
    print("\n".join(header(device, config_name, serve_args, yardstick) + table(results, yardstick)))


if __name__ == "__main__":
    main()
