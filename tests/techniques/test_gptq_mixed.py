import pytest
import torch
from torch import nn

from modelpress.errors import ModelpressError
from modelpress.state import CompressionState, broadcast_scale
from modelpress.techniques.calibrate import collect_hessians
from modelpress.techniques.gptq import gptq
from modelpress.techniques.mixed import allocate
from modelpress.techniques.quantize import group_scale, quantize, quantize_tensor


def correlated_inputs(n=2048, d=64):
    base = torch.randn(n, 8)
    return base @ torch.randn(8, d) + 0.1 * torch.randn(n, d)


@pytest.mark.parametrize("group", [None, 16])
def test_gptq_keeps_outputs_closer_than_rounding(group):
    x = correlated_inputs()
    w = torch.randn(32, 64)
    H = 2 * x.t() @ x / len(x)
    codes, scale = gptq(w, H, 3, group)
    assert -4 <= codes.min() and codes.max() <= 3 and scale.shape == ((32, 4) if group else (32,))
    wq = codes.float() * broadcast_scale(scale, w, group)
    rs = group_scale(w, 3, group)
    wr = quantize_tensor(w, rs, 3, group).float() * broadcast_scale(rs, w, group)
    err_gptq = ((x @ (w - wq).t()) ** 2).mean()
    err_rtn = ((x @ (w - wr).t()) ** 2).mean()
    assert err_gptq < 0.5 * err_rtn


def test_hessians_are_collected_from_dict_batches():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, input_ids, scale=1.0):
            return self.fc(input_ids * scale)

    net = Net()
    batches = [{"input_ids": torch.randn(3, 5, 4)}, {"input_ids": torch.randn(2, 4), "scale": 2.0}]
    H = collect_hessians(net, {"fc": net.fc}, batches)["fc"]
    x = torch.cat([batches[0]["input_ids"].reshape(-1, 4), 2 * batches[1]["input_ids"]]).double()
    assert torch.allclose(H, 2 * x.t() @ x / 17)


def test_calibration_errors_name_what_is_expected(mlp):
    with pytest.raises(ModelpressError, match="calib_data"):
        quantize(mlp, CompressionState(), bits=4, method="gptq")
    with pytest.raises(ModelpressError, match="empty"):
        quantize(mlp, CompressionState(), bits=4, method="gptq", calib_data=[])
    with pytest.raises(ModelpressError, match="batch 1 could not be passed"):
        quantize(mlp, CompressionState(), bits=4, method="gptq", calib_data=[torch.randn(2, 7)])
    with pytest.raises(ModelpressError, match="nothing to quantize"):
        quantize(nn.Sequential(nn.LayerNorm(4)), CompressionState(), bits=4)


def test_allocation_spends_the_budget_where_error_is_largest():
    sizes = {"a": 100, "b": 100, "c": 1000}
    sens = {"a": 1.0, "b": 0.01, "c": 1.0}
    bits = allocate(sizes, sens, 4, budget_bits=4 * 1200 + 300)
    # per stored bit, a's error is 10x c's and 100x b's: a gets raised first, repeatedly
    assert bits == {"a": 7, "b": 4, "c": 4}
    assert sum(sizes[k] * b for k, b in bits.items()) <= 4 * 1200 + 300
    assert allocate(sizes, sens, 4, budget_bits=4 * 1200) == dict.fromkeys(sizes, 4)


def test_average_bits_are_met_and_vary_by_layer(mlp, toy_data):
    state = CompressionState()
    quantize(mlp, state, bits=3, avg_bits=4.0, calib_data=toy_data)
    widths = {k: st.bits for k, st in state.params.items()}
    n = {k: mlp.get_parameter(k).numel() for k in widths}
    assert sum(widths[k] * n[k] for k in n) <= 4.0 * sum(n.values())
    assert max(widths.values()) > 3


def test_a_megabyte_budget_bounds_code_bits_scales_and_float_tensors(mlp, toy_data):
    state = CompressionState()
    rest_bits = 32 * (64 + 4)  # the biases stay float32
    scale_bits = 16 * (64 + 4)  # one float16 scale per output channel
    budget_mb = (3 * 1536 + 400 + rest_bits + scale_bits) / 8e6  # 3 bits everywhere plus 400 bits to spend
    quantize(mlp, state, bits=3, budget_mb=budget_mb, calib_data=toy_data)
    code_bits = sum(st.bits * mlp.get_parameter(k).numel() for k, st in state.params.items())
    assert 3 * 1536 < code_bits <= 3 * 1536 + 400
    with pytest.raises(ModelpressError, match="smaller than 3 bits for every weight"):
        quantize(mlp, CompressionState(), bits=3, budget_mb=budget_mb / 2, calib_data=toy_data)


def _receptive_fields(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Each output position's inputs, (groups, rows, k), by brute force: the conv's weight picks them."""
    g, k = conv.groups, conv.weight[0].numel()
    picks = []
    for j in range(k):  # a one-hot kernel per input slot of each group reads that slot at every position
        probe = nn.Conv2d(conv.in_channels, g, conv.kernel_size, conv.stride, conv.padding, conv.dilation, g,
                          bias=False, padding_mode=conv.padding_mode)
        with torch.no_grad():
            probe.weight.zero_()
            probe.weight.view(g, k)[:, j] = 1.0
        picks.append(probe(x).permute(1, 0, 2, 3).reshape(g, -1))
    return torch.stack(picks, -1).double()


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(groups=4, dilation=2, padding="same"),
                                dict(groups=8, padding=1, padding_mode="reflect")])
def test_convolution_hessians_are_over_receptive_fields_per_group(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, bias=False, **kw)
    x = torch.randn(2, 8, 9, 9)
    H = collect_hessians(conv, {"c": conv}, [x])["c"]
    rows = _receptive_fields(conv, x)
    assert H.shape == (conv.groups, conv.weight[0].numel(), conv.weight[0].numel())
    assert torch.allclose(H, 2 * rows.transpose(1, 2) @ rows / rows.shape[1])


def test_conv1d_hessian_matches_its_unfolded_inputs():
    conv = nn.Conv1d(3, 4, 5, padding=2)
    x = torch.randn(2, 3, 11)
    H = collect_hessians(conv, {"c": conv}, [x])["c"]
    rows = nn.functional.pad(x, (2, 2)).unfold(2, 5, 1).permute(0, 2, 1, 3).reshape(-1, 15).double()
    assert H.shape == (1, 15, 15) and torch.allclose(H[0], 2 * rows.t() @ rows / len(rows))


@pytest.mark.parametrize("groups", [1, 6])
def test_gptq_on_convolutions_keeps_outputs_closer_than_rounding(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, padding=1, groups=groups, bias=False)
    smooth = nn.functional.avg_pool2d(torch.randn(32, 6, 20, 20), 3, 1, 1) + 0.5  # correlated, nonzero mean
    H = collect_hessians(conv, {"c": conv}, [smooth])["c"]
    w = conv.weight.detach()
    codes, scale = gptq(w, H, 3, None)
    assert codes.shape == w.shape and -4 <= codes.min() and codes.max() <= 3
    wq = codes.float() * broadcast_scale(scale, w)
    rs = group_scale(w, 3, None)
    wr = quantize_tensor(w, rs, 3).float() * broadcast_scale(rs, w)
    out = lambda weight: nn.functional.conv2d(smooth, weight, padding=1, groups=groups)  # noqa: E731
    assert ((out(wq) - out(w)) ** 2).mean() < 0.5 * ((out(wr) - out(w)) ** 2).mean()


def test_inputs_never_active_in_calibration_are_rounded_not_zeroed():
    x = correlated_inputs()
    x[:, :8] = 0.0  # e.g. ReLU units dead on the calibration data but alive on other data
    w = torch.randn(16, 64)
    codes, scale = gptq(w, 2 * x.t() @ x / len(x), 4, None)
    rtn = quantize_tensor(w, scale, 4)
    assert torch.equal(codes[:, :8], rtn[:, :8]) and bool((codes[:, :8] != 0).any())


def test_quantize_gptq_solves_a_cnns_convolutions_on_the_grid():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                        nn.ReLU6(), nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 64, 10))
    batches = [nn.functional.avg_pool2d(torch.randn(16, 3, 8, 8), 3, 1, 1) for _ in range(4)]
    outs = {}
    for method in ("rtn", "gptq"):
        model, state = __import__("copy").deepcopy(net), CompressionState()
        quantize(model, state, bits=4, method=method, calib_data=batches)
        for name in ("0.weight", "2.weight", "4.weight"):
            st, w = state.get(name), model.get_parameter(name)
            assert st.codes.shape == w.shape and -8 <= st.codes.min() and st.codes.max() <= 7
            assert torch.equal(w, st.codes.float() * broadcast_scale(st.scale, w))
        with torch.no_grad():
            outs[method] = sum(((model(b) - net(b)) ** 2).mean() for b in batches)
    assert outs["gptq"] < 0.7 * outs["rtn"]


def test_unbatched_convolution_inputs_count_as_one_image():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 5, 5)
    assert torch.allclose(collect_hessians(conv, {"c": conv}, [x])["c"],
                          collect_hessians(conv, {"c": conv}, [x[None]])["c"])


def test_a_classifiers_sensitivity_weighs_the_classes_that_decide_its_top_1():
    from modelpress.techniques.mixed import sensitivities

    class Scores(nn.Module):  # logits a + b whatever the input: class 0 just ahead of class 1
        def __init__(self, shape):
            super().__init__()
            self.a = nn.Parameter(torch.tensor([2.0, 1.9, -5.0]).expand(*shape, 3).clone())
            self.b = nn.Parameter(torch.zeros(*shape, 3))

        def forward(self, x):
            return self.a + self.b + 0 * x.sum()

    change = {"a": torch.tensor([0.0, 0.0, 2.0]),   # an unlikely class's logit: a large squared error
              "b": torch.tensor([-0.3, 0.3, 0.0])}  # the top-1 flips: a small squared error
    for shape, louder in (((4,), "b"), ((4, 5), "a")):  # class scores: KL; other outputs: relative MSE
        model = Scores(shape)
        sens = sensitivities(model, dict(model.named_parameters()), lambda n, w: w + change[n], [torch.zeros(4)])
        assert max(sens, key=sens.get) == louder, sens


def test_sensitivity_without_per_layer_bits_is_refused():
    from modelpress.recipe import Recipe

    with pytest.raises(Exception, match="add avg_bits or budget_mb, or drop sensitivity"):
        Recipe.from_yaml("stages:\n  - quantize: {bits: 4, sensitivity: layer}\n")
    Recipe.from_yaml("stages:\n  - quantize: {bits: 4, avg_bits: 4.5, sensitivity: layer}\n")  # accepted


def test_act_order_lowers_the_output_error_and_keeps_static_group_scales():
    torch.manual_seed(0)
    x = correlated_inputs() * torch.logspace(-1, 1, 64)[torch.randperm(64)]  # inputs of very different energy
    w = torch.randn(32, 64)
    H = 2 * x.t() @ x / len(x)
    errs = {}
    for order in (False, True):
        codes, scale = gptq(w, H, 3, 16, act_order=order)
        assert -4 <= codes.min() and codes.max() <= 3 and scale.shape == (32, 4)
        errs[order] = float(((x @ (w - codes.float() * broadcast_scale(scale, w, 16)).t()) ** 2).mean())
    assert torch.equal(scale, group_scale(w, 3, 16))  # fixed from the original weight: the file's layout
    assert errs[True] < 0.5 * errs[False]


def test_act_order_permutes_each_group_of_a_grouped_convolution_on_its_own():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, padding=1, groups=3, bias=False)
    x = nn.functional.avg_pool2d(torch.randn(8, 6, 12, 12), 3, 1, 1) * torch.tensor([0.1, 3.0] * 3)[:, None, None]
    H = collect_hessians(conv, {"c": conv}, [x])["c"]  # (3, 18, 18): the batched, gathered permutation
    w = conv.weight.detach()
    mask = (torch.rand(w.shape) > 0.3).float()
    codes, scale = gptq(w, H, 3, None, mask=mask)
    for g in range(3):  # each group alone: one Hessian, permuted in place
        rows = slice(4 * g, 4 * g + 4)
        c, s = gptq(w[rows], H[g], 3, None, mask=mask[rows])
        assert torch.equal(codes[rows], c) and torch.equal(scale[rows], s)
    assert bool((codes[mask == 0] == 0).all())


@pytest.mark.parametrize("kind, bits, expect", [("linear", 4, True), ("linear", 8, False), ("conv", 4, False)])
def test_act_order_by_default_only_for_matrix_weights_below_8_bits(kind, bits, expect):
    from modelpress.state import ParamState
    from modelpress.techniques.quantize import quantize_param

    torch.manual_seed(0)
    layer = nn.Linear(64, 16, bias=False) if kind == "linear" else nn.Conv2d(4, 16, 4, bias=False)
    x = correlated_inputs(512) * torch.logspace(-1, 1, 64)[torch.randperm(64)]
    x = x if kind == "linear" else x.reshape(-1, 4, 4, 4)
    H = collect_hessians(layer, {"l": layer}, [x])["l"]
    st = ParamState()
    quantize_param(layer.weight, st, bits, 16, H.clone(), write_back=False)
    codes = {order: gptq(layer.weight.detach(), H, bits, 16, act_order=order)[0] for order in (False, True)}
    assert not torch.equal(codes[False], codes[True])  # the two orders give different codes here
    assert torch.equal(st.codes, codes[expect])
