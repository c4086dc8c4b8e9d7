import pytest

from modelpress.presets import PRESETS
from modelpress.recipe import Recipe
from modelpress.stage import STAGES
from modelpress.errors import RecipeError

# one non-default example per registered config class: (its key, its settings)
EXAMPLES = {
    "PruneConfig": ("prune", {"sparsity": 0.92, "criterion": "taylor", "schedule": "agp", "steps": 5, "epochs": 2.0,
                              "exclude": ["0"]}),
    "ChannelPruneConfig": ("prune", {"sparsity": 0.3, "granularity": "head", "criterion": "l2", "refit": False}),
    "NMPruneConfig": ("prune", {"pattern": "4:8", "criterion": "taylor", "epochs": 1.0, "lr": 0.0005}),
    "BlockPruneConfig": ("prune", {"granularity": "block", "sparsity": 0.25, "batches": 4}),
    "QATConfig": ("qat", {"epochs": 2.0, "lr": 0.001, "ranges": "calibrated", "calib_batches": 4, "distill": False}),
    "PrecisionConfig": ("precision", {"dtype": "fp16", "embeddings": False}),
    "ClusterConfig": ("cluster", {"bits": 5, "include_bias": False}),
    "QuantizeConfig": ("quantize", {"bits": 4, "group_size": 32, "method": "gptq", "avg_bits": 4.5,
                                    "embeddings": False}),
    "FactorizeConfig": ("factorize", {"energy": 0.9}),
    "DistillConfig": ("distill", {"epochs": 2.0, "temperature": 4.0, "hidden": True}),
    "FinetuneConfig": ("finetune", {"epochs": 3.0, "lr": 0.0005}),
}


def test_every_registered_stage_round_trips_through_yaml():
    assert set(EXAMPLES) == {c.__name__ for variants in STAGES.values() for c in variants}
    recipe = Recipe.from_dict({"stages": [{k: v} for k, v in EXAMPLES.values()], "exclude": ["4"]})
    assert [type(s).__name__ for s in recipe.stages] == list(EXAMPLES)  # each routed to its own config
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    assert again.stages[0].sparsity == 0.92 and again.stages[0].exclude == ("0",)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(name):
    r = Recipe.preset(name)
    assert Recipe.from_yaml(r.to_yaml()) == r


def test_all_problems_are_listed_at_once_naming_field_and_value():
    text = """
stages:
  - prune: {sparsity: 1.5, criterion: foo, bogus: 1}
  - cluster: {bits: 0}
  - frobnicate: {}
  - finetune: {}
extra: 1
"""
    with pytest.raises(RecipeError) as e:
        Recipe.from_yaml(text)
    msg = str(e.value)
    assert "The 'sparsity' of stage 1 (prune) must be a float in [0, 1) or 'auto'. Got 1.5 instead." in msg
    assert "'criterion' of stage 1 (prune) must be one of" in msg and "'foo'" in msg
    assert "unknown field 'bogus'" in msg
    assert "The 'bits' of stage 2 (cluster) must be >= 1. Got 0 instead." in msg
    assert "unknown technique 'frobnicate'" in msg
    assert "The 'epochs' of stage 4 (finetune) is required." in msg
    assert "Unknown top-level key(s) ['extra']" in msg


@pytest.mark.parametrize("text,fragment", [
    ("stages: []", "non-empty list"),
    ("- a\n- b", "must be a mapping"),
    ("stages: [prune]", "one technique key"),
    ("stages: [{prune: 3}]", "must be a mapping"),
    ("stages: [{quantize: {bits: 0}}]", "'bits' of stage 1 (quantize) must be >= 2. Got 0"),
    ("stages: [{finetune: {epochs: 1}}]\nexclude: 3", "'exclude' must be a list"),
    ("stages: [{", "not valid YAML"),
])
def test_bad_recipes(text, fragment):
    with pytest.raises(RecipeError, match=None) as e:
        Recipe.from_yaml(text)
    assert fragment in str(e.value)


def test_recipe_from_a_file_and_from_long_one_line_text(tmp_path):
    text = "stages: [{prune: {sparsity: 0.5, exclude: [" + ", ".join(f"layer{i}" for i in range(60)) + "]}}]"
    assert len(text) > 300
    assert Recipe.from_yaml(text).stages[0].sparsity == 0.5
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert Recipe.from_yaml(path) == Recipe.from_yaml(str(path)) == Recipe.from_yaml(text)
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.from_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("stage, phrase", [
    ({"factorize": {"rank": 4, "energy": 0.9}}, "exactly one of rank, rank_ratio or energy"),
    ({"factorize": {}}, "exactly one of rank, rank_ratio or energy"),
    ({"quantize": {"bits": 4, "activations": "int8"}}, "activations: int8 needs bits: 8"),
    ({"quantize": {"bits": 4, "avg_bits": 3.5}}, "avg_bits (3.5) must be at least bits (4)"),
])
def test_inconsistent_settings_are_explained(stage, phrase):
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"stages": [stage]})
    assert phrase in str(e.value)
