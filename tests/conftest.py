import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_bert():
    """Small random BERT encoders, seeded: `tiny_bert(layers)` (vocabulary 200, width 64, 4 heads)."""
    transformers = pytest.importorskip("transformers")

    def make(layers: int = 2):
        cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64)
        torch.manual_seed(0)
        return transformers.BertModel(cfg).eval()
    return make


@pytest.fixture
def toy_data():
    """A small separable 4-class problem on 20 features: (inputs, targets) batches."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 20, generator=g)
    w = torch.randn(20, 4, generator=g)
    y = (x @ w).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)


@pytest.fixture
def mlp():
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
