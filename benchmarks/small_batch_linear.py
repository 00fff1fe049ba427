"""Skinny matrix products at decode row counts: the Triton kernel's launch configs against cuBLAS.

At decode a projection reads its weight once and little else, so its speed is weight bytes read
per second. The yardstick is a large device-to-device `dst.copy_(src)` timed in the same run,
counting bytes read plus written (what the memory system moved); each kernel's share of it is its
weight bytes per second over that.

    weight_bytes_read = out_features * in_features * dtype bytes

Method, per (shape, rows): F.linear (cuBLAS) and every config of the sweep grid, each timed as a
CUDA graph of many calls (decode replays graphs), the calls cycling over distinct copies of the
weight that together hold at least ROTATION_L2_MULTIPLE times the L2 cache, so no call finds its
weight in L2. Time per call = median replay time / calls. Each config's output is checked against
F.linear first (max abs error; a config that disagrees is reported and left out of the best).
Kernels compile beforehand in parallel worker processes into Triton's disk cache.

Defaults are Llama-3.1-8B in bf16 (qkv 6144 x 4096, o 4096 x 4096, gate_up 28672 x 4096,
down 4096 x 14336, logits 128256 x 4096) at 1, 2, 4, 8 and 16 rows. The printout ends with the
best config per (shape, rows) and, per row bucket, the one config that minimises a decoder layer
(qkv + o + gate_up + down), as lines to paste into small_batch_linear's table.

    python benchmarks/small_batch_linear.py --out results/small_batch_linear.json
    python benchmarks/small_batch_linear.py --shapes o,down --rows 1,16 --grid full
    python benchmarks/small_batch_linear.py --grid table    # the launch table against cuBLAS only
    python benchmarks/small_batch_linear.py --tiny     # a small shape under Triton's CPU interpreter
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

if "--tiny" in sys.argv:  # before triton is imported: kernels run under the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.engine.small_batch_linear import LaunchConfig, block_rows, launch_config, linear, row_bucket

SHAPES = {  # name -> (out_features, in_features), Llama-3.1-8B
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "logits": (128256, 4096),
}
LAYER_SHAPES = ("qkv", "o", "gate_up", "down")
TINY_SHAPES = {"qkv": (48, 32), "o": (32, 32), "gate_up": (64, 32), "down": (32, 64), "logits": (80, 32)}
COPY_BYTES = 2 << 30  # 2 GiB source, far above L2
ROTATION_L2_MULTIPLE = 4  # weight copies together hold at least this many L2 caches
GRAPH_BYTES = 2 << 30  # weight bytes one graph replay reads, at least (about 0.7 ms on an H100)
REPLAYS = 10
MAX_FMA_REGISTERS = 64  # float32 accumulators per thread of the fma variant, at most (else spills)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument(
        "--grid",
        choices=["table", "default", "full"],
        default="default",
        help="configs to time beside the table's: none (table), the default sweep, or a larger one (full)",
    )
    parser.add_argument("--compile-workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--out", default=None, help="write every measurement here (JSON)")
    parser.add_argument("--tiny", action="store_true", help="a small shape on CPU under Triton's interpreter")
    return parser.parse_args()


# ---------------------------------------------------------------------------------- sweep grid


def sweep_configs(num_rows: int, grid: str) -> list[LaunchConfig]:
    """The grid for one row count: dot configs, and fma configs for up to 4 rows."""
    if grid == "table":
        return []
    full = grid == "full"
    block_ns = (16, 32, 64, 128) if full else (16, 32, 64)
    block_ks = (64, 128, 256, 512) if full else (128, 256, 512)
    warps = (2, 4, 8) if full else (4, 8)
    stages = (2, 3, 4, 5) if full else (3, 4)
    configs = [
        LaunchConfig(block_n=n, block_k=k, num_warps=w, num_stages=s)
        for n, k, w, s in itertools.product(block_ns, block_ks, warps, stages)
        if n * k <= 16384  # a 32 KB bf16 weight tile per stage at most
    ]
    if row_bucket(num_rows) <= 4:  # num_stages does not apply: the fma loads are not pipelined
        fma_ns = (2, 4, 8, 16, 32) if full else (4, 8, 16)
        fma_ks = (128, 256, 512, 1024, 2048) if full else (256, 512, 1024)
        configs += [
            LaunchConfig(block_n=n, block_k=k, num_warps=w, num_stages=1, use_dot=False)
            for n, k, w in itertools.product(fma_ns, fma_ks, (4, 8))
            if row_bucket(num_rows) * n * k <= MAX_FMA_REGISTERS * 32 * w
        ]
    return configs


def compile_key(in_features: int, num_rows: int, config: LaunchConfig) -> tuple:
    """What tells the compiled kernels apart (every Llama shape has N and K divisible by 16)."""
    return (in_features, block_rows(num_rows, config.use_dot), config)


# ---------------------------------------------------------------------------------- timing


def copy_bandwidth_gb_s(device: str, num_bytes: int) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    time_s = time_call_s(lambda: dst.copy_(src), device, calls=1)
    return 2 * num_bytes / time_s / 1e9


def time_call_s(call: Callable[[], object], device: str, calls: int) -> float:
    """Median seconds per call. CUDA: a graph of `calls` calls, replayed REPLAYS times; CPU: wall clock."""
    call()
    if device == "cpu":
        start = time.perf_counter()
        call()
        return time.perf_counter() - start
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    graph.replay()  # warm
    times_ms = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    del graph
    return statistics.median(times_ms) * 1e-3 / calls


class RotatingWeights:
    """Enough distinct copies of one weight that a cycle over them never hits L2."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, device: str, l2_bytes: int) -> None:
        self.bytes_per_copy = out_features * in_features * dtype.itemsize
        num_copies = max(2, math.ceil(ROTATION_L2_MULTIPLE * l2_bytes / self.bytes_per_copy))
        self.copies = [
            torch.empty(out_features, in_features, dtype=dtype, device=device).normal_(std=0.02)
            for _ in range(num_copies)
        ]
        # calls per graph: whole cycles, GRAPH_BYTES at least
        cycles = max(1, math.ceil(GRAPH_BYTES / (num_copies * self.bytes_per_copy)))
        self.calls = cycles * num_copies
        self._next = 0

    def next(self) -> torch.Tensor:
        weight = self.copies[self._next]
        self._next = (self._next + 1) % len(self.copies)
        return weight


def measure(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, weights: RotatingWeights
) -> float:
    """Seconds per call of fn(x, weight), weights cycling, on x's device."""
    device = x.device.type
    calls = weights.calls if device == "cuda" else 1
    return time_call_s(lambda: fn(x, weights.next()), device, calls)


# ---------------------------------------------------------------------------------- compile


def _compile_job(out_features: int, in_features: int, num_rows: int, dtype_name: str, configs: list[dict]) -> int:
    """Worker: run each config once on uninitialised tensors, which compiles it into the disk cache."""
    dtype = DTYPES[dtype_name]
    x = torch.empty(num_rows, in_features, dtype=dtype, device="cuda")
    weight = torch.empty(out_features, in_features, dtype=dtype, device="cuda")
    num_compiled = 0
    for config in configs:
        try:
            linear(x, weight, config=LaunchConfig(**config))
            num_compiled += 1
        except Exception:  # a launch shape this device cannot run: the sweep reports it
            pass
    torch.cuda.synchronize()
    return num_compiled


def precompile(jobs: dict[tuple, tuple[int, int, int]], dtype_name: str, num_workers: int) -> None:
    """jobs: compile key -> (N, K, rows) that builds it; split across workers per shape."""
    by_shape: dict[tuple[int, int, int], list[dict]] = {}
    for key, shape in jobs.items():
        by_shape.setdefault(shape, []).append(asdict(key[-1]))
    chunks = [(shape, configs[i : i + 8]) for shape, configs in by_shape.items() for i in range(0, len(configs), 8)]
    start = time.perf_counter()
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx) as pool:
        futures = [pool.submit(_compile_job, n, k, rows, dtype_name, configs) for (n, k, rows), configs in chunks]
        num_compiled = sum(f.result() for f in futures)
    elapsed_s = time.perf_counter() - start
    print(f"compiled {num_compiled} of {len(jobs)} kernels in {elapsed_s:.0f} s ({num_workers} workers)")


# ---------------------------------------------------------------------------------- sweep


def sweep_shape(
    name: str, out_features: int, in_features: int, rows: list[int], args: argparse.Namespace, env: dict
) -> list[dict]:
    dtype, device = DTYPES[args.dtype], env["device"]
    weights = RotatingWeights(out_features, in_features, dtype, device, env["l2_bytes"])
    bytes_read = weights.bytes_per_copy
    results = []
    for num_rows in rows:
        x = torch.randn(num_rows, in_features, device=device).to(dtype)
        reference = F.linear(x, weights.copies[0])
        cublas_s = measure(F.linear, x, weights)
        table = launch_config(num_rows)
        configs = [table] + [c for c in env["configs"][(name, num_rows)] if c != table]
        timings = []
        for config in configs:
            try:
                error = (linear(x, weights.copies[0], config=config).float() - reference.float()).abs().max().item()
                time_s = measure(lambda x, w, config=config: linear(x, w, config=config), x, weights)
            except Exception as exc:  # a launch shape this device cannot run
                print(f"# {name} rows {num_rows} {config}: {type(exc).__name__}: {str(exc)[:100]}")
                continue
            timings.append({"config": asdict(config), "us": time_s * 1e6, "max_abs_error": error})
        agreeing = [t for t in timings if t["max_abs_error"] <= env["error_limit"] * reference.abs().max().item()]
        for t in timings:
            if t not in agreeing:
                error = t["max_abs_error"]
                print(f"# {name} rows {num_rows} {t['config']}: disagrees with F.linear (max abs {error:.3g})")
        result = {
            "shape": name,
            "out_features": out_features,
            "in_features": in_features,
            "rows": num_rows,
            "weight_bytes": bytes_read,
            "cublas_us": cublas_s * 1e6,
            "table_us": timings[0]["us"] if timings and timings[0]["config"] == asdict(table) else None,
            "timings": timings,
            "best": min(agreeing, key=lambda t: t["us"]) if agreeing else None,
        }
        print_row(result, env["copy_gb_s"])
        results.append(result)
    del weights
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------------- report


def gb_s(num_bytes: int, us: float) -> float:
    return num_bytes / us / 1e3


def config_text(config: dict) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in config.items())
    return f"LaunchConfig({fields})"


def print_header(env: dict, dtype: str) -> None:
    print(f"device: {env['device_name']}  triton {env['triton']}  torch {torch.__version__}  {dtype}")
    print(f"copy bandwidth (read + write): {env['copy_gb_s']:.0f} GB/s; L2 {env['l2_bytes'] / 2**20:.0f} MiB")
    print(
        f"{'shape':>8} {'rows':>4} {'MB':>7} | {'cuBLAS us':>9} {'GB/s':>6} {'%copy':>5} | {'table us':>8} "
        f"{'%copy':>5} | {'best us':>8} {'GB/s':>6} {'%copy':>5} {'x cuBLAS':>8} {'max err':>8} | best config"
    )


def print_row(result: dict, copy_gb_s: float) -> None:
    num_bytes, cublas_us = result["weight_bytes"], result["cublas_us"]
    table_us, best = result["table_us"], result["best"]
    cublas_gb_s = gb_s(num_bytes, cublas_us)
    table = (
        f"{table_us:>8.1f} {100 * gb_s(num_bytes, table_us) / copy_gb_s:>5.1f}" if table_us else f"{'-':>8} {'-':>5}"
    )
    if best is None:
        best_text = "no config agreed with F.linear"
    else:
        best_gb_s = gb_s(num_bytes, best["us"])
        cfg = best["config"]
        best_text = (
            f"{best['us']:>8.1f} {best_gb_s:>6.0f} {100 * best_gb_s / copy_gb_s:>5.1f} "
            f"{cublas_us / best['us']:>8.2f} {best['max_abs_error']:>8.1e} | "
            f"{'dot' if cfg['use_dot'] else 'fma'} n{cfg['block_n']} k{cfg['block_k']} w{cfg['num_warps']} "
            f"s{cfg['num_stages']}"
        )
    print(
        f"{result['shape']:>8} {result['rows']:>4} {num_bytes / 1e6:>7.1f} | {cublas_us:>9.1f} "
        f"{cublas_gb_s:>6.0f} {100 * cublas_gb_s / copy_gb_s:>5.1f} | {table} | {best_text}"
    )


def best_bucket_configs(results: list[dict]) -> dict[int, tuple[dict, float, float]]:
    """Per row count: the one config with the least decoder-layer time over LAYER_SHAPES, that
    time, and the layer's time when every shape takes its own best config."""
    by_rows: dict[int, dict[str, dict]] = {}
    for result in results:
        if result["shape"] in LAYER_SHAPES and result["best"] is not None:
            by_rows.setdefault(result["rows"], {})[result["shape"]] = result
    chosen = {}
    for num_rows, shapes in sorted(by_rows.items()):
        if len(shapes) != len(LAYER_SHAPES):
            continue
        layer_us: dict[str, list[float]] = {}
        for result in shapes.values():
            for t in result["timings"]:
                layer_us.setdefault(json.dumps(t["config"]), []).append(t["us"])
        complete = {key: sum(times) for key, times in layer_us.items() if len(times) == len(LAYER_SHAPES)}
        if complete:
            key = min(complete, key=complete.__getitem__)
            chosen[num_rows] = (json.loads(key), complete[key], sum(s["best"]["us"] for s in shapes.values()))
    return chosen


def print_summary(results: list[dict], copy_gb_s: float) -> None:
    print("\n# decoder layer (qkv + o + gate_up + down) per row count: time and share of copy bandwidth")
    by_rows: dict[int, list[dict]] = {}
    for result in results:
        if result["shape"] in LAYER_SHAPES:
            by_rows.setdefault(result["rows"], []).append(result)
    for num_rows, shapes in sorted(by_rows.items()):
        if len(shapes) != len(LAYER_SHAPES) or any(s["best"] is None for s in shapes):
            continue
        num_bytes = sum(s["weight_bytes"] for s in shapes)
        for label, us in (
            ("cuBLAS", sum(s["cublas_us"] for s in shapes)),
            ("table", sum(s["table_us"] or math.nan for s in shapes)),
            ("best per shape", sum(s["best"]["us"] for s in shapes)),
        ):
            share = 100 * gb_s(num_bytes, us) / copy_gb_s
            print(f"#   rows {num_rows:>2} {label:>15}: {us:8.1f} us, {share:5.1f}% of copy")
    print("\n# best config per (shape, rows): paste into a shape table")
    for result in results:
        if result["best"] is not None:
            best = result["best"]
            print(
                f"({result['out_features']}, {result['in_features']}, {result['rows']}): "
                f"{config_text(best['config'])},  # {result['shape']}: {best['us']:.1f} us, "
                f"{100 * gb_s(result['weight_bytes'], best['us']) / copy_gb_s:.1f}% of copy, "
                f"{result['cublas_us'] / best['us']:.2f}x cuBLAS"
            )
    chosen = best_bucket_configs(results)
    if chosen:
        print("\n# ROW_BUCKET_CONFIGS: per row bucket the config of least decoder-layer time")
        for num_rows, (config, layer_us, best_us) in chosen.items():
            note = f"layer {layer_us:.1f} us; best per shape {best_us:.1f} us"
            print(f"{num_rows}: {config_text(config)},  # {note}")


# ---------------------------------------------------------------------------------- main


def environment(args: argparse.Namespace) -> dict:
    if args.tiny:
        return {
            "device": "cpu",
            "device_name": "cpu (Triton interpreter)",
            "l2_bytes": 1 << 16,
            "copy_gb_s": copy_bandwidth_gb_s("cpu", 1 << 24),
            "error_limit": 2.0**-6,
        }
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --tiny for the CPU interpreter)")
    props = torch.cuda.get_device_properties(0)
    return {
        "device": "cuda",
        "device_name": props.name,
        "l2_bytes": getattr(props, "L2_cache_size", 50 << 20),
        "copy_gb_s": copy_bandwidth_gb_s("cuda", COPY_BYTES),
        "error_limit": 2.0**-6,  # relative to max |F.linear|: a few bf16 units, far under a wrong index
    }


def main() -> None:
    args = parse_args()
    import triton

    shapes = TINY_SHAPES if args.tiny else {name: SHAPES[name] for name in args.shapes.split(",")}
    rows = [1, 3] if args.tiny else [int(r) for r in args.rows.split(",")]
    grid = args.grid
    env = environment(args)
    env["triton"] = triton.__version__
    env["configs"] = {(name, r): sweep_configs(r, grid) for name in shapes for r in rows}
    if args.tiny:
        env["configs"] = {key: configs[:: max(1, len(configs) // 3)] for key, configs in env["configs"].items()}
    else:
        jobs: dict[tuple, tuple[int, int, int]] = {}
        for (name, r), configs in env["configs"].items():
            n, k = shapes[name]
            for config in [launch_config(r), *configs]:
                jobs.setdefault(compile_key(k, r, config), (n, k, r))
        precompile(jobs, args.dtype, args.compile_workers)
    print_header(env, args.dtype)
    results = []
    for name, (out_features, in_features) in shapes.items():
        results += sweep_shape(name, out_features, in_features, rows, args, env)
    print_summary(results, env["copy_gb_s"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record = {k: v for k, v in env.items() if k != "configs"} | {"dtype": args.dtype, "results": results}
        Path(args.out).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
