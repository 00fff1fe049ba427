"""The skinny matrix product (services.engine.small_batch_linear) against the exact sum, under Triton's
interpreter on CPU (on a GPU machine, on the GPU).

The reference is F.linear in float64 of the same inputs: the exact sum, to far below a float32 unit.
The kernel sums in float32 in its own order and rounds once to the dtype, so each output may differ
from the exact value by the float32 summation slack (SUM_SLACK units of float32 times sum |x * w|)
plus, in 16-bit dtypes, one unit in the last place of the output (the interpreter of Triton 3.6
truncates float32 to bfloat16 instead of rounding, hence a whole unit rather than half). An indexing
or masking slip moves outputs by about the size of a term, orders of magnitude above this.

Shapes are small and ragged (N = 77, K = 200: a partial column block and a partial K tile), and the
launch configs cover both variants (dot, fma) with one and several K tiles, the last one whole or
not. The `check_linear` helper takes a device so the GPU tests reuse it at Llama-3.1-8B sizes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from services.engine import small_batch_linear
from services.engine.ops import TORCH_OPS, TRITON_OPS, get_ops
from services.engine.small_batch_linear import LaunchConfig, input_error, launch_config, linear, supports

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SUM_SLACK = 16  # float32 units of sum |x * w|: summation in another order
SIGNIFICAND_BITS = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}
ROWS = [1, 3, 16]
NUM_COLS, NUM_FEATURES = 77, 200  # N and K: neither a multiple of any block

CONFIGS = {
    "dot": LaunchConfig(block_n=32, block_k=256, num_warps=4, num_stages=3),  # one K tile, masked
    "dot-small": LaunchConfig(block_n=16, block_k=32, num_warps=4, num_stages=2),  # 7 K tiles, the last partial
    "fma": LaunchConfig(block_n=8, block_k=512, num_warps=4, num_stages=1, use_dot=False),
    "fma-small": LaunchConfig(block_n=4, block_k=64, num_warps=2, num_stages=1, use_dot=False),
}


def make_inputs(
    num_rows: int, out_features: int, in_features: int, dtype: torch.dtype, has_bias: bool, device: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [M, K], weight [N, K], bias [N] or None: normal values drawn on the CPU, then moved."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    return draw(num_rows, in_features), draw(out_features, in_features), draw(out_features) if has_bias else None


def assert_near_exact(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out within the float32 summation slack, plus one unit of out's dtype, of the exact x @ w.T + b."""
    bias64 = None if bias is None else bias.double()
    expected = F.linear(x.double(), weight.double(), bias64)
    magnitude = F.linear(x.double().abs(), weight.double().abs(), None if bias64 is None else bias64.abs())
    allowed = SUM_SLACK * 2.0**-24 * magnitude
    if out.dtype != torch.float32:
        _, exponent = torch.frexp(torch.maximum(expected.abs(), out.double().abs()))
        allowed += torch.pow(2.0, exponent.double() - SIGNIFICAND_BITS[out.dtype])  # one unit in the last place
    assert out.shape == expected.shape and out.dtype == x.dtype
    excess = (out.double() - expected).abs() - allowed
    assert excess.max().item() <= 0, f"worst excess {excess.max().item():.3g} over the allowed error"


def check_linear(
    num_rows: int,
    out_features: int,
    in_features: int,
    dtype: torch.dtype,
    has_bias: bool,
    config: LaunchConfig | None = None,
    device: str = DEVICE,
    seed: int = 0,
) -> None:
    x, weight, bias = make_inputs(num_rows, out_features, in_features, dtype, has_bias, device, seed)
    assert_near_exact(linear(x, weight, bias, config=config), x, weight, bias)


# ---------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("num_rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_config_matches_the_exact_sum(dtype, num_rows, has_bias):
    check_linear(num_rows, NUM_COLS, NUM_FEATURES, dtype, has_bias, seed=num_rows)


@pytest.mark.parametrize("num_rows", ROWS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_variant_and_split_matches_the_exact_sum(dtype, config, num_rows):
    check_linear(num_rows, NUM_COLS, NUM_FEATURES, dtype, has_bias=num_rows == 3, config=CONFIGS[config], seed=7)


@pytest.mark.parametrize("config", ["dot-small", "fma-small"])
def test_whole_k_tiles_and_float16(config):
    """K a multiple of BLOCK_K: the unmasked loop (EVEN_K)."""
    check_linear(5, 40, 192, torch.float16, has_bias=True, config=CONFIGS[config])


def test_every_output_is_written_the_same_each_call():
    """The output comes from torch.empty: every element written, by a deterministic sum."""
    x, weight, _ = make_inputs(16, NUM_COLS, NUM_FEATURES, torch.float32, False, DEVICE, seed=3)
    for config in CONFIGS.values():
        first = linear(x, weight, config=config)
        second = linear(x, weight, config=config)
        assert torch.isfinite(first).all() and torch.equal(first, second)


# ---------------------------------------------------------------------------------- inputs


def test_input_error_names_each_refusal():
    x, weight, bias = make_inputs(2, 8, 16, torch.float32, True, "cpu", seed=0)
    assert input_error(x, weight, bias) is None
    assert "not [M, K]" in input_error(x, weight[:, :8])
    assert "rows" in input_error(torch.zeros(17, 16), weight)
    assert "rows" in input_error(torch.zeros(0, 16), weight)
    assert "dtypes" in input_error(x.double(), weight.double())
    assert "dtypes" in input_error(x, weight.half())
    assert "bias" in input_error(x, weight, bias[:4])
    assert "unit stride" in input_error(x, weight.t().contiguous().t())
    assert "empty" in input_error(torch.zeros(2, 0), torch.zeros(8, 0))
    assert "backward" in input_error(x, weight.requires_grad_())
    with torch.no_grad():
        assert input_error(x, weight) is None
    with pytest.raises(ValueError, match="rows"):
        linear(torch.zeros(17, 16), weight)


def test_supports_only_cuda_tensors():
    x, weight, bias = make_inputs(2, 8, 16, torch.float32, True, "cpu", seed=0)
    assert not supports(x, weight, bias)  # CPU: F.linear, even though `linear` takes them


def test_triton_ops_fall_back_to_f_linear_bit_for_bit_off_the_gpu():
    x, weight, bias = make_inputs(3, NUM_COLS, NUM_FEATURES, torch.float32, True, "cpu", seed=1)
    expected = F.linear(x, weight, bias)
    assert TORCH_OPS.linear is F.linear
    assert torch.equal(TRITON_OPS.linear(x, weight, bias), expected)
    assert torch.equal(get_ops("triton_torch_linear").linear(x, weight, bias), expected)


def test_module_imports_and_refuses_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` raises ImportError
        "import torch\n"
        "from services.engine import small_batch_linear as m\n"
        "x, w = torch.zeros(1, 4), torch.zeros(2, 4)\n"
        "assert not m.supports(x, w)\n"
        "try:\n"
        "    m.linear(x, w)\n"
        "except RuntimeError as error:\n"
        "    assert 'needs the triton package' in str(error)\n"
        "else:\n"
        "    raise AssertionError('linear ran without triton')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------- launch table


def test_launch_config_covers_every_row_count():
    for num_rows in range(1, small_batch_linear.MAX_ROWS + 1):
        bucket = small_batch_linear.row_bucket(num_rows)
        assert bucket >= num_rows and launch_config(num_rows) is small_batch_linear.ROW_BUCKET_CONFIGS[bucket]
    assert [small_batch_linear.row_bucket(n) for n in (1, 2, 3, 4, 5, 9, 16)] == [1, 2, 4, 4, 8, 16, 16]
