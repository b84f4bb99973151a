import json

import pytest

from matpress.errors import RecipeError
from matpress.methods import DenseParams, IntParams
from matpress.recipe import Recipe, as_recipe


def test_default_recipe_is_4_bit_rtn_g128_and_skips_embeddings_and_lm_head():
    r = Recipe()
    assert r.default.method == "rtn" and r.default.params == IntParams(4, 128, False)
    assert r.rule_for("model.layers.0.mlp.up_proj") is r.default
    assert r.rule_for("lm_head") is None
    assert r.rule_for("model.embed_tokens") is None


def test_rules_override_the_default_and_first_match_wins():
    r = Recipe.from_dict(
        {
            "default": {"bits": 3, "group_size": 64},
            "rules": [
                {"pattern": "*.v_proj", "bits": 8},
                {"pattern": "*_proj", "method": "dense", "dtype": "fp16"},
            ],
        }
    )
    v = r.rule_for("model.layers.0.self_attn.v_proj")
    assert v.method == "rtn" and v.params == IntParams(8, 64, False)  # inherits group_size from default
    q = r.rule_for("model.layers.0.self_attn.q_proj")
    assert q.method == "dense" and q.params == DenseParams("fp16")  # new method: its own defaults
    assert r.rule_for("model.layers.0.other").params == IntParams(3, 64, False)


def test_include_exclude_and_regex_patterns():
    r = Recipe.from_dict({"include": ["re:.*layers\\.[01]\\..*"], "exclude": ["*down_proj"]})
    assert r.rule_for("model.layers.1.mlp.up_proj") is not None
    assert r.rule_for("model.layers.2.mlp.up_proj") is None
    assert r.rule_for("model.layers.0.mlp.down_proj") is None
    assert Recipe.from_dict({"exclude": []}).rule_for("lm_head") is not None


def test_round_trip_through_dict_and_files(tmp_path):
    r = Recipe.from_dict({"default": {"bits": 2, "group_size": None, "symmetric": True}, "rules": [{"pattern": "a*", "bits": 5}]})
    assert Recipe.from_dict(r.to_dict()) == r
    (tmp_path / "r.json").write_text(json.dumps(r.to_dict()))
    assert as_recipe(tmp_path / "r.json") == r
    (tmp_path / "r.yaml").write_text("default: {bits: 2, group_size: null, symmetric: true}\nrules:\n  - {pattern: 'a*', bits: 5}\n")
    assert as_recipe(str(tmp_path / "r.yaml")) == r


@pytest.mark.parametrize(
    "data,match",
    [
        ({"defaults": {}}, "unknown recipe key"),
        ({"default": {"bitz": 4}}, r"unknown parameter\(s\) \['bitz'\]"),
        ({"default": {"bits": 1}}, "bits must be an integer from 2 to 8"),
        ({"default": {"bits": 4.5}}, "bits must be an integer"),
        ({"default": {"group_size": 0}}, "group_size"),
        ({"default": {"symmetric": "yes"}}, "symmetric"),
        ({"default": {"method": "magic"}}, "unknown method 'magic'"),
        ({"default": {"pattern": "x"}}, "takes no 'pattern'"),
        ({"rules": [{"bits": 4}]}, r"rules\[0\] needs a 'pattern'"),
        ({"rules": {"pattern": "x"}}, "must be a list"),
        ({"exclude": [3]}, "exclude must be a list"),
        ({"include": ["re:("]}, "bad regular expression"),
        ({"default": {"method": "dense", "dtype": "fp8"}}, "dtype must be one of"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_bad_recipes_name_the_problem(data, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict(data)


def test_missing_or_unparsable_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RecipeError, match="could not be parsed"):
        Recipe.load(tmp_path / "bad.json")


def test_a_rule_for_every_layer_survives_to_dict():
    """Found by the recipe fuzz test: a rule with pattern '*' lost its pattern in to_dict, so the CLI
    (which reads a --recipe file back through to_dict) and a checkpoint's recorded recipe refused it."""
    recipe = Recipe.from_dict({"default": {"bits": 4}, "rules": [{"pattern": "*", "bits": 8}]})
    assert Recipe.from_dict(recipe.to_dict()) == recipe
