"""Recipes and everything else a user writes down: plain data and its validation, importing nothing
above it (see :mod:`matpress.recipe.recipe` for the format of a recipe file)."""

from matpress.recipe.budget import CALIBRATED_INT, PRESETS, Budget, allowed_candidates, candidate_label, candidate_rules, resolve_candidates
from matpress.recipe.calibration import CalibrationSettings
from matpress.recipe.patterns import name_matches
from matpress.recipe.recipe import DEFAULT_EXCLUDE, MAX_RECIPE_BYTES, MAX_RECIPE_DEPTH, Recipe, RecipeLike, as_recipe
from matpress.recipe.rules import Rule, register_params

__all__ = [
    "CALIBRATED_INT", "DEFAULT_EXCLUDE", "MAX_RECIPE_BYTES", "PRESETS", "MAX_RECIPE_DEPTH", "Budget", "CalibrationSettings", "Recipe", "RecipeLike",
    "Rule", "allowed_candidates", "as_recipe", "candidate_label", "candidate_rules", "name_matches", "register_params",
    "resolve_candidates",
]
