"""Paged decode attention: achieved K/V read bandwidth against the device's own copy bandwidth.

Decode attention reads each sequence's K and V once and little else, so its speed is K/V bytes
read per second. The yardstick is a large device-to-device `dst.copy_(src)` timed in the same
run, counting bytes read plus written (what the memory system moved).

    kv_bytes_read = batch * context_tokens * num_kv_heads * head_dim * 2 (K and V) * dtype bytes

Timings are medians of `triton.testing.do_bench` (eager launches) and of
`triton.testing.do_bench_cudagraph` (graph replay, as decode runs in serving; back-to-back
replays do not flush L2, so a batch whose K/V fits in L2 reads partly from it). Defaults are
Llama-3.1-8B attention in bf16 with 16-token blocks. `--sweep` also times other launch shapes.

    python benchmarks/attention_decode.py [--batch-sizes 1,64,256] [--context-tokens 1024] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.testing

from services.engine.attention.triton_decode import DecodeTuning, paged_decode_attention

COPY_BYTES = 2 << 30  # 2 GiB source, far above L2
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,64,256")
    parser.add_argument("--context-tokens", type=int, default=1024)
    parser.add_argument("--num-q-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--sweep", action="store_true", help="also time other launch shapes")
    return parser.parse_args()


def build_batch(args: argparse.Namespace, batch_size: int) -> dict:
    """A full batch at one context length; blocks shuffled so each sequence's are scattered."""
    dtype, device = DTYPES[args.dtype], "cuda"
    blocks_per_seq = triton.cdiv(args.context_tokens, args.block_size)
    num_blocks = batch_size * blocks_per_seq
    cache_shape = (num_blocks, args.block_size, args.num_kv_heads, args.head_dim)
    block_tables = torch.randperm(num_blocks, device=device).view(batch_size, blocks_per_seq)
    q = torch.randn(batch_size, args.num_q_heads, args.head_dim, device=device, dtype=dtype)
    return dict(
        q=q,
        k_cache=torch.randn(cache_shape, device=device, dtype=dtype),
        v_cache=torch.randn(cache_shape, device=device, dtype=dtype),
        block_tables=block_tables.to(torch.int32),
        seq_lens=torch.full((batch_size,), args.context_tokens, dtype=torch.int32, device=device),
        scale=args.head_dim**-0.5,
        out=torch.empty_like(q),
        max_seq_len=args.context_tokens,
    )


def reference_output(batch: dict) -> torch.Tensor:  # [num_seqs, num_q_heads, head_dim] float32
    """Plain torch: gather each sequence's K/V through its block table, softmax in float32."""
    q, k_cache, v_cache = batch["q"], batch["k_cache"], batch["v_cache"]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group_size = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for seq_idx, seq_len in enumerate(batch["seq_lens"].tolist()):
        tokens = torch.arange(seq_len, device=q.device)
        blocks = batch["block_tables"][seq_idx, tokens // block_size].long()
        keys = k_cache[blocks, tokens % block_size].float().repeat_interleave(group_size, dim=1)
        values = v_cache[blocks, tokens % block_size].float().repeat_interleave(group_size, dim=1)
        scores = torch.einsum("hd,thd->ht", q[seq_idx].float(), keys) * batch["scale"]
        out[seq_idx] = torch.einsum("ht,thd->hd", scores.softmax(dim=-1), values)
    return out


def relative_error(batch: dict, tuning: DecodeTuning, ref: torch.Tensor) -> float:
    """Runs the kernel once on a NaN-poisoned `out` and compares it with the reference."""
    batch["out"].fill_(float("nan"))
    paged_decode_attention(**batch, tuning=tuning)
    return ((batch["out"].float() - ref).norm() / ref.norm()).item()


def copy_bandwidth_gb_s() -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    time_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * COPY_BYTES / (time_ms * 1e-3) / 1e9


def kv_bytes_read(batch: dict) -> int:
    _, _, num_kv_heads, head_dim = batch["k_cache"].shape
    tokens = batch["q"].shape[0] * batch["max_seq_len"]
    return 2 * tokens * num_kv_heads * head_dim * batch["k_cache"].element_size()


def time_kernel_us(batch: dict, tuning: DecodeTuning) -> tuple[float, float]:
    """(eager median, graph-replay median) in microseconds."""

    def call() -> None:
        paged_decode_attention(**batch, tuning=tuning)

    eager_ms = triton.testing.do_bench(call, warmup=10, rep=50, return_mode="median")
    graph_ms = triton.testing.do_bench_cudagraph(call, return_mode="median")
    return eager_ms * 1e3, graph_ms * 1e3


def sweep_tunings() -> list[DecodeTuning]:
    shapes = itertools.product((128, 256, 512), (32, 64, 128), (4, 8), (2, 3))
    return [
        DecodeTuning(partition_size=partition, tile_tokens=tile, num_warps=warps, num_stages=stages)
        for partition, tile, warps, stages in shapes
        if tile <= partition
    ]


def print_row(
    batch_size: int,
    tuning: DecodeTuning,
    bytes_read: int,
    rel_err: float,
    times_us: tuple[float, float],
    copy_gb_s: float,
) -> None:
    eager_us, graph_us = times_us
    eager_gb_s, graph_gb_s = bytes_read / eager_us / 1e3, bytes_read / graph_us / 1e3
    print(
        f"{batch_size:>5} {tuning.partition_size:>5} {tuning.tile_tokens:>4} "
        f"{tuning.num_warps:>5} {tuning.num_stages:>6} {bytes_read / 1e6:>8.1f} {rel_err:>7.1e} "
        f"{eager_us:>9.1f} {eager_gb_s:>6.0f} {100 * eager_gb_s / copy_gb_s:>5.1f} "
        f"{graph_us:>9.1f} {graph_gb_s:>6.0f} {100 * graph_gb_s / copy_gb_s:>5.1f}"
    )


def main() -> None:
    args = parse_args()
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    copy_gb_s = copy_bandwidth_gb_s()
    print(f"device: {torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}")
    print(f"copy bandwidth (read + write): {copy_gb_s:.0f} GB/s")
    print(
        f"shapes: q heads {args.num_q_heads}, kv heads {args.num_kv_heads}, head_dim "
        f"{args.head_dim}, block {args.block_size}, {args.dtype}, context "
        f"{args.context_tokens} tokens"
    )
    print(
        f"{'batch':>5} {'part':>5} {'tile':>4} {'warps':>5} {'stages':>6} {'KV MB':>8} "
        f"{'rel err':>7} {'eager us':>9} {'GB/s':>6} {'%copy':>5} {'graph us':>9} {'GB/s':>6} "
        f"{'%copy':>5}"
    )
    tunings = [DecodeTuning()] + (sweep_tunings() if args.sweep else [])
    num_disagreeing = 0
    for batch_size in batch_sizes:
        batch = build_batch(args, batch_size)
        ref = reference_output(batch)
        for tuning in tunings:
            try:
                rel_err = relative_error(batch, tuning, ref)
                times_us = time_kernel_us(batch, tuning)
            except Exception as error:  # a launch shape may not fit this device
                print(f"# {tuning}: {type(error).__name__}: {str(error)[:120]}")
                continue
            if not rel_err < 1e-2:
                num_disagreeing += 1
                print(f"# {tuning}: disagrees with the reference (relative error {rel_err:.1e})")
            print_row(batch_size, tuning, kv_bytes_read(batch), rel_err, times_us, copy_gb_s)
        del batch, ref
        torch.cuda.empty_cache()
    if num_disagreeing:
        raise SystemExit(f"{num_disagreeing} runs disagreed with the reference")


if __name__ == "__main__":
    main()
