"""Choosing one candidate per layer under a byte budget: a multiple-choice knapsack.

Solved exactly by dynamic programming over byte costs measured in a fixed unit. The unit depends only on
the candidates (the largest possible total divided by ``resolution``), never on the budget, and each
cost is rounded *up* to whole units; so every answer fits the budget in true bytes, and a larger
budget can only admit more choices, never a worse optimum (the damage is monotone in the budget).
With costs that are already small integers (``resolution`` at least their largest total) the answer
equals brute force.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from matpress.errors import BudgetError


@dataclass(frozen=True)
class Option:
    """One candidate for one layer: what it costs in bytes and what it is estimated to damage."""

    nbytes: int
    damage: float


def cheapest_total(options: Sequence[Sequence[Option]]) -> int:
    return sum(min(o.nbytes for o in opts) for opts in options)


def allocate(options: Sequence[Sequence[Option]], budget_bytes: int, resolution: int = 20000) -> list[int]:
    """Index of the chosen option for each layer, minimising total damage with total bytes <= budget."""
    if not options or any(len(opts) == 0 for opts in options):
        raise BudgetError("every layer needs at least one candidate")
    minimum = cheapest_total(options)
    if budget_bytes < minimum:
        raise BudgetError(
            f"a budget of {budget_bytes} bytes cannot be met: the smallest candidates of all layers together "
            f"take {minimum} bytes ({minimum / 1e6:.3f} MB); raise the budget or allow smaller candidates"
        )
    maximum = sum(max(o.nbytes for o in opts) for opts in options)
    unit = max(1, math.ceil(maximum / resolution))
    capacity = budget_bytes // unit
    costs = [np.array([math.ceil(o.nbytes / unit) for o in opts]) for opts in options]
    damages = [np.array([o.damage for o in opts], dtype=np.float64) for opts in options]
    if sum(int(c.min()) for c in costs) > capacity:
        # rounding up to whole units made the cheapest choice look infeasible: it is not, take it
        return [int(np.argmin([o.nbytes for o in opts])) for opts in options]

    best = np.zeros(capacity + 1)  # best[b]: least damage of the layers so far within b units
    choices = []
    for cost, damage in zip(costs, damages):
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, dtype=np.int32)
        for i, (c, d) in enumerate(zip(cost, damage)):
            if c > capacity:
                continue
            candidate = best[: capacity + 1 - c] + d
            better = candidate < new[c:]
            new[c:][better] = candidate[better]
            pick[c:][better] = i
        best = new
        choices.append(pick)
    chosen = []
    b = capacity
    for cost, pick in zip(reversed(costs), reversed(choices)):
        i = int(pick[b])
        chosen.append(i)
        b -= int(cost[i])
    return chosen[::-1]
