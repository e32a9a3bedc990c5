"""How many draft nodes to verify per step: the budget that maximises expected tokens per second.

A decode step's time grows with the tokens it verifies (batch rows times nodes per row) from the cost of
streaming the weights once; how fast depends on the machine: a 16-token forward of SmolLM2-135M costs
1.2-1.5x one token on a Zen 4 CPU with AVX512-BF16, about 2-3x in bfloat16 on an AVX-512 CPU without it,
about 1x on a GPU at 7B — so the same code must verify small trees on one and large ones on another. The
cost is learnt online from the steps' own wall times (recent ones, so it follows a machine that gets
busy) and shared by every ``generate`` call on the same model.

Given each row's scored tree (:class:`cllm_rt.runtime.drafts.DraftTree`), a budget of ``n`` nodes per
row yields ``sum over rows of (1 + the n-1 best scores)`` expected tokens; the budget chosen maximises
that divided by the predicted step time. Drafts that stop being accepted lower their scores (the
calibration learns it) until the best budget is 1 node: plain autoregressive decoding.
"""

from __future__ import annotations

import statistics
from collections import deque

# Budgets considered (nodes per row, root included); a step's trees are cut to the chosen one.
BUDGETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class StepCost:
    """Seconds per step as a function of the tokens it verifies, from the medians of recent steps.

    Medians, not a least-squares line: on a shared machine a few steps run several times slower (a
    neighbour took the core), and a fit through them would misprice every budget. A size never measured
    is priced from its nearest measured neighbours: linear between two, and beyond the measured sizes along
    the slope of the two nearest (at least the prior's).
    """

    # Extra cost per token relative to a one-token step, before two sizes are measured: cautious (an AVX-512
    # CPU without bf16 arithmetic measured 0.2-0.3 for SmolLM2), so unmeasured large steps are not assumed
    # cheap; exploration (choose_budget) finds out where they are (a GPU: about 0).
    PRIOR_SLOPE = 0.1
    WINDOW = 16  # recent steps kept per size

    def __init__(self):
        self._samples: dict[int, deque] = {}
        self._medians: dict[int, float] | None = None  # measured(), kept until the next observation

    def observe(self, tokens: int, seconds: float) -> None:
        self._samples.setdefault(tokens, deque(maxlen=self.WINDOW)).append(seconds)
        self._medians = None

    def sample_counts(self) -> dict[int, int]:
        return {t: len(s) for t, s in self._samples.items()}

    def measured(self) -> dict[int, float]:
        """Median seconds per measured step size (computed once per observation: choose_budget predicts a
        dozen budgets per step)."""
        if self._medians is None:
            self._medians = {t: statistics.median(s) for t, s in sorted(self._samples.items())}
        return dict(self._medians)

    def predict(self, tokens: int) -> float:
        if self._medians is None:
            self.measured()
        known = self._medians
        if tokens in known:
            return known[tokens]
        if not known:
            return 1.0 + self.PRIOR_SLOPE * tokens
        sizes = sorted(known)
        below = [t for t in sizes if t < tokens]
        above = [t for t in sizes if t > tokens]
        if below and above:
            lo, hi = below[-1], above[0]
            return known[lo] + (known[hi] - known[lo]) * (tokens - lo) / (hi - lo)
        # beyond the measured sizes: the measured slope nearest to it, never below the prior's
        ends = sizes[-2:] if below else sizes[:2]
        nearest = ends[-1] if below else ends[0]
        slope = self.PRIOR_SLOPE * known[nearest] / (1 + self.PRIOR_SLOPE * nearest)
        if len(ends) == 2:
            slope = max(slope, (known[ends[1]] - known[ends[0]]) / (ends[1] - ends[0]))
        return max(known[nearest] + slope * (tokens - nearest), 1e-9)


def choose_budget(cost: StepCost, tree_scores: list[list[float]], max_nodes: int, explore: bool = False) -> int:
    """The nodes per row (root included) that maximise expected tokens per second for these trees.

    ``tree_scores[r]``: row r's node scores, root excluded, best first. ``explore``: return instead the next
    larger budget whose step size has fewer than 3 measurements, if the trees fill it, so a prior that
    underprices large steps (a GPU) or overprices them is corrected by measuring rather than kept forever.
    """
    prefix = []  # prefix[r][k]: expected tokens of row r with its k best nodes
    for scores in tree_scores:
        acc, sums = 1.0, [1.0]
        for s in scores:
            acc += s
            sums.append(acc)
        prefix.append(sums)
    largest = min(max_nodes, max((len(s) for s in tree_scores), default=0) + 1)
    candidates = [b for b in BUDGETS if b < largest] + [largest]
    rows = len(tree_scores)
    rates = {b: sum(p[min(b - 1, len(p) - 1)] for p in prefix) / cost.predict(b * rows) for b in candidates}
    best = max(candidates, key=lambda b: (rates[b], -b))
    if explore:
        sampled = cost.sample_counts()
        return next((b for b in candidates if b > best and sampled.get(b * rows, 0) < 3), best)
    return best
