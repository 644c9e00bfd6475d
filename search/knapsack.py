"""The multiple-choice knapsack that allocates bits under a size budget, and its Pareto frontier.

Each group picks one candidate: binary x[g, k], sum_k x[g, k] = 1, sum price[g, k] x[g, k] <= budget,
minimise sum value[g, k] x[g, k] (HAWQ-V2's total sensitivity, arXiv:1911.03852). Prices are the cost
model's exact per-group prices (`Budget.group_prices`), so sizes are never discretised (which is why this
is not dynamic programming over a size grid).

A mixed-integer program over every group of BERT-base (~37k binaries) is too slow for HiGHS to close, so
the solve is the classical core method of knapsack solvers:
  1. the Lagrangian relaxation of the budget, min_k value + lambda * price per group, bisected on lambda,
     gives a lower bound L (weak duality: L <= optimum for every lambda >= 0) and a near-optimal choice,
     greedily filled up to the budget: a feasible incumbent of value U;
  2. a choice of value <= U has its reduced costs (value + lambda * price - the group's minimum of it)
     summing to <= U - L, so every candidate whose reduced cost exceeds U - L is ruled out, and a group
     left with one candidate is settled: exactly, no heuristic;
  3. the groups left (the core) go to scipy.optimize.milp (HiGHS) at zero relative gap, and a second
     solve over the same core takes the cheapest choice of that value, so the point is Pareto-optimal.
Solving for a sweep of budgets traces the frontier.

Costs are always exact. A small core is solved to proven optimality. On BERT-base with 128 groups per
matrix thousands of groups lie within U - L of the Lagrangian line (near-ties are a knapsack's hard case,
and HiGHS does not even find the greedy incumbent again within minutes), so a core over `MAX_CORE`
variables keeps the greedy choice, a solve runs at most `time_limit` seconds, and every allocation
reports its proven optimality gap, (value - best lower bound) / value: about 1e-4 on BERT-base, far below
the noise of the Hessian traces that make the values.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

__all__ = ["FIT", "MAX_CORE", "Allocation", "Knapsack"]

log = logging.getLogger(__name__)

FIT = 1e-9  # budgets are met to this relative tolerance, as `Budget.fits` checks them
MAX_CORE = 1000  # core variables beyond which the integer program is not attempted
_BISECTIONS = 200
_OBJECTIVE_SCALE = 1e6  # HiGHS also stops at an absolute gap of 1e-6: keep objectives well above it
_TINY = 1e-300


@dataclass(frozen=True)
class Allocation:
    """One choice per group: per site, [G] indices into its sorted candidates; its cost and value."""

    choice: tuple[np.ndarray, ...]
    cost: float  # in the budget's unit, constant included
    value: float  # total sensitivity
    core: int = 0  # groups the bound left undecided (0: the bound settled every group)
    gap: float = 0.0  # proven relative optimality gap (0: optimal)

    def key(self) -> tuple[bytes, ...]:
        return tuple(c.tobytes() for c in self.choice)


@dataclass(frozen=True)
class Knapsack:
    """Per site: its sorted candidate bits, [G, K] values and [K] price of one group (every group of a
    site has the same shape, so the same prices); plus the constant part of the budgeted quantity."""

    names: tuple[str, ...]
    bits: tuple[tuple[int, ...], ...]
    values: tuple[np.ndarray, ...]
    prices: tuple[np.ndarray, ...]
    constant: float = 0.0

    def __post_init__(self) -> None:
        for name, b, v, p in zip(self.names, self.bits, self.values, self.prices, strict=True):
            if list(b) != sorted(b) or v.ndim != 2 or v.shape[1] != len(b) or p.shape != (len(b),):
                raise ValueError(f"{name}: candidates {b} do not match values {v.shape} and prices {p.shape}")
            if not (np.all(np.isfinite(v)) and np.all(np.isfinite(p))):
                raise ValueError(f"{name}: values and prices must be finite")

    @cached_property
    def _table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """All groups in one padded table: (values [N, Kmax], +inf where a site has fewer candidates;
        prices [N, Kmax]; valid mask; offset of each site's first group)."""
        kmax = max(len(b) for b in self.bits)
        n = sum(v.shape[0] for v in self.values)
        values, prices = np.full((n, kmax), np.inf), np.zeros((n, kmax))
        offsets, start = [], 0
        for v, p in zip(self.values, self.prices):
            g, k = v.shape
            offsets.append(start)
            values[start:start + g, :k] = v
            prices[start:start + g, :k] = p  # [K] -> [G, K]
            start += g
        return values, prices, np.isfinite(values), offsets

    # --- measuring a choice ----------------------------------------------------------------------
    def cost(self, choice: Sequence[np.ndarray]) -> float:
        return self.constant + float(sum(p[c].sum() for p, c in zip(self.prices, choice)))

    def value(self, choice: Sequence[np.ndarray]) -> float:
        return float(sum(v[np.arange(len(c)), c].sum() for v, c in zip(self.values, choice)))

    def bounds(self) -> tuple[float, float]:
        """The smallest and the largest cost a choice reaches."""
        sizes = [v.shape[0] for v in self.values]
        return (self.constant + float(sum(p.min() * g for g, p in zip(sizes, self.prices))),
                self.constant + float(sum(p.max() * g for g, p in zip(sizes, self.prices))))

    # --- solving ---------------------------------------------------------------------------------
    def allocate(self, target: float, time_limit: float | None = None) -> Allocation:
        """The least total value with cost <= `target` (the cheapest such choice); `time_limit` seconds per
        core solve. ValueError when no choice meets `target` (check a user's budget up front)."""
        lo, _ = self.bounds()
        if lo > target * (1 + FIT):
            raise ValueError(f"no choice of candidates costs {target:.6g} or less (the least is {lo:.6g})")
        values, prices, valid, offsets = self._table
        rows = np.arange(values.shape[0])
        cap = target * (1 + FIT) - self.constant  # for the groups' prices
        lam, bound, feasible = self._dual(cap)
        flat = self._fill(self._choose(feasible)[0], cap)
        upper = float(values[rows, flat].sum())
        shifted = values + lam * prices  # inf stays inf
        reduced = shifted - shifted.min(1, keepdims=True)
        slack = (upper - bound) + 1e-9 * max(abs(upper), 1.0)  # a hair wider than exact: keeping more is safe
        keep = valid & (reduced <= slack)
        free = np.flatnonzero(keep.sum(1) > 1)
        if free.size and keep[free].sum() <= MAX_CORE:
            flat, core_bound = self._solve_core(flat, keep, free, cap, time_limit)
            settled = np.ones(len(flat), bool)
            settled[free] = False
            bound = max(bound, float(values[rows[settled], flat[settled]].sum()) + core_bound)
        choice = tuple(np.split(flat.astype(np.int64), offsets[1:]))  # [N] -> per site [G]
        value = self.value(choice)
        gap = max(0.0, (value - bound) / max(abs(value), _TINY))
        return Allocation(choice, self.cost(choice), value, int(free.size), gap if gap > 1e-9 else 0.0)

    def _choose(self, lam: float) -> tuple[np.ndarray, float]:
        """The Lagrangian choice at `lam` and its groups' price; ties go to the first (cheaper) candidate."""
        values, prices, _, _ = self._table
        flat = np.argmin(values + lam * prices, 1)
        return flat, float(prices[np.arange(len(flat)), flat].sum())

    def _dual(self, cap: float) -> tuple[float, float, float]:
        """(lambda, L(lambda), lambda'): a multiplier of the budget `cap` with the Lagrangian lower bound
        there, and the nearest multiplier whose Lagrangian choice fits `cap`."""
        values, prices, valid, _ = self._table
        if self._choose(0.0)[1] <= cap:  # the budget does not bind
            return 0.0, float(values.min(1).sum()), 0.0
        rows = np.arange(len(values))
        cheap = np.argmin(np.where(valid, prices, np.inf), 1)
        dp = prices - prices[rows, cheap][:, None]
        dv = values[rows, cheap][:, None] - values
        # beyond the steepest value-per-price trade-off every group takes its cheapest candidate
        steep = np.where(valid & (dp > 0), dv / np.where(dp > 0, dp, 1.0), 0.0)
        lo, hi = 0.0, 2 * max(float(steep.max()), 0.0) + 1.0
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            if self._choose(mid)[1] <= cap:
                hi = mid
            else:
                lo = mid
        lam, bound = max(((lam, float((values + lam * prices).min(1).sum()) - lam * cap) for lam in (lo, hi)),
                         key=lambda t: t[1])
        return lam, bound, hi

    def _fill(self, flat: np.ndarray, cap: float) -> np.ndarray:
        """A feasible choice: `flat` (the cheapest choice if `flat` does not fit), then while some move
        fits the leftover budget, the move that lowers the value most."""
        values, prices, valid, _ = self._table
        rows = np.arange(len(flat))
        flat = flat.copy() if prices[rows, flat].sum() <= cap else np.argmin(np.where(valid, prices, np.inf), 1)
        while True:
            left = cap - prices[rows, flat].sum()
            gain = values[rows, flat][:, None] - values  # -inf where invalid
            fits = valid & (prices - prices[rows, flat][:, None] <= left) & (gain > 0)
            if not fits.any():
                return flat
            g, k = np.unravel_index(np.argmax(np.where(fits, gain, -np.inf)), gain.shape)
            flat[g] = k

    def _solve_core(self, flat: np.ndarray, keep: np.ndarray, free: np.ndarray, cap: float,
                    time_limit: float | None) -> tuple[np.ndarray, float]:
        """Decide the groups in `free` among their kept candidates (the others keep `flat`); returns the
        choice and a lower bound on the core's value."""
        values, prices, _, _ = self._table
        settled = np.ones(len(flat), bool)
        settled[free] = False
        limit = cap - float(prices[np.flatnonzero(settled), flat[settled]].sum())
        g_idx, k_idx = np.nonzero(keep[free])  # variables: (position in `free`, candidate)
        v, p = values[free[g_idx], k_idx], prices[free[g_idx], k_idx]
        eq = sparse.csr_matrix((np.ones(g_idx.size), (g_idx, np.arange(g_idx.size))), shape=(free.size, g_idx.size))
        incumbent = (k_idx == flat[free[g_idx]]).astype(float)
        scale = _OBJECTIVE_SCALE / max(float(np.abs(v).sum()), _TINY)
        for _ in range(4):  # HiGHS's feasibility tolerance may overshoot the budget a hair: tighten, re-solve
            budget_row = LinearConstraint(p[None, :], -np.inf, limit)
            x, core_bound, proven = _milp(v * scale, eq, [budget_row], time_limit)
            if x is None:
                break
            if proven:  # the cheapest choice of (at most) that value
                tie = (float(v @ x) + max(abs(float(v @ x)) * 1e-9, _TINY)) * scale
                x2, _, _ = _milp(p / max(float(np.abs(p).max()), _TINY), eq,
                                 [budget_row, LinearConstraint((v * scale)[None, :], -np.inf, tie)], time_limit)
                if x2 is not None and float(v @ x2) * scale <= tie and float(p @ x2) <= float(p @ x):
                    x = x2
            if float(v @ x) > float(v @ incumbent):  # a time-limited solve short of the greedy choice
                x = incumbent
            excess = float(p @ x) - limit
            if excess <= 0:
                out = flat.copy()
                picked = np.flatnonzero(x > 0.5)
                out[free[g_idx[picked]]] = k_idx[picked]
                return out, core_bound / scale
            limit -= excess
        log.warning("knapsack core: the solver found nothing within the budget; keeping the greedy choice")
        return flat, -math.inf

    def frontier(self, points: int, extra: Sequence[float] = (), time_limit: float | None = None) -> list[Allocation]:
        """Pareto-optimal allocations for `points` budgets evenly spaced over the reachable costs (and the
        `extra` budgets), duplicates and dominated ones dropped, by increasing cost."""
        lo, hi = self.bounds()
        targets = sorted(set(np.linspace(lo, hi, max(points, 2)).tolist()) | {t for t in extra if t >= lo})
        found: dict[tuple[bytes, ...], Allocation] = {}
        for t in targets:
            a = self.allocate(t, time_limit)
            found.setdefault(a.key(), a)
        front, best = [], math.inf
        for a in sorted(found.values(), key=lambda a: (a.cost, a.value)):
            if a.value < best:
                front.append(a)
                best = a.value
        return front


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 while HiGHS runs: scipy's build prints debugging lines from C++
    ("HighsMipSolverData::...") straight to it, past Python's sys.stdout."""
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _milp(objective: np.ndarray, eq: sparse.csr_matrix, extra: list[LinearConstraint],
          time_limit: float | None) -> tuple[np.ndarray | None, float, bool]:
    """(binary x minimising objective . x with one candidate per group and the `extra` rows, a lower bound
    on that minimum, proven optimal?) at zero relative gap, or the best found within `time_limit`."""
    options = {"mip_rel_gap": 0.0, **({"time_limit": float(time_limit)} if time_limit else {})}
    with _quiet_stdout():
        res = milp(objective, integrality=np.ones(objective.size), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(eq, 1, 1), *extra], options=options)
    if res.x is None:
        return None, -math.inf, False
    proven = res.status == 0
    bound = float(res.fun) if proven else float(getattr(res, "mip_dual_bound", None) or -math.inf)
    return np.rint(res.x), bound, proven
