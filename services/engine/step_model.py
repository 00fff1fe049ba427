"""The engine's step-time model, fitted online from its own measured steps: what the SLO-aware
admission (services/engine/slo_admission.py) asks before it lets a prefill chunk beside decodes.

A step's work is a StepLoad, counted over the chunks the step computes:

    prefill_tokens         P  tokens of prompt chunks
    prefill_pairs          A  sum over prompt chunks of new tokens x context (prefix + new): attention
    num_decodes            D  running requests past their prompt
    decode_context_tokens  C  sum over decodes of their context (prefix + new): the KV they read
    offloaded_kv_bytes        KV the step must bring over PCIe from the host tier (0 today: no host tier)

and its time is linear in them:

    step_s = a + b·P + c·A + d·D + e·C  +  offload_transfer_s
    offload_transfer_s = offloaded_kv_bytes / pcie_bytes_per_s        (LayerKV's PCIe term; a hook)

This is the router's prefill model (services/router/policies/preble_model.py: a + b·extend +
c·extend·context) with the decode terms added; the engine keeps its own copy, as layers point one way.

Fit. The engine times its steps (services/engine/step_timings.py, `busy_s`: from the later of the
first step's launch and the previous collection, to this collection), and one sample is k steps,
their summed load and that time, so the constant term counts k·a. The fit is least squares over the
last `max_samples` samples (a bounded recent window: it follows a change of batch mix), redone every
`refit_every` samples, on terms scaled to comparable magnitudes. No coefficient may be negative (a
step never gets faster with more work): the fit is non-negative least squares, solved by Lawson and
Hanson's active-set method on the normal equations (a few 5x5 solves, about 0.2 ms a refit on CPU).
A solution with neither a per-token nor a per-pair prefill cost is refused (it would let any prefill
beside decodes): the last admissible one stays.

Before `min_samples` samples (or while no admissible solution exists) the prior holds.

Tunables (StepTimeModel's arguments):
    PRIOR_COEFFICIENTS = (0.010, 1e-4, 0.0, 1e-4, 0.0)  (a s, b s/token, c s/pair, d s/decode,
                          e s/context token): 10 ms a step, 10k prefill tokens/s, 0.1 ms a decode
    MIN_SAMPLES = 32          samples before the fit replaces the prior
    MAX_SAMPLES = 512         the window of recent samples fitted
    REFIT_EVERY = 16          samples between refits
    PCIE_BYTES_PER_S = 25e9   host-to-device bandwidth of the offload term (PCIe 4.0 x16, effective)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

PRIOR_COEFFICIENTS = (0.010, 1e-4, 0.0, 1e-4, 0.0)
MIN_SAMPLES = 32
MAX_SAMPLES = 512
REFIT_EVERY = 16
PCIE_BYTES_PER_S = 25e9

NUM_TERMS = 5  # steps, prefill tokens, prefill pairs, decodes, decode context tokens
_SCALES = np.array([1.0, 1e3, 1e6, 1e2, 1e6])  # steps, kilo-tokens, mega-pairs, hundreds, mega-tokens
_PREFILL_TERMS = (1, 2)
_TOLERANCE = 1e-10  # relative to the largest |X'y|: a smaller gradient is zero
_MAX_ITERATIONS = 3 * NUM_TERMS  # the active set converges in far fewer; this bounds a degenerate cycle


@dataclass(frozen=True)
class StepLoad:
    prefill_tokens: int = 0
    prefill_pairs: int = 0
    num_decodes: int = 0
    decode_context_tokens: int = 0
    offloaded_kv_bytes: int = 0  # the PCIe hook: nothing fills it until a host KV tier exists

    def with_chunk(self, num_prompt_tokens: int, num_computed_tokens: int, num_new_tokens: int) -> StepLoad:
        """This load plus one request's chunk of `num_new_tokens` after its `num_computed_tokens`; past
        its prompt it is a decode."""
        context = num_computed_tokens + num_new_tokens
        if num_computed_tokens >= num_prompt_tokens:
            return replace(
                self, num_decodes=self.num_decodes + 1, decode_context_tokens=self.decode_context_tokens + context
            )
        return replace(
            self,
            prefill_tokens=self.prefill_tokens + num_new_tokens,
            prefill_pairs=self.prefill_pairs + num_new_tokens * context,
        )

    def __add__(self, other: StepLoad) -> StepLoad:
        return StepLoad(
            self.prefill_tokens + other.prefill_tokens,
            self.prefill_pairs + other.prefill_pairs,
            self.num_decodes + other.num_decodes,
            self.decode_context_tokens + other.decode_context_tokens,
            self.offloaded_kv_bytes + other.offloaded_kv_bytes,
        )

    def terms(self, num_steps: int = 1) -> tuple[int, int, int, int, int]:
        return (num_steps, self.prefill_tokens, self.prefill_pairs, self.num_decodes, self.decode_context_tokens)


class StepTimeModel:
    """Owned by the engine's thread: the step timings `observe`, the scheduler `predict_s`."""

    def __init__(
        self,
        prior: tuple[float, ...] = PRIOR_COEFFICIENTS,
        min_samples: int = MIN_SAMPLES,
        max_samples: int = MAX_SAMPLES,
        refit_every: int = REFIT_EVERY,
        pcie_bytes_per_s: float = PCIE_BYTES_PER_S,
    ) -> None:
        if len(prior) != NUM_TERMS or any(x < 0 for x in prior):
            raise ValueError(f"the prior needs {NUM_TERMS} non-negative coefficients, got {prior}")
        self.min_samples = min_samples
        self.refit_every = refit_every
        self.pcie_bytes_per_s = pcie_bytes_per_s
        self.coefficients: tuple[float, ...] = tuple(prior)  # (a, b, c, d, e), unscaled
        self.fitted = False  # False: the prior holds
        # the last max_samples samples, a ring: scaled terms and seconds
        self._x = np.zeros((max_samples, NUM_TERMS))  # [max_samples, NUM_TERMS]
        self._y = np.zeros(max_samples)  # [max_samples]
        self._num_samples = 0  # ever observed
        self._since_fit = 0

    def __len__(self) -> int:
        return min(self._num_samples, len(self._y))

    def predict_s(self, load: StepLoad) -> float:
        a, b, c, d, e = self.coefficients
        compute_s = (
            a + b * load.prefill_tokens + c * load.prefill_pairs + d * load.num_decodes + e * load.decode_context_tokens
        )
        return compute_s + self.offload_transfer_s(load)

    def offload_transfer_s(self, load: StepLoad) -> float:
        """PCIe time of the KV layers the step brings from the host tier (LayerKV); 0 while none are."""
        return load.offloaded_kv_bytes / self.pcie_bytes_per_s

    def observe(self, load: StepLoad, num_steps: int, duration_s: float) -> None:
        """`num_steps` steps that together computed `load` took `duration_s` (modelled transfers included)."""
        compute_s = duration_s - self.offload_transfer_s(load)
        if num_steps <= 0 or compute_s <= 0:
            return
        slot = self._num_samples % len(self._y)
        self._x[slot] = np.array(load.terms(num_steps), dtype=np.float64) / _SCALES
        self._y[slot] = compute_s
        self._num_samples += 1
        self._since_fit += 1
        if len(self) >= self.min_samples and (not self.fitted or self._since_fit >= self.refit_every):
            self._refit()

    def _refit(self) -> None:
        self._since_fit = 0
        x, y = self._x[: len(self)], self._y[: len(self)]  # [n, NUM_TERMS], [n]
        solution = _nonnegative_least_squares(x.T @ x, x.T @ y)
        if solution is None:
            return  # keep what holds (the prior, or the last admissible fit)
        self.coefficients = tuple(float(v) for v in solution / _SCALES)
        self.fitted = True


def _nonnegative_least_squares(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray | None:
    """argmin |y - X w|^2 over w >= 0 from the normal equations (Lawson and Hanson's active set), or
    None when it has no prefill cost."""
    tolerance = _TOLERANCE * max(float(np.abs(xty).max()), 1e-300)
    w = np.zeros(NUM_TERMS)
    free = np.zeros(NUM_TERMS, dtype=bool)  # the terms not pinned at zero
    for _ in range(_MAX_ITERATIONS):
        gradient = xty - xtx @ w  # [NUM_TERMS]: the error falls along a pinned term with a positive one
        candidates = np.where(~free & (gradient > tolerance))[0]
        if len(candidates) == 0:
            break
        free[candidates[np.argmax(gradient[candidates])]] = True
        while True:
            s = np.zeros(NUM_TERMS)
            index = np.where(free)[0]
            s[index] = np.linalg.lstsq(xtx[np.ix_(index, index)], xty[index], rcond=None)[0]
            if (s[index] > 0).all():
                w = s
                break
            negative = index[s[index] <= 0]  # step from w towards s until the first term reaches zero
            alpha = float(np.min(w[negative] / (w[negative] - s[negative])))
            w = w + alpha * (s - w)
            free &= w > 0
            w[~free] = 0.0
    if not (w[list(_PREFILL_TERMS)] > 0).any():
        return None
    return w
