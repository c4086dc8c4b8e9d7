"""Crafted .mpz files (valid checksums) against the real load, inspect and CLI, in a child process
with the network blocked and prompts refused: each must be refused with a modelpress error, in
bounded time and memory, having asked nothing and reached nothing."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
from hostile import (file_bytes, hf_file, huge_tensor, linear_file, remote_code_llava_config, run_cases,
                     tiny_bert_config, write_cases)
from torch import nn

from modelpress.format.mpz import encode_model, load
from modelpress.state import CompressionState

MAX_SECONDS = 5      # the bound is 1 s; the benchmark prints the real figures, this catches hangs
MAX_PEAK_MB = 200


def _entry_edit(**edits):
    """A small Linear's file with its weight entry edited."""
    manifest, streams = linear_file()
    manifest["tensors"]["weight"].update(edits)
    return manifest, streams


def _arch_edit(arch):
    manifest, streams = linear_file()
    manifest["arch"] = arch
    return manifest, streams


def _raw_as(dtype: str, itemsize: int):
    """The Linear's weight stored raw in another dtype (same element count)."""
    manifest, streams = linear_file()
    key = next(k for k in streams if k.startswith("1/"))
    manifest["tensors"]["weight"] = {"shape": [3, 4], "dtype": dtype, "kind": "raw"}
    streams = {k: v for k, v in streams.items() if not k.startswith("1/")} | {"1/data": b"\x01" * 12 * itemsize}
    assert key.startswith("1/")
    return manifest, streams


HUGE = [2 ** 17, 2 ** 17]  # 2**34 values: 64 GB of float32 from files of ~100 bytes

CRAFTED = {
    # 3. tiny file, huge tensor
    "huge_codebook_constant_codes": lambda: huge_tensor("cb", HUGE),
    "huge_all_zero_mask": lambda: huge_tensor("sp", HUGE),
    "huge_ans_skewed_table": lambda: huge_tensor("ans", HUGE),
    "huge_int8_constant": lambda: huge_tensor("ent", HUGE),
    "just_over_the_floor": lambda: huge_tensor("cb", [2048, 2049]),
    "huge_behind_padded_header": lambda: _padded(huge_tensor("cb", [2 ** 14, 2 ** 14])),
    # 4. constructors as an allocation channel
    "ctor_device_cpu": lambda: linear_file(in_features=20000, out_features=20000, device="cpu"),
    "ctor_dtype": lambda: linear_file(dtype="float64"),
    "ctor_private_arg": lambda: linear_file(_weight=None),
    "ctor_unknown_arg": lambda: linear_file(evil=1),
    "ctor_huge_int": lambda: linear_file(in_features=2 ** 62),
    "ctor_long_string": lambda: _arch_edit({"t": "GELU", "a": {"approximate": "x" * 100_000}}),
    "ctor_huge_meta_layer": lambda: linear_file(in_features=2 ** 20, out_features=2 ** 20),
    "padding_beyond_kernel": lambda: _arch_edit({"t": "Conv2d", "a": {"in_channels": 1, "out_channels": 1,
                                                                     "kernel_size": 3, "padding": 50}}),
    "pool_padding_huge": lambda: _arch_edit({"t": "MaxPool2d", "a": {"kernel_size": 2 ** 20, "padding": 2 ** 19}}),
    "many_modules": lambda: _arch_edit({"t": "Sequential", "c": [{"t": "Identity", "a": {}}] * 30_000}),
    "bert_20000_layers": lambda: hf_file("BertModel", tiny_bert_config(num_hidden_layers=20000)),
    "bert_2e26_positions": lambda: hf_file("BertModel", tiny_bert_config(max_position_embeddings=2 ** 26)),
    "bert_huge_vocab": lambda: hf_file("BertModel", tiny_bert_config(vocab_size=2 ** 40)),
    # 1. remote code, 2. network
    "remote_code_subconfig": lambda: hf_file("LlavaForConditionalGeneration", remote_code_llava_config()),
    "remote_code_top_level": lambda: hf_file("BertModel", tiny_bert_config(auto_map={"AutoModel": "a/b--m.M"})),
    "trust_remote_code": lambda: hf_file("BertModel", tiny_bert_config(trust_remote_code=True)),
    "hub_backbone": lambda: hf_file("DetrModel", {"model_type": "detr", "use_timm_backbone": False,
                                                  "backbone": "microsoft/resnet-50", "use_pretrained_backbone": True}),
    "hub_backbone_config_only": lambda: hf_file("DetrModel", {"model_type": "detr", "use_timm_backbone": False,
                                                              "backbone": "microsoft/resnet-50",
                                                              "use_pretrained_backbone": False}),
    "pretrained_timm_backbone": lambda: hf_file("DetrModel", {"model_type": "detr", "use_timm_backbone": True,
                                                              "backbone": "resnet50", "use_pretrained_backbone": True}),
    "hub_attention_kernel": lambda: hf_file("BertModel", tiny_bert_config(
        attn_implementation="kernels-community/flash-attn")),
    "quantizer": lambda: hf_file("BertModel", tiny_bert_config(quantization_config={"quant_method": "bitsandbytes"})),
    "deep_config": lambda: hf_file("BertModel", tiny_bert_config(x=_nest(40))),
    # 5. other exceptions from checksum-valid headers
    "dtype_not_a_string": lambda: _entry_edit(dtype=["f32"]),
    "dtype_int": lambda: _entry_edit(dtype=7),
    "shape_bool": lambda: _entry_edit(shape=[True, 4]),
    "shape_list": lambda: _entry_edit(shape=[[3], 4]),
    "shape_float": lambda: _entry_edit(shape=[3.0, 4]),
    "shape_negative": lambda: _entry_edit(shape=[-3, -4]),
    "kind_list": lambda: _entry_edit(kind=["raw"]),
    "int_dtype_for_float_weight": lambda: _raw_as("i32", 4),
    "bool_dtype_for_float_weight": lambda: _raw_as("bool", 1),
    "f16_weight": lambda: _raw_as("f16", 2),
    "f64_weight": lambda: _raw_as("f64", 8),
    "arch_list": lambda: _arch_edit([1, 2]),
    "arch_type_list": lambda: _arch_edit({"t": ["Linear"], "a": {}}),
    "arch_deep_tuple": lambda: _arch_edit({"t": "Linear", "a": {"in_features": _nest(200, "tuple")}}),
    "swap_class_list": lambda: hf_file("BertModel", tiny_bert_config(), {"pooler.dense": {"t": ["Linear"], "a": {}}}),
    "swap_at_parameter": lambda: hf_file("BertModel", tiny_bert_config(), {
        "pooler.dense.weight": {"t": "Linear", "a": {"in_features": 8, "out_features": 8}}}),
    "swap_at_private": lambda: hf_file("BertModel", tiny_bert_config(), {
        "_modules": {"t": "Linear", "a": {"in_features": 8, "out_features": 8}}}),
    "swap_name_not_str_path": lambda: hf_file("BertModel", tiny_bert_config(), {
        "pooler..dense": {"t": "Linear", "a": {"in_features": 8, "out_features": 8}}}),
    "alias_to_list": lambda: _entry_edit(kind="alias", of=["bias"]),
    "entry_not_a_dict": lambda: ({**linear_file()[0], "tensors": {"weight": [1]}}, linear_file()[1]),
    "rich_markup_in_name": lambda: _renamed("[/bold][link=x]"),
}


TENSOR_ATTACKS = {n for n in CRAFTED if n.startswith(("huge_", "dtype_", "shape_", "kind_", "alias_", "entry_"))} | {
    "just_over_the_floor"}


def _nest(depth: int, key: str | None = None):
    v = 1
    for _ in range(depth):
        v = {key: [v]} if key else {"a": v}
    return v


def _padded(file, chars: int = 3_000_000):
    """Incompressible junk in the header: a 1.5 MB file whose streams are a few bytes."""
    manifest, streams = file
    manifest["meta"]["pad"] = f"{random.Random(0).getrandbits(4 * chars):x}"
    return manifest, streams


def _renamed(name: str):
    manifest, streams = linear_file()
    manifest["tensors"][name] = manifest["tensors"].pop("bias")
    return manifest, streams


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crafted")
    cases = write_cases(folder, {name: make() for name, make in CRAFTED.items()})
    return run_cases(cases)


@pytest.mark.parametrize("op", ["load", "inspect"])
@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_file_is_refused_quickly_with_a_modelpress_error(results, name, op):
    r = results[f"{name}/{op}"]
    if r["error"] is None:  # inspect reads the tensors only; an odd name is an attack on the CLI (below)
        assert name == "rich_markup_in_name" or op == "inspect" and name not in TENSOR_ATTACKS, \
            f"{name}: {op} accepted the file"
        return
    assert r["modelpress"], f"{name}: {op} raised {r['module']}.{r['error']}: {r['message']}\n{r['trace']}"
    assert r["events"] == [], f"{name}: {op} tried {r['events']}"
    assert r["seconds"] < MAX_SECONDS, f"{name}: {op} took {r['seconds']:.1f} s"
    assert r["peak_mb"] < MAX_PEAK_MB, f"{name}: {op} peaked at {r['peak_mb']:.0f} MB above its start"


EXPECTED = {  # the error class says which defence caught it
    "huge_codebook_constant_codes": "LimitExceeded", "huge_all_zero_mask": "LimitExceeded",
    "huge_ans_skewed_table": "LimitExceeded", "huge_int8_constant": "LimitExceeded",
    "just_over_the_floor": "LimitExceeded",
    "huge_behind_padded_header": "LimitExceeded", "ctor_huge_meta_layer": "LimitExceeded",
    "many_modules": "LimitExceeded", "bert_20000_layers": "LimitExceeded", "bert_2e26_positions": "LimitExceeded",
    "ctor_device_cpu": "UnsafeArchitecture", "ctor_dtype": "UnsafeArchitecture", "ctor_private_arg": "UnsafeArchitecture",
    "ctor_unknown_arg": "UnsafeArchitecture", "ctor_huge_int": "UnsafeArchitecture",
    "ctor_long_string": "UnsafeArchitecture",
    "padding_beyond_kernel": "UnsafeArchitecture", "pool_padding_huge": "UnsafeArchitecture", "remote_code_subconfig": "UnsafeArchitecture",
    "remote_code_top_level": "UnsafeArchitecture", "trust_remote_code": "UnsafeArchitecture",
    "hub_backbone": "UnsafeArchitecture", "hub_backbone_config_only": "UnsafeArchitecture",
    "pretrained_timm_backbone": "UnsafeArchitecture",
    "hub_attention_kernel": "UnsafeArchitecture", "quantizer": "UnsafeArchitecture",
    "int_dtype_for_float_weight": "ModelMismatch", "bool_dtype_for_float_weight": "ModelMismatch",
    "f16_weight": "ModelMismatch", "f64_weight": "ModelMismatch",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_class_is_caught_by_its_defence(results, name):
    assert results[f"{name}/load"]["error"] == EXPECTED[name], results[f"{name}/load"]["message"]


def test_limit_message_says_how_to_raise_it(results):
    assert "max_bytes" in results["huge_all_zero_mask/load"]["message"]


def test_default_configs_with_local_backbones_pass_the_config_check():
    import transformers

    from modelpress.format.guard import check_hf_config

    for name in ("DetrConfig", "MaskFormerConfig", "LlavaConfig", "BertConfig", "GPT2Config", "LlamaConfig"):
        check_hf_config(json.loads(getattr(transformers, name)().to_json_string(use_diff=False)))


def test_the_remote_code_case_does_ask_without_the_defence():
    """Control: transformers itself prompts for the remote-code sub-config, so the case above is real."""
    import builtins

    import transformers

    asked = []

    def fake_input(*_):
        asked.append(True)
        return "n"

    config = transformers.LlavaConfig.from_dict(remote_code_llava_config())
    saved, builtins.input = builtins.input, fake_input
    try:
        with torch.device("meta"), pytest.raises(ValueError):
            transformers.LlavaForConditionalGeneration(config)
    finally:
        builtins.input = saved
    assert asked


def test_a_file_over_the_default_limit_loads_when_the_caller_raises_it(tmp_path):
    model = nn.Linear(2100, 2100, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    state = CompressionState()
    from modelpress.state import ParamState
    state.params["weight"] = ParamState(mask=torch.zeros(2100, 2100, dtype=torch.bool))
    path = tmp_path / "zeros.mpz"
    path.write_bytes(file_bytes(*encode_model(model, state)))
    assert path.stat().st_size < 1000
    from modelpress.errors import LimitExceeded
    with pytest.raises(LimitExceeded, match="max_bytes"):
        load(path)
    loaded = load(path, max_bytes=2100 * 2100 * 4)
    assert torch.count_nonzero(loaded.weight) == 0 and loaded.weight.shape == (2100, 2100)


def test_a_skeleton_of_another_dtype_is_refused_by_name(tmp_path):
    path = tmp_path / "f64.mpz"
    path.write_bytes(file_bytes(*_raw_as("f64", 8)))
    from modelpress.errors import ModelMismatch
    with pytest.raises(ModelMismatch, match="weight: file has float64, model has float32"):
        load(path, model=nn.Linear(4, 3))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "modelpress.cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_cli_errors_are_clean_for_missing_damaged_hostile_and_odd_files(tmp_path):
    hostile = tmp_path / "hostile.mpz"
    hostile.write_bytes(file_bytes(*huge_tensor("sp", HUGE)))
    damaged = tmp_path / "damaged.mpz"
    damaged.write_bytes(file_bytes(*linear_file())[:-3])
    markup = tmp_path / "markup.mpz"
    markup.write_bytes(file_bytes(*_renamed("[/bold][link=x]")))
    (tmp_path / "folder.mpz").mkdir()
    for args in (["inspect", str(tmp_path / "missing.mpz")], ["inspect", str(tmp_path / "folder.mpz")],
                 ["inspect", str(hostile)], ["inspect", str(damaged)],
                 ["export", str(hostile), "--onnx", str(tmp_path / "x.onnx"), "--input-shape", "1,4"]):
        out = _cli(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "error:" in out.stdout and "Traceback" not in out.stdout + out.stderr, (args, out.stdout, out.stderr)
    out = _cli("inspect", str(markup))
    assert out.returncode == 0 and "[/bold][link=x]" in out.stdout, out.stdout + out.stderr


def test_cli_refuses_a_model_folder_that_names_remote_code_without_asking(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "attacker/evil--configuration_evil.EvilConfig",
                                           "AutoModel": "attacker/evil--modeling_evil.EvilModel"}}))
    out = _cli("compress", str(folder), "--recipe", "int8", "-o", str(tmp_path / "out.mpz"))
    assert out.returncode == 2 and "error:" in out.stdout, out.stdout + out.stderr
    assert "Do you wish to run" not in out.stdout + out.stderr and "Traceback" not in out.stdout + out.stderr
    assert "trust_remote_code" in " ".join(out.stdout.split())
