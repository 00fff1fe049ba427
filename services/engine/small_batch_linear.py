"""Skinny matrix products for decode: out = x @ weight.T (+ bias) for a few rows, one Triton kernel.

At decode batch 1..16 a projection is a matrix-vector product bound by reading the weight once.
This kernel streams the weight once, in 16-byte loads along K, with every row of x beside it; on an
H100 cuBLAS takes 8% longer than it at 1 row and 2 to 5% longer at 2 to 16 rows (the table below).

Algorithm: a tiled matrix-vector product. Program n owns output columns [n * BLOCK_N, (n + 1) *
BLOCK_N) of every row and walks all of K in BLOCK_K tiles:

    weight [N, K]          k:  0        BLOCK_K      2 BLOCK_K            K
    rows n*BN .. n*BN+BN-1     | tile 0   | tile 1     | ...   | last (masked) |
                               contiguous along K: each weight element loaded once, 16 B a load
    x [M, K]                   the same K tiles, all M rows (from L2: x is tiny)

then adds the bias in float32, rounds once to x's dtype and writes out[:, cols]. The last column
block reads weight row N-1 again instead of masking, so its loads stay unpredicated.

Two ways to multiply a tile, a compile-time choice of the launch config (`use_dot`):
    fma   rows padded to the next power of two (BLOCK_M); acc[BLOCK_M, BLOCK_N, BLOCK_K] += x * w
          elementwise in float32, summed over K once after the loop (no reduction in the loop).
          Registers grow with BLOCK_M * BLOCK_N * BLOCK_K: the variant for 1 and 2 rows.
    dot   rows padded to DOT_MIN_ROWS (16, tl.dot's smallest side; padded rows are masked, never
          read); acc[16, BLOCK_N] += x[16, BLOCK_K] @ w[BLOCK_K, BLOCK_N] on the tensor cores with
          float32 accumulation (IEEE float32 for float32 inputs, never tf32); its loads are
          software-pipelined through shared memory, num_stages deep. The variant for 3 to 16 rows.

Not split-K: splitting K into 2 or 4 programs per column block (float32 partials, then a reduction
kernel) was built and measured on an H100 and lost 1 to 6 us on every Llama-3.1-8B shape, even
o_proj's 4096 columns; whole-K programs of 8 or 32 columns give enough programs.

Numerics: float32 accumulation, then one rounding to x's dtype (after adding the bias in float32),
as cuBLAS does; only the summation order differs, so a 16-bit output may land one unit in the last
place away from F.linear's, and float32 outputs agree to float32 rounding.

Launch configs: ROW_BUCKET_CONFIGS holds one `LaunchConfig` per row bucket (rows rounded up to 1,
2, 4, 8, 16); `launch_config(num_rows)` looks it up. The configs come from
benchmarks/small_batch_linear.py on an H100 (bf16, Llama-3.1-8B shapes: qkv 6144 x 4096, o 4096 x
4096, gate_up 28672 x 4096, down 4096 x 14336, logits 128256 x 4096); each bucket's config gives
the least decoder-layer time of any single config (a config per shape would gain 0.3 to 0.9% at 1
and 2 rows, 2.3 to 3.2% at 4 to 16). A decoder layer (qkv + o + gate_up + down) took, cuBLAS -> this
kernel:

    rows 1: 159.6 -> 147.8 us    rows 2: 159.0 -> 152.1 us    rows 4: 161.4 -> 156.8 us
    rows 8: 160.7 -> 157.2 us    rows 16: 162.9 -> 159.3 us   (logits at 1 row: 353.5 -> 329.3 us)

Module constants:
    MAX_ROWS = 16             most rows the kernel takes; callers use F.linear above (`supports`)
    DOT_MIN_ROWS = 16         rows of the dot variant's tile
    ROW_BUCKET_CONFIGS        the table: fma, 8 columns x 512 K, 4 warps for 1-2 rows; dot, 32 x
                              512, 4 warps, 3 stages for 3-16 rows

Configs are chosen from the row count alone, never by autotuning at run time (server start stays
fast). K is a compile-time constant (one compilation per distinct K, about three per model), so the
K loop has a fixed trip count. CUDA graphs: no host reads of device values, the grid from shapes
only, the output from torch.empty (a graph capture serves it from its pool).

Triton is optional: the module imports without it, `supports` then says False and `linear` raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # a torch-only install: callers keep F.linear
    triton = None

MAX_ROWS = 16
DOT_MIN_ROWS = 16

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LaunchConfig:
    """One launch shape of the kernel: tile sizes, warps, pipelining depth, variant."""

    block_n: int  # output columns (weight rows) per program
    block_k: int  # K elements per loop iteration
    num_warps: int
    num_stages: int  # shared-memory pipelining depth of the dot variant's loads
    use_dot: bool = True  # tl.dot on rows padded to 16, else elementwise fma and one sum at the end


_FEW_ROWS = LaunchConfig(block_n=8, block_k=512, num_warps=4, num_stages=1, use_dot=False)
_MORE_ROWS = LaunchConfig(block_n=32, block_k=512, num_warps=4, num_stages=3, use_dot=True)
# row bucket (rows rounded up to a power of two) -> launch config; measured on an H100, see above
ROW_BUCKET_CONFIGS: dict[int, LaunchConfig] = {1: _FEW_ROWS, 2: _FEW_ROWS, 4: _MORE_ROWS, 8: _MORE_ROWS, 16: _MORE_ROWS}


def launch_config(num_rows: int) -> LaunchConfig:
    """The table's config for this many rows (1 to MAX_ROWS)."""
    return ROW_BUCKET_CONFIGS[row_bucket(num_rows)]


def row_bucket(num_rows: int) -> int:
    """The power of two at or above num_rows (1 for 0)."""
    return 1 << max(0, num_rows - 1).bit_length()


def supports(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    """Whether `linear` takes these inputs on the GPU; callers use F.linear otherwise. Metadata only."""
    return triton is not None and x.is_cuda and input_error(x, weight, bias) is None


def input_error(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> str | None:
    """Why `linear` refuses these inputs on any device, or None when it takes them."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return f"x {tuple(x.shape)} and weight {tuple(weight.shape)} are not [M, K] and [N, K]"
    if x.shape[1] == 0 or weight.shape[0] == 0:
        return f"weight {tuple(weight.shape)} is empty"
    if not 1 <= x.shape[0] <= MAX_ROWS:
        return f"{x.shape[0]} rows: the kernel takes 1 to MAX_ROWS = {MAX_ROWS}"
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return f"dtypes must match and be float32, bfloat16 or float16 (x {x.dtype}, weight {weight.dtype})"
    if bias is not None and bias.shape != (weight.shape[0],):
        return f"bias {tuple(bias.shape)} does not match {weight.shape[0]} output features"
    if x.stride(1) != 1 or weight.stride(1) != 1 or (bias is not None and bias.stride(0) != 1):
        return "x, weight and bias need a unit stride in their last dimension"
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        return "x, weight and bias must be on one device"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return "the kernel has no backward: inputs that require grad need F.linear"
    return None


# ---------------------------------------------------------------------------------- kernels

_jit = triton.jit if triton is not None else (lambda fn: fn)
# the main kernel: one compilation for every row count (Triton would compile M = 1 apart otherwise)
_jit_any_rows = triton.jit(do_not_specialize=["num_rows"]) if triton is not None else (lambda fn: fn)


@_jit
def _dot_sum(
    x_ptr,
    weight_ptr,
    rows,
    weight_rows,
    num_rows,
    stride_x,
    stride_weight,
    IN_FEATURES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
):
    """sum over k of x[rows, k] * weight[weight_rows, k] on the tensor cores -> [BLOCK_M, BLOCK_N] float32."""
    lanes = tl.arange(0, BLOCK_K)
    row_mask = (rows < num_rows)[:, None]
    x_ptrs = x_ptr + rows[:, None] * stride_x + lanes[None, :]  # [BLOCK_M, BLOCK_K]
    weight_ptrs = weight_ptr + weight_rows[None, :] * stride_weight + lanes[:, None]  # [BLOCK_K, BLOCK_N]: w.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, IN_FEATURES, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_mask, other=0.0)
            w = tl.load(weight_ptrs)
        else:
            k_mask = (k + lanes) < IN_FEATURES
            x = tl.load(x_ptrs, mask=row_mask & k_mask[None, :], other=0.0)
            w = tl.load(weight_ptrs, mask=k_mask[:, None], other=0.0)
        if DOT_IN_FLOAT32:  # IEEE float32 products and sums, never tf32
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:  # 16-bit operands, float32 accumulation
            acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        weight_ptrs += BLOCK_K
    return acc


@_jit
def _fma_sum(
    x_ptr,
    weight_ptr,
    rows,
    weight_rows,
    num_rows,
    stride_x,
    stride_weight,
    IN_FEATURES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """As `_dot_sum`, elementwise: products kept per k lane, summed over K once at the end."""
    lanes = tl.arange(0, BLOCK_K)
    row_mask = (rows < num_rows)[:, None, None]
    x_ptrs = x_ptr + rows[:, None, None] * stride_x + lanes[None, None, :]  # [BLOCK_M, 1, BLOCK_K]
    # [1, BLOCK_N, BLOCK_K]
    weight_ptrs = weight_ptr + weight_rows[None, :, None] * stride_weight + lanes[None, None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, IN_FEATURES, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=row_mask, other=0.0)
            w = tl.load(weight_ptrs)
        else:
            k_mask = ((k + lanes) < IN_FEATURES)[None, None, :]
            x = tl.load(x_ptrs, mask=row_mask & k_mask, other=0.0)
            w = tl.load(weight_ptrs, mask=k_mask, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)
        x_ptrs += BLOCK_K
        weight_ptrs += BLOCK_K
    return tl.sum(acc, axis=2)


@_jit_any_rows
def _skinny_linear_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    num_rows,
    out_features,
    stride_x,
    stride_weight,
    stride_out,
    IN_FEATURES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
):
    """Program n: out[:M, n * BLOCK_N : (n + 1) * BLOCK_N] over all of K, bias added, rounded once."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # the last column block reads weight row N-1 again rather than masking: its loads stay wide
    weight_rows = tl.minimum(cols, out_features - 1).to(tl.int64)
    if USE_DOT:
        acc = _dot_sum(
            x_ptr,
            weight_ptr,
            rows,
            weight_rows,
            num_rows,
            stride_x,
            stride_weight,
            IN_FEATURES,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            EVEN_K,
            DOT_IN_FLOAT32,
        )
    else:
        acc = _fma_sum(
            x_ptr,
            weight_ptr,
            rows,
            weight_rows,
            num_rows,
            stride_x,
            stride_weight,
            IN_FEATURES,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            EVEN_K,
        )
    col_mask = cols < out_features
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < num_rows)[:, None] & col_mask[None, :])


# ---------------------------------------------------------------------------------- launch


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, config: LaunchConfig | None = None) -> Tensor:
    """x: [M, K], weight: [N, K], bias: [N] or None -> x @ weight.T + bias, [M, N] in x's dtype.

    `config` overrides the table (benchmarks). Inputs must pass `supports`, except that a CPU
    tensor is taken too (Triton's interpreter, in tests).
    """
    if triton is None:
        raise RuntimeError("small_batch_linear.linear needs the triton package, which is not installed")
    error = input_error(x, weight, bias)
    if error is not None:
        raise ValueError(f"small_batch_linear.linear: {error}")
    num_rows, in_features = x.shape
    out_features = weight.shape[0]
    out = torch.empty(num_rows, out_features, dtype=x.dtype, device=x.device)
    config = config or launch_config(num_rows)
    # tiles no wider than the padded matrix (small models), never under tl.dot's 16
    block_n = min(config.block_n, max(16, triton.next_power_of_2(out_features)))
    block_k = min(config.block_k, max(16, triton.next_power_of_2(in_features)))
    _skinny_linear_kernel[(triton.cdiv(out_features, block_n),)](
        x,
        weight,
        weight if bias is None else bias,  # unread without HAS_BIAS
        out,
        num_rows,
        out_features,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        IN_FEATURES=in_features,
        BLOCK_M=block_rows(num_rows, config.use_dot),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        USE_DOT=config.use_dot,
        EVEN_K=in_features % block_k == 0,
        HAS_BIAS=bias is not None,
        # Triton's interpreter multiplies bfloat16 dot operands as integers: on the CPU (tests) they go
        # in as float32, which gives the same exact products and float32 sums
        DOT_IN_FLOAT32=x.dtype == torch.float32 or not x.is_cuda,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def block_rows(num_rows: int, use_dot: bool) -> int:
    """Rows of a program's tile: a power of two, at least DOT_MIN_ROWS for tl.dot."""
    return max(DOT_MIN_ROWS, row_bucket(num_rows)) if use_dot else row_bucket(num_rows)


__all__ = ["MAX_ROWS", "ROW_BUCKET_CONFIGS", "LaunchConfig", "input_error", "launch_config", "linear", "supports"]
