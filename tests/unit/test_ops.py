"""Fused elementwise ops (Triton) against the plain-torch reference, under Triton's interpreter.

Shapes are small and ragged (hidden 96, head_dim 80, a partial column block) so every mask runs at
interpreter speed. Comparisons follow the numerics contract of `services.engine.ops`: rotary and
the residual sum are exact in every dtype; the norms and silu agree to 1e-6 relative in float32
(the variance sum order and exp differ) and to one unit in the last place in 16-bit dtypes, with
almost every element exact. bfloat16 runs only where Triton rounds float32 to bfloat16 to
nearest; the interpreter of Triton 3.6 truncates instead, so there it is skipped.

The `check_*` helpers take a device and shapes so the GPU tests reuse them at real sizes.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from services.engine.models.llama import RotaryEmbedding
from services.engine.ops import TORCH_OPS, TRITON_OPS, get_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
FLOAT32_RELATIVE_TOLERANCE = 1e-6
MAX_MISMATCH_FRACTION = 0.01  # 16-bit dtypes: share of elements allowed one unit off
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------------------------- helpers


def randn(
    shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator, device: str, scale: float = 1.0
) -> torch.Tensor:
    """Normal values drawn on the CPU (same numbers on every device), then moved."""
    return (torch.randn(shape, generator=generator) * scale).to(device=device, dtype=dtype)


MAX_ULPS = 2


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """16-bit floats as integers whose difference counts units in the last place."""
    bits = x.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if expected.dtype == torch.float32:
        diff = (actual.double() - expected.double()).abs()
        relative = diff / expected.double().abs().clamp_min(1e-30)
        assert relative.max().item() < FLOAT32_RELATIVE_TOLERANCE
        return
    # A norm's float32 value may land on the other side of a 16-bit rounding boundary (variance summed in
    # another order, GPU rsqrt): one unit off after the first rounding, at most two after the product with
    # the weight is rounded again (seen on an H200). Everything else matches exactly.
    ulps = (ordered_bits(actual) - ordered_bits(expected)).abs()
    assert ulps.max().item() <= MAX_ULPS
    assert (ulps != 0).double().mean().item() <= MAX_MISMATCH_FRACTION


@functools.cache
def triton_rounds_bfloat16(device: str) -> bool:
    """1 + 0.75 ulp must round up to 1 + 1 ulp in bfloat16 (a truncating cast gives 1)."""
    one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    three_quarter_ulp = torch.full((1, 1), 2.0**-8 + 2.0**-9, dtype=torch.bfloat16, device=device)
    _, total = TRITON_OPS.add_rms_norm(one, three_quarter_ulp, one[0], EPS)
    return torch.equal(total, one + three_quarter_ulp)


def skip_unless_supported(dtype: torch.dtype, device: str = DEVICE) -> None:
    if dtype == torch.bfloat16 and not triton_rounds_bfloat16(device):
        pytest.skip("this Triton (the interpreter) truncates float32 to bfloat16")


def split_qkv(
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    device: str,
) -> dict[str, torch.Tensor]:
    """q, k, v as the model gets them: [T, H, D] views into one [T, (Hq + 2 Hk) * D] projection."""
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = randn((num_tokens, q_size + 2 * kv_size), dtype, generator, device)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return {
        "qkv": qkv,
        "q": q.view(num_tokens, num_q_heads, head_dim),
        "k": k.view(num_tokens, num_kv_heads, head_dim),
        "v": v.view(num_tokens, num_kv_heads, head_dim),
    }


def rotary_embedding(
    head_dim: int,
    max_positions: int,
    dtype: torch.dtype,
    device: str,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    mrope_section: tuple[int, ...] | None = None,
) -> RotaryEmbedding:
    """The model's own tables (and `apply`), built from the fields of DecoderSpec they read."""
    spec = SimpleNamespace(
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        mrope_section=mrope_section,
    )
    return RotaryEmbedding(spec, torch.device(device), dtype)  # type: ignore[arg-type]


def shuffled_positions(num_tokens: int, max_positions: int, generator: torch.Generator, device: str) -> torch.Tensor:
    """Distinct positions in random order, int64."""
    return torch.randperm(max_positions, generator=generator)[:num_tokens].to(device)


# ---------------------------------------------------------------------------------- checks


def check_add_rms_norm(
    num_tokens: int, hidden_size: int, dtype: torch.dtype, has_residual: bool, device: str = DEVICE, seed: int = 0
) -> None:
    generator = torch.Generator().manual_seed(seed)
    # x is a row-strided view (its rows are wider than hidden) to exercise the stride arguments
    x = randn((num_tokens, hidden_size + 16), dtype, generator, device)[:, :hidden_size]
    residual = randn((num_tokens, hidden_size), dtype, generator, device, scale=4.0) if has_residual else None
    weight = 1.0 + randn((hidden_size,), dtype, generator, device, scale=0.1)
    x_before = x.clone()

    expected_normed, expected_residual = TORCH_OPS.add_rms_norm(x, residual, weight, EPS)
    normed, new_residual = TRITON_OPS.add_rms_norm(x, residual, weight, EPS)

    assert torch.equal(new_residual, expected_residual)
    if residual is None:
        assert new_residual is x
    assert_matches(normed, expected_normed)
    assert torch.equal(x, x_before)


def check_rms_norm_heads(
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str = DEVICE,
    seed: int = 0,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    views = split_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, generator, device)
    weight = 1.0 + randn((head_dim,), dtype, generator, device, scale=0.1)
    qkv_before = views["qkv"].clone()
    for name in ("q", "k"):
        assert_matches(
            TRITON_OPS.rms_norm_heads(views[name], weight, EPS), TORCH_OPS.rms_norm_heads(views[name], weight, EPS)
        )
    assert torch.equal(views["qkv"], qkv_before)


def check_rotary(
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    max_positions: int,
    device: str = DEVICE,
    seed: int = 0,
    **rope: Any,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    views = split_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, generator, device)
    q, k, v = views["q"], views["k"], views["v"]
    rotary = rotary_embedding(head_dim, max_positions, dtype, device, **rope)
    positions = shuffled_positions(num_tokens, max_positions, generator, device)
    v_before = v.clone()

    expected_q, expected_k = TORCH_OPS.rotary(q, k, rotary.cos, rotary.sin, positions)
    actual_q, actual_k = TRITON_OPS.rotary(q, k, rotary.cos, rotary.sin, positions)

    assert torch.equal(actual_q, expected_q)
    assert torch.equal(actual_k, expected_k)
    assert torch.equal(v, v_before)  # the rest of the projection is untouched


def check_mrope_rotary(
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    mrope_section: tuple[int, ...],
    dtype: torch.dtype,
    max_positions: int,
    device: str = DEVICE,
    seed: int = 0,
) -> None:
    """M-RoPE: per-token cos/sin rows gathered from three position rows, then the same rotary op."""
    generator = torch.Generator().manual_seed(seed)
    views = split_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, generator, device)
    rotary = rotary_embedding(head_dim, max_positions, dtype, device, mrope_section=mrope_section)
    positions = torch.stack([shuffled_positions(num_tokens, max_positions, generator, device) for _ in range(3)])
    tables = rotary.tables(positions)  # [T, D] rows, one per token
    assert tables.cos.shape == (num_tokens, head_dim)

    # equal components are plain rotary at that position: what decode steps run instead
    equal_rows = rotary.tables(positions[0].expand(3, -1))
    plain_q, _ = TORCH_OPS.rotary(views["q"], views["k"], rotary.cos, rotary.sin, positions[0])
    mrope_q, _ = TORCH_OPS.rotary(views["q"], views["k"], equal_rows.cos, equal_rows.sin, equal_rows.positions)
    assert torch.equal(mrope_q, plain_q)

    expected_q, expected_k = TORCH_OPS.rotary(views["q"], views["k"], tables.cos, tables.sin, tables.positions)
    actual_q, actual_k = TRITON_OPS.rotary(views["q"], views["k"], tables.cos, tables.sin, tables.positions)
    assert torch.equal(actual_q, expected_q)
    assert torch.equal(actual_k, expected_k)


def check_silu_and_mul(
    num_tokens: int, intermediate_size: int, dtype: torch.dtype, device: str = DEVICE, seed: int = 0
) -> None:
    generator = torch.Generator().manual_seed(seed)
    width = 2 * intermediate_size
    gate_up = randn((num_tokens, width + 8), dtype, generator, device, scale=3.0)[:, :width]
    assert_matches(TRITON_OPS.silu_and_mul(gate_up), TORCH_OPS.silu_and_mul(gate_up))


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("has_residual", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype, has_residual):
    skip_unless_supported(dtype)
    check_add_rms_norm(num_tokens=5, hidden_size=96, dtype=dtype, has_residual=has_residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rms_norm_widest_row(dtype):
    check_add_rms_norm(num_tokens=2, hidden_size=16384, dtype=dtype, has_residual=True, seed=1)


@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_heads(dtype, head_dim):
    skip_unless_supported(dtype)
    check_rms_norm_heads(num_tokens=3, num_q_heads=4, num_kv_heads=2, head_dim=head_dim, dtype=dtype)


@pytest.mark.parametrize("head_dim", [64, 80, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(dtype, head_dim):
    skip_unless_supported(dtype)
    # 12 q heads fill groups of 16 (head_dim 64), 8 (80) or 4 (256) heads, partial groups included
    check_rotary(num_tokens=4, num_q_heads=12, num_kv_heads=2, head_dim=head_dim, dtype=dtype, max_positions=64)


@pytest.mark.parametrize("head_dim, mrope_section", [(16, (2, 3, 3)), (128, (16, 24, 24))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mrope_rotary(dtype, head_dim, mrope_section):
    skip_unless_supported(dtype)
    check_mrope_rotary(
        num_tokens=5,
        num_q_heads=6,
        num_kv_heads=2,
        head_dim=head_dim,
        mrope_section=mrope_section,
        dtype=dtype,
        max_positions=64,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    skip_unless_supported(dtype)
    check_silu_and_mul(num_tokens=3, intermediate_size=1500, dtype=dtype)  # 2 blocks, one partial


def test_empty_batch():
    weight = torch.ones(8, device=DEVICE)
    normed, new_residual = TRITON_OPS.add_rms_norm(torch.empty(0, 8, device=DEVICE), None, weight, EPS)
    assert normed.shape == new_residual.shape == (0, 8)
    assert TRITON_OPS.silu_and_mul(torch.empty(0, 8, device=DEVICE)).shape == (0, 4)


def test_rejects_mixed_dtypes():
    x = torch.ones(2, 8, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="float16"):
        TRITON_OPS.add_rms_norm(x, None, torch.ones(8, device=DEVICE), EPS)


def test_registry():
    assert get_ops("torch") is TORCH_OPS
    assert get_ops("triton") is TRITON_OPS
    with pytest.raises(ValueError, match="unknown ops"):
        get_ops("cuda")
