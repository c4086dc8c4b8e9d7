"""Block removal: the cheapest blocks go, the file rebuilds the shorter model, bad asks are refused."""
import logging

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.errors import ModelpressError
from modelpress.techniques.blocks import BlockPruneConfig, _relative_error, candidates

transformers = pytest.importorskip("transformers")


def batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 200, (4, 16), generator=g)} for _ in range(n)]


def make_passthrough(layer):
    """A BERT layer whose two residual branches add nothing: it only re-normalises its input."""
    with torch.no_grad():
        for lin in (layer.attention.output.dense, layer.output.dense):
            lin.weight.zero_()
            lin.bias.zero_()


def drop(model, recipe_settings, **kw):
    return mp.compress(model, {"stages": [{"prune": {"granularity": "block", **recipe_settings}}]}, **kw)


def test_the_recipe_routes_to_block_removal_and_checks_the_amount():
    r = mp.Recipe.from_yaml("stages: [{prune: {granularity: block, blocks: 2}}]")
    assert isinstance(r.stages[0], BlockPruneConfig) and r.stages[0].blocks == 2
    assert mp.Recipe.from_yaml(r.to_yaml()) == r
    checked = BlockPruneConfig(granularity="block", blocks=1, epochs=2, min_fidelity=0.98)
    assert checked.without_training() == BlockPruneConfig(granularity="block", blocks=1)  # auto's screening form
    for bad, field in [("{granularity: block}", "exactly one"), ("{granularity: block, blocks: 1, sparsity: 0.5}",
                                                                  "exactly one"),
                       ("{granularity: block, blocks: 0}", "blocks"), ("{granularity: block, sparsity: 1.0}", "sparsity"),
                       ("{granularity: block, blocks: 1, min_fidelity: 1.5}", "min_fidelity")]:
        with pytest.raises(mp.RecipeError, match=field):
            mp.Recipe.from_yaml(f"stages: [{{prune: {bad}}}]")


def test_the_cheapest_layer_goes_and_the_file_rebuilds_the_shorter_model(tmp_path, caplog, tiny_bert):
    model = tiny_bert(4)
    make_passthrough(model.encoder.layer[2])
    with caplog.at_level(logging.INFO, logger="modelpress.techniques.blocks"):
        result = drop(model, {"blocks": 1}, calib_data=batches())
    assert "encoder.layer.2 " in caplog.text  # the pass-through layer, not another
    out = result.model
    assert out.config.num_hidden_layers == 3 and len(out.encoder.layer) == 3
    assert [layer.attention.self.layer_idx for layer in out.encoder.layer] == [0, 1, 2]
    # the kept layers are the original 0, 1 and 3, in order
    assert torch.equal(out.encoder.layer[2].output.dense.weight, model.encoder.layer[3].output.dense.weight)
    path = tmp_path / "m.mpz"
    result.save(path)
    loaded = mp.load(path)
    x = batches(1)[0]
    assert len(loaded.encoder.layer) == 3
    assert torch.equal(loaded(**x).last_hidden_state, out(**x).last_hidden_state)
    assert result.report.rows[-1].params < result.report.rows[0].params


def test_sparsity_counts_a_share_of_the_blocks_and_exclude_keeps_one(tiny_bert):
    model = tiny_bert(4)
    make_passthrough(model.encoder.layer[1])
    result = mp.compress(model, {"stages": [{"prune": {"granularity": "block", "sparsity": 0.5,
                                                       "exclude": ["encoder.layer.1"]}}]}, calib_data=batches())
    assert result.model.config.num_hidden_layers == 2
    kept = [result.model.encoder.layer[i].output.dense.weight for i in range(2)]
    assert any(torch.equal(w, model.encoder.layer[1].output.dense.weight) for w in kept)  # excluded: still there


def test_a_decoder_llm_round_trips_too(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaModel(cfg).eval()
    result = drop(model, {"blocks": 1}, calib_data=batches())
    assert result.model.config.num_hidden_layers == 2
    path = tmp_path / "llama.mpz"
    result.save(path)
    x = batches(1)[0]
    assert torch.equal(mp.load(path)(**x).last_hidden_state, result.model(**x).last_hidden_state)


class Block(nn.Module):
    """A user's residual block."""

    def __init__(self, width, scale=1.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        with torch.no_grad():
            self.body[2].weight.mul_(scale)
            self.body[2].bias.mul_(scale)

    def forward(self, x):
        return x + self.body(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(10, 32)
        self.stage = nn.Sequential(Block(32), Block(32, scale=1e-4), Block(32))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.stage(torch.relu(self.stem(x))))


def test_a_user_model_loses_its_cheapest_residual_block_and_loads_into_its_skeleton(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    assert candidates(model) == ["stage.0", "stage.1", "stage.2"]  # composite children: blocks, not layers
    x = torch.randn(32, 10)
    result = drop(model, {"blocks": 1}, calib_data=[x])
    assert isinstance(result.model.stage[1], nn.Identity)
    assert result.manifest["swaps"] == {"stage.1": {"t": "Identity", "a": {}}}
    path = tmp_path / "net.mpz"
    result.save(path)
    loaded = mp.load(path, model=Net())
    assert isinstance(loaded.stage[1], nn.Identity) and torch.equal(loaded(x), result.model(x))


def test_the_cost_counts_real_tokens_only_where_a_batch_has_an_attention_mask():
    ref = torch.ones(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = ref.clone()
    out[0, 3] = 9.0  # a padding position: nothing downstream reads it
    out[1, 2:] = -5.0
    assert _relative_error([out], [ref], [{"attention_mask": mask}]) == 0.0
    out[0, 0] = 3.0  # a real token, off by 2 in each of 3 features: 12 over 5 tokens x 3 features of 1
    assert _relative_error([out], [ref], [{"attention_mask": mask}]) == pytest.approx(12 / 15)
    assert _relative_error([out], [ref], [out]) > 10  # a plain tensor input: every position counts


def test_no_candidates_or_too_many_is_a_clear_error(tiny_bert):
    mlp = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ModelpressError, match="found no block"):
        drop(mlp, {"blocks": 1}, calib_data=[torch.randn(4, 10)])
    with pytest.raises(ModelpressError, match="fewer than all"):
        drop(tiny_bert(2), {"blocks": 2}, calib_data=batches())
    with pytest.raises(ModelpressError, match="calib_data or train_data"):
        drop(tiny_bert(2), {"blocks": 1})


def test_hidden_distillation_pairs_each_layer_with_its_original(tiny_bert):
    from modelpress.techniques.losses import _matched_blocks

    model = tiny_bert(4)
    make_passthrough(model.encoder.layer[1])
    result = drop(model, {"blocks": 1}, calib_data=batches())
    assert result.state.renamed == {"encoder.layer.0": "encoder.layer.0", "encoder.layer.1": "encoder.layer.2",
                                    "encoder.layer.2": "encoder.layer.3"}
    pairs = _matched_blocks(result.model, model, result.state.renamed)
    assert pairs["encoder.layer.1"] == "encoder.layer.2" and pairs["encoder.layer.2"] == "encoder.layer.3"
    again = mp.compress(result.model, {"stages": [{"prune": {"granularity": "block", "blocks": 1}}]},
                        calib_data=batches())  # a second removal starts from a fresh state: names are its own
    assert len(again.state.renamed) == 2
    twice = mp.compress(model, {"stages": [{"prune": {"granularity": "block", "blocks": 1}},
                                           {"prune": {"granularity": "block", "blocks": 1}},
                                           {"distill": {"epochs": 1, "hidden": True}}]}, calib_data=batches(),
                        train_data=batches())
    kept = [int(v.rpartition(".")[2]) for _, v in sorted(twice.state.renamed.items())]
    assert len(kept) == 2 and kept == sorted(kept) and 1 not in kept  # originals, through both removals


def weighty(model):
    """A random BERT whose layers matter (as drawn, their residual branches add almost nothing)."""
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.output.dense.weight.mul_(30.0)
    return model


def test_min_fidelity_keeps_a_removal_the_held_out_outputs_hardly_notice(tiny_bert, caplog):
    model = tiny_bert(4)
    make_passthrough(model.encoder.layer[2])
    with caplog.at_level(logging.INFO, logger="modelpress.techniques.blocks"):
        result = drop(model, {"blocks": 1, "min_fidelity": 0.99}, calib_data=batches(), val_data=batches(2))
    assert result.model.config.num_hidden_layers == 3
    assert "block removal kept (encoder.layer.2): output cosine 1.0000" in caplog.text and "val_data" in caplog.text


def test_min_fidelity_undoes_a_removal_that_costs_more_and_the_model_is_the_original(tiny_bert, tmp_path, caplog):
    model = weighty(tiny_bert(3))
    with caplog.at_level(logging.INFO, logger="modelpress.techniques.blocks"):
        result = drop(model, {"blocks": 1, "min_fidelity": 0.99, "epochs": 1}, calib_data=batches(),
                      train_data=batches(20))  # no val_data: every 10th of the 20 batches is held out
    assert "block removal undone (encoder.layer." in caplog.text and "the tenth of train_data held out" in caplog.text
    out = result.model
    assert out.config.num_hidden_layers == 3 and len(out.encoder.layer) == 3 and result.state.renamed == {}
    assert [layer.attention.self.layer_idx for layer in out.encoder.layer] == [0, 1, 2]
    x = batches(1)[0]
    assert torch.equal(out(**x).last_hidden_state, model(**x).last_hidden_state)  # the snapshot, untrained
    path = tmp_path / "m.mpz"
    result.save(path)
    assert torch.equal(mp.load(path)(**x).last_hidden_state, model(**x).last_hidden_state)


def test_recovery_epochs_distill_the_shorter_model_towards_the_original(tiny_bert):
    from modelpress.techniques.finetune import output_cosine

    model, held = weighty(tiny_bert(3)), batches(4)
    bare = drop(model, {"blocks": 1}, calib_data=batches()).model
    trained = drop(model, {"blocks": 1, "epochs": 3, "lr": 1e-3}, calib_data=batches(), train_data=batches(8)).model
    assert trained.config.num_hidden_layers == bare.config.num_hidden_layers == 2
    assert output_cosine(trained, model, held) > output_cosine(bare, model, held) + 0.05  # 0.88 -> 0.99 here


def test_min_fidelity_without_data_to_hold_out_measures_on_the_training_data_and_says_so(tiny_bert, caplog):
    with caplog.at_level(logging.INFO, logger="modelpress.techniques.blocks"):
        result = drop(tiny_bert(2), {"blocks": 1, "min_fidelity": 0.5}, calib_data=batches(), train_data=batches(3))
    assert "nothing held out to check min_fidelity on" in caplog.text and "measured on train_data" in caplog.text
    assert "kept (encoder.layer." in caplog.text and result.model.config.num_hidden_layers == 1


def test_output_cosine_pools_real_tokens_and_flattens_other_outputs():
    from modelpress.techniques.finetune import output_cosine

    class Echo(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, input_ids, attention_mask):
            return self.scale * input_ids.float().unsqueeze(-1).expand(-1, -1, 2)

    ids = torch.tensor([[1.0, 2.0, 7.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask}
    assert output_cosine(Echo(2.0), Echo(1.0), [batch]) == pytest.approx(1.0)  # a scale does not change a cosine

    class Flip(Echo):
        def forward(self, input_ids, attention_mask):
            out = super().forward(input_ids, attention_mask).clone()
            out[0, 2] = -out[0, 2]  # a padding position only
            out[1, :, 1] = 0.0      # a real row: sample 2's pooled (12, 12) becomes (12, 0), cosine 1/sqrt(2)
            return out
    assert output_cosine(Flip(1.0), Echo(1.0), [batch]) == pytest.approx((1 + 2 ** -0.5) / 2)
    lin = nn.Linear(3, 4)
    x = torch.randn(5, 3)
    assert output_cosine(lin, lin, [x]) == pytest.approx(1.0)
    with pytest.raises(ModelpressError, match="no batch"):
        output_cosine(lin, lin, [])
