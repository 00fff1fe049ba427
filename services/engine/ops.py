"""Fused elementwise ops and the projections of the decoder: a plain-torch reference and Triton
kernels, one interface.

The ops, with the kernels that replace each torch composition:

    add_rms_norm    residual add + RMSNorm              one kernel, both outputs
    rms_norm_heads  RMSNorm over head_dim (Qwen3 q/k)   one kernel
    rotary          rotate-half rotary on q and k       one kernel for q and k together, in place
    silu_and_mul    silu(gate) * up                     one kernel
    linear          x @ weight.T + bias                 F.linear; at most 16 rows on CUDA, the skinny
                                                        kernel of services.engine.small_batch_linear

Why fused: at decode batch 1 the layer's matrix products are short and the step is bound by kernel
launches. In plain torch RMSNorm is about 8 kernels and rotary about 16 (indexing the tables, two
halves, a concatenation, products and sums, for q and k); one launch each removes most of a
layer's tiny kernels, and reads every tensor once instead of once per op.

Numerics contract (what makes the fast path interchangeable with the reference). `TORCH_OPS`
reproduces `models.llama` exactly; `TRITON_OPS` computes in float32 registers and rounds to the
input dtype at every point where torch's composition materialises a tensor in that dtype:

    new_residual = x + residual                      one rounding to the dtype (exact for float32)
    normed       = weight * to_dtype(x32 * rsqrt(mean(x32²) + eps))
                   variance and rsqrt in float32; the product with the weight rounded to the dtype
    rotary       = to_dtype(to_dtype(x * cos) + to_dtype(rotate_half(x) * sin))
    silu_and_mul = to_dtype(to_dtype(silu(gate)) * up), silu in float32

A product or sum of two values of a 16-bit dtype, computed in float32 and rounded once, equals the
dtype's own correctly rounded operation, so these steps match torch bit for bit. What may differ is
the order of the variance sum and the last bits of rsqrt, exp and division (approximate on the
GPU): a few float32 units in the last place before rounding, hence at most one unit of a 16-bit
dtype, and rarely. Rotary and the residual sum are exact in every dtype: the rotary kernel is
compiled without fused multiply-add so float32 products are rounded before the sum, as in torch.

Layout: inputs need a unit stride in their last dimension and are otherwise addressed through their
strides, so q and k may be the views that `qkv.split(...)` then `.view(T, H, D)` gives, with no copy.
A tensor without a unit last stride is made contiguous first. `rotary` writes into q and k and
returns them; every other op returns new tensors (`add_rms_norm` returns `x` itself as the
residual when there is none to add).

CUDA graphs: the kernels never read device values on the host and size every grid and output from
shapes alone, so a call can be captured and replayed.

Launch shapes (module constants):
    MAX_NORM_HIDDEN = 16384    largest row `add_rms_norm` holds in registers (one program a row)
    HEAD_TILE_ELEMENTS = 1024  heads per program in `rotary` / `rms_norm_heads`: this many
                               elements / padded head_dim (8 heads of 128)
    SILU_BLOCK_COLS = 1024     output columns per `silu_and_mul` program
    NUM_WARPS = 4              warps of the head and silu programs; an `add_rms_norm` program
                               gets padded hidden / 512 warps, from 4 to 16 (8 for hidden 4096)

`linear` is F.linear itself in `TORCH_OPS`. `TRITON_OPS` sends what `small_batch_linear.supports`
takes (CUDA, 1..16 rows: decode) to that module's kernel, which streams the weight once (on an H100,
a Llama-3.1-8B layer's four projections take 8% less time than cuBLAS at 1 row, 2 to 4% less at 2 to
16); float32 accumulation and one rounding, as cuBLAS, so results differ from it only in the
summation order. Everything else goes to F.linear.
`get_ops("triton_torch_linear")` is `TRITON_OPS` with every product through F.linear (the engine's
`small_batch_linear="torch"`), so the two can be compared in one process.

Triton is optional: without it `TORCH_OPS` still works and `get_ops("triton")` raises.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from services.engine import small_batch_linear

try:
    import triton
    import triton.language as tl
except ImportError:  # a torch-only install keeps the reference ops
    triton = None

MAX_NORM_HIDDEN = 16384
HEAD_TILE_ELEMENTS = 1024
SILU_BLOCK_COLS = 1024
NUM_WARPS = 4

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Ops(Protocol):
    """Elementwise ops of the decoder. Inputs are never mutated, except q and k by `rotary`."""

    def add_rms_norm(self, x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """x, residual: [num_tokens, hidden] -> (normed, new_residual), both [num_tokens, hidden].

        new_residual = x + residual in x's dtype (x itself when residual is None); normed is
        llama.RMSNorm of new_residual: float32 variance and rsqrt, cast to the dtype, then
        `weight * that` in the dtype.
        """
        ...

    def rms_norm_heads(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """x: [num_tokens, heads, head_dim], weight: [head_dim] -> RMSNorm over head_dim, like x."""
        ...

    def rotary(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D]; cos, sin: [max_pos, D] in the dtype; positions: [T] int64.

        Returns x * cos[p] + rotate_half(x) * sin[p] for q and k, each product and the sum
        rounded to the dtype. May write into q and k.
        """
        ...

    def silu_and_mul(self, gate_up: Tensor) -> Tensor:
        """gate_up: [T, 2 * I] (gate then up) -> silu(gate) * up, [T, I], rounded like torch."""
        ...

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """x: [T, K], weight: [N, K] (nn.Linear's layout), bias: [N] or None -> [T, N], as F.linear."""
        ...


# ---------------------------------------------------------------------------------- reference


def _torch_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """llama.RMSNorm over the last dimension."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _torch_rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [T, H, D]; cos, sin: [T, 1, D] -> llama.RotaryEmbedding.apply."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class TorchOps:
    """The plain-torch compositions of `models.llama`, op for op; any device, any dtype."""

    def add_rms_norm(self, x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        new_residual = x if residual is None else x + residual
        return _torch_rms_norm(new_residual, weight, eps), new_residual

    def rms_norm_heads(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return _torch_rms_norm(x, weight, eps)

    def rotary(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        cos_rows = cos[positions].unsqueeze(1)  # [T, 1, D]
        sin_rows = sin[positions].unsqueeze(1)
        return _torch_rotate(q, cos_rows, sin_rows), _torch_rotate(k, cos_rows, sin_rows)

    def silu_and_mul(self, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    linear = staticmethod(F.linear)  # nn.Linear's own call, so the reference stays bit for bit


# ---------------------------------------------------------------------------------- kernels

_jit = triton.jit if triton is not None else (lambda fn: fn)


@_jit
def _round_like(x, like_ptr):
    """Round float32 `x` to the element type of `like_ptr` and widen it back: one torch op's rounding."""
    return x.to(like_ptr.dtype.element_ty).to(tl.float32)


@_jit
def _rms_norm_rows(rows, weight, eps, num_cols, like_ptr):
    """rows: [R, C] float32, zero past num_cols; weight: [C] float32 -> weight * normed rows.

    The normed rows are rounded to like_ptr's dtype before the weight product, as llama.RMSNorm
    does; the returned product is float32 for the caller to round on store.
    """
    variance = tl.sum(rows * rows, axis=1) / num_cols  # [R]
    rstd = tl.math.rsqrt(variance + eps)
    normed = _round_like(rows * rstd[:, None], like_ptr)
    return weight[None, :] * normed


@_jit
def _add_rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    normed_ptr,
    new_residual_ptr,
    stride_x,
    stride_residual,
    stride_normed,
    stride_new_residual,
    hidden_size,
    eps,
    BLOCK_COLS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    """One program per token: its whole row [1, BLOCK_COLS] is held in registers.

    Writes new_residual = x + residual (only when HAS_RESIDUAL) and normed = RMSNorm(new_residual).
    """
    token = tl.program_id(0).to(tl.int64)
    weight_cols = tl.arange(0, BLOCK_COLS)
    weight_mask = weight_cols < hidden_size
    cols, mask = weight_cols[None, :], weight_mask[None, :]  # the row as a [1, BLOCK_COLS] tile
    row = tl.load(x_ptr + token * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + token * stride_residual + cols, mask=mask, other=0.0)
        row = _round_like(row + residual.to(tl.float32), x_ptr)
        tl.store(
            new_residual_ptr + token * stride_new_residual + cols, row.to(new_residual_ptr.dtype.element_ty), mask=mask
        )
    weight = tl.load(weight_ptr + weight_cols, mask=weight_mask, other=0.0)
    normed = _rms_norm_rows(row, weight.to(tl.float32), eps, hidden_size, x_ptr)
    tl.store(normed_ptr + token * stride_normed + cols, normed.to(normed_ptr.dtype.element_ty), mask=mask)


@_jit
def _rms_norm_heads_kernel(
    x_ptr,
    weight_ptr,
    out_ptr,
    stride_x_token,
    stride_x_head,
    stride_out_token,
    stride_out_head,
    num_heads,
    head_dim,
    eps,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
):
    """One program per (token, group of BLOCK_HEADS heads): a [BLOCK_HEADS, HEAD_DIM_PADDED] tile."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = dims < head_dim
    mask = (heads < num_heads)[:, None] & dim_mask[None, :]
    x_offsets = token * stride_x_token + heads[:, None] * stride_x_head + dims[None, :]
    rows = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + dims, mask=dim_mask, other=0.0).to(tl.float32)
    normed = _rms_norm_rows(rows, weight, eps, head_dim, x_ptr)
    out_offsets = token * stride_out_token + heads[:, None] * stride_out_head + dims[None, :]
    tl.store(out_ptr + out_offsets, normed.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _rotate_heads(
    token_ptr,
    stride_head,
    first_head,
    num_heads,
    cos_lo,
    cos_hi,
    sin_lo,
    sin_hi,
    HALF_DIM: tl.constexpr,
    HALF_DIM_PADDED: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
):
    """Rotate heads [first_head, first_head + BLOCK_HEADS) of one token in place.

    Each head row is two halves, lo = x[:D/2] and hi = x[D/2:]; rotate_half(x) = [-hi, lo], so

        out_lo = lo * cos_lo - hi * sin_lo        out_hi = hi * cos_hi + lo * sin_hi

    cos_*, sin_*: [1, HALF_DIM_PADDED] float32. Both halves are loaded before either is stored.
    """
    heads = first_head + tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, HALF_DIM_PADDED)
    mask = (heads < num_heads)[:, None] & (dims < HALF_DIM)[None, :]
    lo_ptrs = token_ptr + heads[:, None] * stride_head + dims[None, :]
    hi_ptrs = lo_ptrs + HALF_DIM
    lo = tl.load(lo_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_HEADS, HALF_DIM_PADDED]
    hi = tl.load(hi_ptrs, mask=mask, other=0.0).to(tl.float32)
    out_lo = _round_like(lo * cos_lo, token_ptr) - _round_like(hi * sin_lo, token_ptr)
    out_hi = _round_like(hi * cos_hi, token_ptr) + _round_like(lo * sin_hi, token_ptr)
    tl.store(lo_ptrs, out_lo.to(token_ptr.dtype.element_ty), mask=mask)
    tl.store(hi_ptrs, out_hi.to(token_ptr.dtype.element_ty), mask=mask)


@_jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_cos,
    stride_sin,
    num_q_heads,
    num_k_heads,
    num_q_blocks,
    HALF_DIM: tl.constexpr,
    HALF_DIM_PADDED: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
):
    """One program per (token, group of BLOCK_HEADS heads); the head groups of q come first:

    program_id(1):  | q heads 0..BH-1 | ... | q group num_q_blocks-1 | k heads 0..BH-1 | ... |
    """
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    position = tl.load(positions_ptr + token)
    dims = tl.arange(0, HALF_DIM_PADDED)
    dim_mask = dims < HALF_DIM
    cos_row = cos_ptr + position * stride_cos + dims
    sin_row = sin_ptr + position * stride_sin + dims
    cos_lo = tl.load(cos_row, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    cos_hi = tl.load(cos_row + HALF_DIM, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    sin_lo = tl.load(sin_row, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    sin_hi = tl.load(sin_row + HALF_DIM, mask=dim_mask, other=0.0).to(tl.float32)[None, :]
    if head_block < num_q_blocks:
        _rotate_heads(
            q_ptr + token * stride_q_token,
            stride_q_head,
            head_block * BLOCK_HEADS,
            num_q_heads,
            cos_lo,
            cos_hi,
            sin_lo,
            sin_hi,
            HALF_DIM,
            HALF_DIM_PADDED,
            BLOCK_HEADS,
        )
    else:
        _rotate_heads(
            k_ptr + token * stride_k_token,
            stride_k_head,
            (head_block - num_q_blocks) * BLOCK_HEADS,
            num_k_heads,
            cos_lo,
            cos_hi,
            sin_lo,
            sin_hi,
            HALF_DIM,
            HALF_DIM_PADDED,
            BLOCK_HEADS,
        )


@_jit
def _silu_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    stride_gate_up,
    stride_out,
    intermediate_size,
    BLOCK_COLS: tl.constexpr,
):
    """One program per (token, block of BLOCK_COLS output columns):

    gate_up row: | gate [0, I) | up [I, 2I) |   ->   out row: [0, I)
    """
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = cols < intermediate_size
    gate_ptrs = gate_up_ptr + token * stride_gate_up + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + intermediate_size, mask=mask, other=0.0).to(tl.float32)
    silu = _round_like(tl.math.div_rn(gate, 1.0 + tl.exp(-gate)), gate_up_ptr)
    tl.store(out_ptr + token * stride_out + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------- fast path


class TritonOps:
    """The kernels above, one launch per call; checks read metadata only, never device values.

    small_batch_linear: `linear` of few rows through the skinny kernel (True) or always F.linear.
    """

    def __init__(self, small_batch_linear: bool = True) -> None:
        self.small_batch_linear = small_batch_linear

    def add_rms_norm(self, x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        x, weight = _unit_last_stride(x), _unit_last_stride(weight)
        num_tokens, hidden_size = x.shape
        _check_dtypes("add_rms_norm", x, weight, residual)
        if residual is not None:
            residual = _unit_last_stride(residual)
            if residual.shape != x.shape:
                raise ValueError(f"residual shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
        if weight.shape != (hidden_size,):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden {hidden_size}")
        if hidden_size > MAX_NORM_HIDDEN:
            raise ValueError(f"hidden size {hidden_size} exceeds {MAX_NORM_HIDDEN}")
        normed = torch.empty_like(x, memory_format=torch.contiguous_format)
        new_residual = x if residual is None else torch.empty_like(normed)
        if num_tokens == 0:
            return normed, new_residual
        block_cols = triton.next_power_of_2(hidden_size)
        residual_arg = x if residual is None else residual  # unread when HAS_RESIDUAL is False
        _add_rms_norm_kernel[(num_tokens,)](
            x,
            residual_arg,
            weight,
            normed,
            new_residual,
            x.stride(0),
            residual_arg.stride(0),
            normed.stride(0),
            new_residual.stride(0),
            hidden_size,
            eps,
            BLOCK_COLS=block_cols,
            HAS_RESIDUAL=residual is not None,
            num_warps=min(16, max(NUM_WARPS, block_cols // 512)),
        )
        return normed, new_residual

    def rms_norm_heads(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x, weight = _unit_last_stride(x), _unit_last_stride(weight)
        num_tokens, num_heads, head_dim = x.shape
        _check_dtypes("rms_norm_heads", x, weight)
        if weight.shape != (head_dim,):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match head_dim {head_dim}")
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        if num_tokens == 0:
            return out
        head_dim_padded = triton.next_power_of_2(head_dim)
        block_heads = _heads_per_program(num_heads, head_dim_padded)
        _rms_norm_heads_kernel[(num_tokens, triton.cdiv(num_heads, block_heads))](
            x,
            weight,
            out,
            x.stride(0),
            x.stride(1),
            out.stride(0),
            out.stride(1),
            num_heads,
            head_dim,
            eps,
            HEAD_DIM_PADDED=head_dim_padded,
            BLOCK_HEADS=block_heads,
            num_warps=NUM_WARPS,
        )
        return out

    def rotary(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        q, k = _unit_last_stride(q), _unit_last_stride(k)
        cos, sin = _unit_last_stride(cos), _unit_last_stride(sin)
        positions = _unit_last_stride(positions)
        num_tokens, num_q_heads, head_dim = q.shape
        num_k_heads = k.shape[1]
        _check_rotary_inputs(q, k, cos, sin, positions)
        if num_tokens == 0:
            return q, k
        half_dim = head_dim // 2
        block_heads = _heads_per_program(max(num_q_heads, num_k_heads), 2 * triton.next_power_of_2(half_dim))
        num_q_blocks = triton.cdiv(num_q_heads, block_heads)
        num_blocks = num_q_blocks + triton.cdiv(num_k_heads, block_heads)
        _rotary_kernel[(num_tokens, num_blocks)](
            q,
            k,
            cos,
            sin,
            positions,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            sin.stride(0),
            num_q_heads,
            num_k_heads,
            num_q_blocks,
            HALF_DIM=half_dim,
            HALF_DIM_PADDED=triton.next_power_of_2(half_dim),
            BLOCK_HEADS=block_heads,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,  # float32: round x*cos and x*sin before the sum, as torch does
        )
        return q, k

    def silu_and_mul(self, gate_up: Tensor) -> Tensor:
        gate_up = _unit_last_stride(gate_up)
        num_tokens, width = gate_up.shape
        _check_dtypes("silu_and_mul", gate_up)
        if width % 2:
            raise ValueError(f"gate_up width {width} is odd; expected gate then up of equal size")
        intermediate_size = width // 2
        out = torch.empty(num_tokens, intermediate_size, dtype=gate_up.dtype, device=gate_up.device)
        if num_tokens == 0:
            return out
        grid = (num_tokens, triton.cdiv(intermediate_size, SILU_BLOCK_COLS))
        _silu_and_mul_kernel[grid](
            gate_up,
            out,
            gate_up.stride(0),
            out.stride(0),
            intermediate_size,
            BLOCK_COLS=SILU_BLOCK_COLS,
            num_warps=NUM_WARPS,
        )
        return out

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.small_batch_linear and small_batch_linear.supports(x, weight, bias):
            return small_batch_linear.linear(x, weight, bias)
        return F.linear(x, weight, bias)


def _unit_last_stride(x: Tensor) -> Tensor:
    """x itself when its last dimension is unit-stride (the kernels take the other strides)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _heads_per_program(num_heads: int, head_dim_padded: int) -> int:
    """A power of two: about HEAD_TILE_ELEMENTS elements a program, no more heads than exist."""
    return max(1, min(HEAD_TILE_ELEMENTS // head_dim_padded, triton.next_power_of_2(num_heads)))


def _check_dtypes(op: str, x: Tensor, *others: Tensor | None) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: dtype {x.dtype} is not supported (float32, bfloat16, float16)")
    for other in others:
        if other is not None and other.dtype != x.dtype:
            raise ValueError(f"{op}: all inputs must be {x.dtype}, got {other.dtype}")


def _check_rotary_inputs(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> None:
    num_tokens, _, head_dim = q.shape
    _check_dtypes("rotary", q, k, cos, sin)
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(
            f"rotary: q {tuple(q.shape)} and k {tuple(k.shape)} need one even head_dim and one token count"
        )
    if cos.shape != sin.shape or cos.shape[1] != head_dim:
        raise ValueError(
            f"rotary: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} are not [max_pos, {head_dim}] tables"
        )
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"rotary: positions must be [{num_tokens}] int64 (or int32)")


TORCH_OPS: Ops = TorchOps()
TRITON_OPS: Ops = TritonOps()
TRITON_OPS_TORCH_LINEAR: Ops = TritonOps(small_batch_linear=False)

_REGISTRY: dict[str, Ops] = {
    "torch": TORCH_OPS,
    "triton": TRITON_OPS,
    "triton_torch_linear": TRITON_OPS_TORCH_LINEAR,
}


def get_ops(name: str) -> Ops:
    """The ops registered under `name`: "torch" (reference), "triton" (fused kernels, the skinny
    matrix product for few rows) or "triton_torch_linear" (fused kernels, every product F.linear)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown ops {name!r}; choose one of {sorted(_REGISTRY)}")
    if name != "torch" and triton is None:
        raise RuntimeError(f"ops {name!r} needs the triton package, which is not installed")
    return _REGISTRY[name]


__all__ = [
    "MAX_NORM_HIDDEN",
    "TORCH_OPS",
    "TRITON_OPS",
    "TRITON_OPS_TORCH_LINEAR",
    "Ops",
    "TorchOps",
    "TritonOps",
    "get_ops",
]
