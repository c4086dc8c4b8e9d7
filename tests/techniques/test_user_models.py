"""Every stage kind on user-defined classes no preset was tuned on: a residual CNN with a depthwise
convolution, a tagger with a bidirectional 2-layer LSTM and a Conv1d, and an encoder built from
nn.TransformerEncoderLayer (nn.MultiheadAttention) with a ConvTranspose1d. Each artifact loads into a
fresh skeleton of its class and gives the compressed model's outputs bit for bit; recurrent, attention
and transposed-convolution weights are compressed like any other."""
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.state import CompressionState, constrained
from modelpress.techniques.common import target_params


class ResidualCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw, self.pw = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = h + torch.relu(self.dw(h))
        return self.fc(torch.relu(self.pw(h)).mean((2, 3)))


class Tagger(nn.Module):
    def __init__(self, vocab=100, dim=32, hidden=48):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.conv, self.head = nn.Conv1d(2 * hidden, 64, 3, padding=1), nn.Linear(64, 10)

    def forward(self, ids):
        h, _ = self.lstm(self.emb(ids))
        return self.head(torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2)).mean(1)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=False)
        self.up, self.head = nn.ConvTranspose1d(32, 16, 2, stride=2), nn.Linear(16, 10)

    def forward(self, ids):
        h = self.enc(self.emb(ids))
        return self.head(torch.relu(self.up(h.transpose(1, 2))).transpose(1, 2)).mean(1)


MODELS = {"cnn": (ResidualCNN, lambda g: torch.randn(16, 3, 12, 12, generator=g)),
          "lstm": (Tagger, lambda g: torch.randint(0, 100, (16, 7), generator=g)),
          "encoder": (Encoder, lambda g: torch.randint(0, 100, (16, 7), generator=g))}
RECIPES = {
    "prune": {"stages": [{"prune": {"sparsity": 0.5, "epochs": 1}}]},
    "n:m": {"stages": [{"prune": {"pattern": "2:4"}}]},
    "channel": {"stages": [{"prune": {"granularity": "channel", "sparsity": 0.3}}]},
    "int8": "int8", "w4": "w4", "w3": "w3", "deep-compression": "deep-compression", "fast": "fast",
    "cluster": {"stages": [{"cluster": {"bits": 4}}, {"finetune": {"epochs": 1}}]},
    "factorize": {"stages": [{"factorize": {"rank": 4, "min_rank": 1}}]},
    "bf16": {"stages": [{"precision": {"dtype": "bf16"}}]},
    "qat": {"stages": [{"qat": {"epochs": 1}}]},
}


def batches(make):
    g = torch.Generator().manual_seed(0)
    return [(make(g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("kind", MODELS)
def test_every_stage_kind_round_trips_into_a_skeleton_of_the_users_class(tmp_path, kind, recipe):
    cls, make = MODELS[kind]
    torch.manual_seed(0)
    data = batches(make)
    result = mp.compress(cls(), RECIPES[recipe], train_data=data)
    path = tmp_path / "m.mpz"
    result.save(path)
    loaded = mp.load(path, model=cls())
    with torch.no_grad():
        assert torch.equal(loaded(data[0][0]), result.model.eval()(data[0][0]))


def test_recurrent_attention_and_transposed_weights_are_targets():
    names = set(target_params(Tagger())) | {f"e.{n}" for n in target_params(Encoder())}
    assert {"lstm.weight_ih_l0", "lstm.weight_hh_l1_reverse", "conv.weight", "head.weight"} <= names
    assert {"e.enc.layers.0.self_attn.in_proj_weight", "e.enc.layers.1.self_attn.out_proj.weight",
            "e.enc.layers.0.linear1.weight", "e.up.weight"} <= names
    assert not any(n.startswith("lstm.bias") for n in names)  # biases only when asked
    assert "lstm.bias_ih_l0" in target_params(Tagger(), bias=True)


@pytest.mark.parametrize("recipe, ratio", [("int8", 3.5), ("w4", 6.0)])
def test_int8_and_w4_cover_lstm_layers(recipe, ratio):
    torch.manual_seed(0)
    model = Tagger(vocab=1000, dim=64, hidden=128)  # 96% of the weights in the LSTM
    data = batches(lambda g: torch.randint(0, 1000, (16, 12), generator=g))
    result = mp.compress(model, recipe, train_data=data)
    kinds = {row["name"]: row for row in result.layers()}
    assert kinds["lstm.weight_hh_l1_reverse"]["kind"] == "q" and kinds["lstm.weight_ih_l0"]["bits"] <= 8
    assert result.report.rows[-1].ratio >= ratio, result.report


def test_training_under_constraints_runs_the_lstm_on_its_constrained_weights():
    """Under a mask an LSTM must multiply the masked weights, or training would fit weights the saved
    model does not have (torch's RNNs re-list their weights when the tensors behind the names change)."""
    torch.manual_seed(0)
    model, ids = Tagger(), torch.randint(0, 100, (4, 7))
    state = CompressionState()
    st = state.get("lstm.weight_hh_l0")
    st.mask = torch.rand_like(model.lstm.weight_hh_l0) > 0.5
    with torch.no_grad():
        model.lstm.weight_hh_l0.mul_(st.mask)
        expected = model(ids)
        model.lstm.weight_hh_l0.add_(~st.mask * 5.0)  # what the mask forbids, in the raw tensor
        with constrained(model, state):
            inside = model(ids)
    assert torch.equal(inside, expected)
    assert torch.equal(model.lstm.weight_hh_l0, model.lstm.weight_hh_l0 * st.mask)  # masked again on exit
