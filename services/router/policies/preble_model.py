"""What Preble measures rather than assumes: the prefill-time model, recent medians, TTFT trends.

PrefillTimeFit. The engines report step timings (services.common.control.StepTiming): k steps that
computed E tokens with A attention pairs (sum over requests of new tokens x context) in t seconds.
The model is linear in three terms, a step overhead, a per-token (projections and MLP) and a
per-pair (attention) cost:

    t ≈ a·k + b·E + c·A                              fitted by least squares
    prefill_time(extend, context) = a + b·extend + c·extend·context

over the last `max_samples` timings of all workers (a bounded recent sample: the fit follows a
change of model or hardware). The normal equations are kept as running sums, updated per sample
added or dropped, and solved when `refit_every` new samples have come (3x3, on scaled terms). No
coefficient may be negative: when the unconstrained solution has one, every subset of the terms is
solved and the non-negative solution of least squared error wins (the exact non-negative least
squares for three terms). A solution with neither a per-token nor a per-pair cost is refused.

Before `min_samples` timings (or while no admissible solution exists) the prior holds:

    prefill_time(extend, context) = prior_s_per_token · extend          (a = c = 0)

conservative in that it ranks workers exactly as counting prompt tokens to compute does (the
policy's earlier rule): the fit changes the ranking only once it has data.

RecentMedian: the median of the last N values (recomputed when a value comes, read in O(1)).

TTFTTrend (Preble's overload detector): the TTFTs of one important node on one worker over the last
window_s seconds, split at now - window_s / 2; overloaded when both halves have min_samples values
and mean(second half) >= ratio × mean(first half).
"""

from __future__ import annotations

import bisect
from collections import deque
from itertools import combinations

# The fit's terms are scaled to comparable magnitudes before solving: steps, kilo-tokens, mega-pairs.
_SCALES = (1.0, 1e3, 1e6)
_PIVOT_EPS = 1e-12


class PrefillTimeFit:
    def __init__(self, max_samples: int, min_samples: int, prior_s_per_token: float, refit_every: int = 16) -> None:
        self.max_samples = max_samples
        self.min_samples = min_samples
        self.prior_s_per_token = prior_s_per_token
        self.refit_every = refit_every
        self._samples: deque[tuple[float, float, float, float]] = deque()  # scaled (k, E, A) and t
        self._xtx = [[0.0] * 3 for _ in range(3)]
        self._xty = [0.0] * 3
        self._yty = 0.0
        self._since_fit = 0
        self.coefficients: tuple[float, float, float] = (0.0, prior_s_per_token, 0.0)  # (a, b, c), unscaled
        self.fitted = False  # False: the prior holds

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, num_steps: int, num_tokens: int, num_attention_pairs: int, duration_s: float) -> None:
        if num_steps <= 0 or num_tokens <= 0 or duration_s <= 0:
            return
        sample = (num_steps / _SCALES[0], num_tokens / _SCALES[1], num_attention_pairs / _SCALES[2], duration_s)
        self._samples.append(sample)
        self._accumulate(sample, +1.0)
        if len(self._samples) > self.max_samples:
            self._accumulate(self._samples.popleft(), -1.0)
        self._since_fit += 1
        if len(self._samples) >= self.min_samples and (not self.fitted or self._since_fit >= self.refit_every):
            self._refit()

    def prefill_time(self, extend_tokens: float, context_tokens: float) -> float:
        a, b, c = self.coefficients
        return a + b * extend_tokens + c * extend_tokens * context_tokens

    def _accumulate(self, sample: tuple[float, float, float, float], sign: float) -> None:
        k, e, a, y = sample  # unrolled: this runs for every timing reported
        xtx, xty = self._xtx, self._xty
        xtx[0][0] += sign * k * k
        xtx[0][1] += sign * k * e
        xtx[0][2] += sign * k * a
        xtx[1][1] += sign * e * e
        xtx[1][2] += sign * e * a
        xtx[2][2] += sign * a * a
        xtx[1][0], xtx[2][0], xtx[2][1] = xtx[0][1], xtx[0][2], xtx[1][2]
        xty[0] += sign * k * y
        xty[1] += sign * e * y
        xty[2] += sign * a * y
        self._yty += sign * y * y

    def _refit(self) -> None:
        self._since_fit = 0
        best: tuple[float, list[float]] | None = None
        for size in (3, 2, 1):
            for terms in combinations(range(3), size):
                if 1 not in terms and 2 not in terms:
                    continue  # a constant time per step says nothing about tokens
                solution = _solve([[self._xtx[i][j] for j in terms] for i in terms], [self._xty[i] for i in terms])
                if solution is None or any(x < 0 for x in solution):
                    continue
                error = self._squared_error(terms, solution)
                if best is None or error < best[0]:
                    full = [0.0, 0.0, 0.0]
                    for term, value in zip(terms, solution):
                        full[term] = value
                    best = (error, full)
            if best is not None and size == 3:
                break  # the unconstrained solution is admissible: it is the least-squares one
        if best is None or (best[1][1] <= 0 and best[1][2] <= 0):
            return  # keep what holds (the prior, or the last admissible fit)
        scaled = best[1]
        self.coefficients = (scaled[0] / _SCALES[0], scaled[1] / _SCALES[1], scaled[2] / _SCALES[2])
        self.fitted = True

    def _squared_error(self, terms: tuple[int, ...], solution: list[float]) -> float:
        """|y - X_S x|^2 from the running sums: y'y - 2 x'X'y + x'X'X x."""
        error = self._yty
        for p, i in enumerate(terms):
            error -= 2 * solution[p] * self._xty[i]
            for q, j in enumerate(terms):
                error += solution[p] * solution[q] * self._xtx[i][j]
        return error


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float] | None:
    """x with matrix · x = rhs (Gaussian elimination, partial pivoting); None when singular."""
    n = len(rhs)
    rows = [row[:] + [rhs[i]] for i, row in enumerate(matrix)]
    scale = max((abs(rows[i][i]) for i in range(n)), default=0.0)
    if scale == 0.0:
        return None
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        if abs(rows[pivot][col]) <= _PIVOT_EPS * scale:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(col + 1, n):
            factor = rows[r][col] / rows[col][col]
            for k in range(col, n + 1):
                rows[r][k] -= factor * rows[col][k]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (rows[i][n] - sum(rows[i][k] * x[k] for k in range(i + 1, n))) / rows[i][i]
    return x


class RecentMedian:
    def __init__(self, max_values: int, prior: float) -> None:
        self.max_values = max_values
        self._arrivals: deque[float] = deque()  # oldest first
        self._sorted: list[float] = []  # the same values, ascending
        self.prior = prior
        self.median = prior  # the prior until a value comes

    def __len__(self) -> int:
        return len(self._arrivals)

    def add(self, value: float) -> None:
        self._arrivals.append(value)
        bisect.insort(self._sorted, value)
        if len(self._arrivals) > self.max_values:
            del self._sorted[bisect.bisect_left(self._sorted, self._arrivals.popleft())]
        values, mid = self._sorted, len(self._sorted) // 2
        self.median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


class TTFTTrend:
    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._first: deque[tuple[float, float]] = deque()  # (time, ttft), older than now - window_s / 2
        self._second: deque[tuple[float, float]] = deque()  # the newer half
        self._first_sum = 0.0
        self._second_sum = 0.0

    def add(self, now: float, ttft_s: float) -> None:
        self._advance(now)
        self._second.append((now, ttft_s))
        self._second_sum += ttft_s

    def overloaded(self, now: float, ratio: float, min_samples: int) -> bool:
        self._advance(now)
        first, second = len(self._first), len(self._second)
        if first < max(1, min_samples) or second < max(1, min_samples):
            return False
        return self._second_sum / second >= ratio * (self._first_sum / first)

    def clear(self) -> None:
        self._first.clear()
        self._second.clear()
        self._first_sum = self._second_sum = 0.0

    def _advance(self, now: float) -> None:
        half = now - self.window_s / 2
        while self._second and self._second[0][0] < half:
            point = self._second.popleft()
            self._second_sum -= point[1]
            self._first.append(point)
            self._first_sum += point[1]
        start = now - self.window_s
        while self._first and self._first[0][0] < start:
            self._first_sum -= self._first.popleft()[1]
        if not self._first:
            self._first_sum = 0.0
        if not self._second:
            self._second_sum = 0.0
