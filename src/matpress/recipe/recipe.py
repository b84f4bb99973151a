"""Recipes: plain data saying which layers to compress, and how.

A recipe has a default rule (a method and its parameters), per-pattern overrides, and include/exclude
lists of layer-name patterns. Patterns are shell-style globs on a layer's qualified name
(``encoder.layer.0.attention.self.value``), or regular expressions when prefixed with ``re:``.

As YAML or JSON::

    default: {method: rtn, bits: 4, group_size: 128}
    rules:                       # first matching rule wins; it overrides the default's keys
      - {pattern: "*.value", bits: 8}
      - {pattern: "*.output.dense", method: dense, dtype: fp16}
    include: ["*"]
    exclude: ["*lm_head", "*embed*"]   # the defaults; embeddings and lm_head stay dense unless a rule names them

Embeddings (``nn.Embedding``) are compressed only by a rule naming them, never by the default rule, and
with a calibration-free method (rtn, hqq, dense, ...): their inputs are token ids, so there are no
input statistics. An LM head tied to a compressed embedding shares its stored format::

    rules:
      - {pattern: "*embed_tokens", method: rtn, bits: 8, group_size: 64}

A rule that names a different method than the default starts from that method's own defaults.

Under a size budget the default rule gives way to an automatic choice per layer among candidates
(see :mod:`matpress.passes.budget`); layers matched by a rule keep that rule::

    budget: 3.2bpw                # or 40MB, 12MiB, a byte count
    candidates: quant             # a preset name, or a list of rules: [{method: rtn, bits: 3}, ...]
    allow:                        # optional: restrict the candidates of some layers (label globs)
      - {pattern: "*.value", candidates: ["*-8b-*"]}

Calibrated methods (gptq, awq) run on calibration text, described by plain data (all keys optional;
``unit`` defaults to ``sentence`` for encoders and ``window`` for causal LMs; ``chat_template`` (default
true) formats the text with the tokenizer's chat template when it has one)::

    default: {method: gptq, bits: 4, group_size: 128, act_order: true, rotate: true}
    calibration: {text: builtin, samples: 128, seq_len: 128, batch_size: 8, chat_template: true}
    # text: builtin, a text file, or a .jsonl file ({"text": ...} or {"messages": [{role, content}, ...]} a line)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from matpress.errors import BudgetError, RecipeError, quote
from matpress.inputs import check_plain_data, read_file
from matpress.recipe.budget import Budget, resolve_candidates
from matpress.recipe.calibration import CalibrationSettings
from matpress.recipe.patterns import check_patterns, name_matches
from matpress.recipe.rules import Rule, build_rule

DEFAULT_EXCLUDE = ("*lm_head", "*embed*")
# Bounds on what a recipe may be: far above any real recipe, far below what could exhaust memory
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_VALUES = 100_000  # every list item, key and value, a YAML alias counted each time it is used
MAX_RECIPE_DEPTH = 16
RECIPE_KEYS = {"default", "rules", "include", "exclude", "budget", "candidates", "allow", "calibration"}


@dataclass(frozen=True)
class Recipe:
    default: Rule = field(default_factory=lambda: build_rule({}, None, "default"))
    rules: tuple[Rule, ...] = ()
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    budget: Optional[str] = None
    candidates: Union[str, tuple[dict, ...]] = "quant"
    allow: tuple[dict, ...] = ()
    calibration: Optional[CalibrationSettings] = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe must be a mapping, got {type(data).__name__}")
        check_plain_data(data, source, RecipeError, MAX_RECIPE_VALUES, MAX_RECIPE_DEPTH)
        unknown = sorted(set(data) - RECIPE_KEYS, key=str)
        if unknown:
            raise RecipeError(f"{source}: unknown recipe key(s) {quote(unknown)}; allowed keys are {sorted(RECIPE_KEYS)}")
        default = build_rule(data.get("default", {}), None, f"{source}: default")
        if default.pattern != "*":
            raise RecipeError(f"{source}: the default rule applies to every layer and takes no 'pattern'")
        raw_rules = data.get("rules", [])
        if not isinstance(raw_rules, list):
            raise RecipeError(f"{source}: 'rules' must be a list of mappings")
        rules = []
        for i, r in enumerate(raw_rules):
            if not isinstance(r, dict) or "pattern" not in r:
                raise RecipeError(f"{source}: rules[{i}] needs a 'pattern' naming the layers it applies to")
            rules.append(build_rule(r, default, f"{source}: rules[{i}]"))
        include = check_patterns(data.get("include", ["*"]), f"{source}: include")
        exclude = check_patterns(data.get("exclude", list(DEFAULT_EXCLUDE)), f"{source}: exclude")
        budget, candidates, allow = _budget_fields(data, source)
        calibration = None
        if "calibration" in data:
            calibration = CalibrationSettings.from_dict(data["calibration"], f"{source}: calibration")
        return cls(default, tuple(rules), include, exclude, budget, candidates, allow, calibration)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Recipe":
        """Read a recipe from a .yaml/.yml or .json file (UTF-8, at most :data:`MAX_RECIPE_BYTES`)."""
        path = Path(path)
        data = read_file(path, "recipe file", MAX_RECIPE_BYTES, RecipeError)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise RecipeError(f"recipe file {path} is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                parsed = yaml.safe_load(text)
            else:
                parsed = json.loads(text)
        except Exception as e:  # parser errors differ by library (and deep nesting is a RecursionError)
            raise RecipeError(f"recipe file {path} could not be parsed: {quote(str(e), 400)}") from None
        return cls.from_dict(parsed or {}, source=str(path))

    @classmethod
    def simple(cls, method: str = "rtn", **params: Any) -> "Recipe":
        """One rule for every matching layer, e.g. ``Recipe.simple("rtn", bits=4, group_size=128)``."""
        return cls.from_dict({"default": {"method": method, **params}})

    def to_dict(self) -> dict[str, Any]:
        data = {
            "default": self.default.to_dict(),
            "rules": [{"pattern": r.pattern, **r.to_dict()} for r in self.rules],  # a rule's pattern may be "*"
            "include": list(self.include),
            "exclude": list(self.exclude),
        }
        if self.budget is not None:
            data["budget"] = self.budget
            data["candidates"] = self.candidates if isinstance(self.candidates, str) else list(self.candidates)
            data["allow"] = list(self.allow)
        if self.calibration is not None:
            data["calibration"] = self.calibration.to_dict()
        return data

    def pinned_rule(self, name: str) -> Optional[Rule]:
        """The explicit rule (not the default) naming layer ``name``, if any; under a budget it fixes the
        layer's method."""
        return next((r for r in self.rules if name_matches(r.pattern, name)), None)

    def rule_for(self, name: str, use_default: bool = True) -> Optional[Rule]:
        """The rule for layer ``name``, or None when the layer is not to be compressed. The default
        exclude patterns (embeddings, lm_head) give way to a rule that names the layer; other exclude
        patterns always win. ``use_default=False`` (embeddings) accepts only a rule naming the layer."""
        if not any(name_matches(p, name) for p in self.include):
            return None
        rule = self.pinned_rule(name)
        excluded = {p for p in self.exclude if name_matches(p, name)}
        if excluded and (rule is None or not excluded <= set(DEFAULT_EXCLUDE)):
            return None
        return rule if rule is not None or not use_default else self.default


def _budget_fields(data: dict[str, Any], source: str) -> tuple[Optional[str], Any, tuple[dict, ...]]:
    """Validate the budget keys; candidates and allow mean nothing without a budget."""
    if "budget" not in data:
        stray = sorted({"candidates", "allow"} & set(data))
        if stray:
            raise RecipeError(f"{source}: {stray} only apply under a 'budget' (e.g. budget: 3.2bpw)")
        return None, "quant", ()
    budget = data["budget"]
    if not isinstance(budget, (str, int, float)) or isinstance(budget, bool):
        raise RecipeError(f"{source}: budget must be a size such as 3.2bpw or 40MB, got {quote(budget)}")
    budget = str(budget)
    try:
        Budget.parse(budget)
    except BudgetError as e:
        raise BudgetError(f"{source}: {e}") from None
    candidates = data.get("candidates", "quant")
    resolve_candidates(candidates, f"{source}: candidates")
    raw_allow = data.get("allow", [])
    if not isinstance(raw_allow, list):
        raise RecipeError(f"{source}: 'allow' must be a list of {{pattern, candidates}} mappings")
    for i, entry in enumerate(raw_allow):
        if (
            not isinstance(entry, dict)
            or set(entry) != {"pattern", "candidates"}
            or not isinstance(entry["pattern"], str)
            or not isinstance(entry["candidates"], list)
            or not all(isinstance(c, str) for c in entry["candidates"])
        ):
            raise RecipeError(f"{source}: allow[{i}] must be {{pattern: <layer glob>, candidates: [<label glob>, ...]}}")
    return budget, candidates if isinstance(candidates, str) else tuple(candidates), tuple(raw_allow)


RecipeLike = Union[Recipe, dict, str, Path, None]


def as_recipe(recipe: RecipeLike) -> Recipe:
    """Accept a Recipe, a plain dict, a path to a YAML/JSON file, or None (the default recipe)."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        return Recipe.load(recipe)
    raise RecipeError(f"a recipe must be a Recipe, dict or file path, got {type(recipe).__name__}")
