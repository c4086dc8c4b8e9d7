import torch

from modelpress.state import CompressionState
from modelpress.techniques.cluster import cluster, kmeans_1d
from modelpress.context import RunContext
from modelpress.techniques.finetune import train
from modelpress.techniques.prune import prune
from modelpress.techniques.quantize import quantize, symmetric_scale


def test_kmeans_finds_well_separated_clusters():
    v = torch.cat([torch.full((50,), -1.0), torch.full((30,), 0.5), torch.full((20,), 2.0)])
    v = v + 0.01 * torch.randn(100)
    c, codes = kmeans_1d(v, 3)
    assert torch.allclose(c, torch.tensor([-1.0, 0.5, 2.0]), atol=0.01)
    assert torch.bincount(codes).tolist() == [50, 30, 20]


def test_cluster_keeps_zeros_and_uses_at_most_2_pow_bits_values(mlp, toy_data):
    state = CompressionState()
    prune(mlp, state, sparsity=0.7, scope="layer", run=RunContext(train_data=toy_data))
    cluster(mlp, state, bits=3)
    w = mlp[0].weight
    assert int((w == 0).sum()) == round(0.7 * w.numel())
    assert len(torch.unique(w[w != 0])) <= 8
    # centroids are float16-exact, so the file stores them losslessly
    cb = state.params["0.weight"].codebook
    assert torch.equal(cb.half().float(), cb)


def test_centroid_finetuning_moves_shared_values_together(mlp, toy_data):
    state = CompressionState()
    prune(mlp, state, sparsity=0.5, run=RunContext(train_data=toy_data))
    cluster(mlp, state, bits=2)
    codes = state.params["0.weight"].codes.clone()
    before = state.params["0.weight"].codebook.clone()
    train(mlp, state, RunContext(train_data=toy_data), epochs=2, lr=1e-2)
    st = state.params["0.weight"]
    assert not torch.equal(st.codebook, before)
    assert torch.equal(st.codes, codes)
    w = mlp[0].weight.detach()
    assert torch.equal(w, st.codebook[codes] * st.mask)  # every weight is still its centroid
    assert len(torch.unique(w[w != 0])) <= 4


def test_quantize_per_channel_error_bound(mlp):
    w0 = mlp[0].weight.detach().clone()
    state = CompressionState()
    quantize(mlp, state, bits=4)
    st = state.params["0.weight"]
    err = (mlp[0].weight.detach() - w0).abs()
    s = st.scale[:, None]  # signed: each channel's largest weight falls on code -8
    z = w0 / s
    inside = (z >= -8) & (z <= 7)
    assert (err[inside] <= (s.abs() / 2 + 1e-7).expand_as(err)[inside]).all()  # half a step inside the grid
    edge = z.clamp(-8, 7) * s
    assert torch.allclose(err[~inside], (w0 - edge).abs()[~inside])  # clipped to the edge
    assert st.codes.min() == -8 and st.codes.max() <= 7  # all 16 codes of 4 bits
    # the clip ratio is chosen per channel; the 16-level grid beats plain max|w| / 7 scaling in squared error
    plain = symmetric_scale(w0, 4)[:, None]
    plain_err = ((torch.round(w0 / plain).clamp(-7, 7) * plain - w0) ** 2).sum(1)
    assert (err ** 2).sum() < 0.95 * plain_err.sum()


def test_quantization_aware_finetuning_stays_on_grid(mlp, toy_data):
    state = CompressionState()
    quantize(mlp, state, bits=4)
    train(mlp, state, RunContext(train_data=toy_data), epochs=1, lr=1e-2)
    st = state.params["0.weight"]
    w = mlp[0].weight.detach()
    assert torch.equal(w, st.codes.float() * st.scale[:, None])
