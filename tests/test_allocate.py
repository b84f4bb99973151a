import itertools
import random

import pytest

from matpress.passes.budget.allocate import Option, allocate
from matpress.errors import BudgetError


def random_instance(rng: random.Random, layers: int, per_layer: int) -> list[list[Option]]:
    return [
        [Option(rng.randint(1, 60), rng.random()) for _ in range(rng.randint(1, per_layer))] for _ in range(layers)
    ]


def brute_force(options, budget):
    best = None
    for combo in itertools.product(*[range(len(o)) for o in options]):
        cost = sum(options[layer][i].nbytes for layer, i in enumerate(combo))
        if cost <= budget:
            damage = sum(options[layer][i].damage for layer, i in enumerate(combo))
            best = damage if best is None else min(best, damage)
    return best


def total(options, chosen):
    return (
        sum(options[layer][i].nbytes for layer, i in enumerate(chosen)),
        sum(options[layer][i].damage for layer, i in enumerate(chosen)),
    )


@pytest.mark.parametrize("seed", range(30))
def test_equals_brute_force_on_small_instances(seed):
    rng = random.Random(seed)
    options = random_instance(rng, layers=rng.randint(1, 5), per_layer=4)
    lo = sum(min(o.nbytes for o in opts) for opts in options)
    hi = sum(max(o.nbytes for o in opts) for opts in options)
    budget = rng.randint(lo, hi)
    nbytes, damage = total(options, allocate(options, budget))
    assert nbytes <= budget
    assert damage == pytest.approx(brute_force(options, budget), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_more_budget_never_more_damage_and_always_within_budget(seed):
    rng = random.Random(100 + seed)
    # large byte counts so that the dynamic programme works in coarse units
    options = [[Option(rng.randint(10_000, 3_000_000), rng.random()) for _ in range(6)] for _ in range(30)]
    lo = sum(min(o.nbytes for o in opts) for opts in options)
    hi = sum(max(o.nbytes for o in opts) for opts in options)
    previous = float("inf")
    for budget in range(lo, hi + 1, (hi - lo) // 40):
        nbytes, damage = total(options, allocate(options, budget, resolution=2000))
        assert nbytes <= budget
        assert damage <= previous + 1e-12
        previous = damage


def test_infeasible_budget_names_the_minimum():
    options = [[Option(100, 1.0), Option(50, 2.0)], [Option(30, 0.5)]]
    with pytest.raises(BudgetError, match="take 80 bytes"):
        allocate(options, 79)
    assert allocate(options, 80) == [1, 0]
    assert allocate(options, 130) == [0, 0]


def test_a_layer_without_candidates_is_refused():
    with pytest.raises(BudgetError, match="at least one candidate"):
        allocate([[Option(1, 0.0)], []], 10)
