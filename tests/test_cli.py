import importlib

import pytest
import torch
from typer.testing import CliRunner

import modelpress as mp
from modelpress.cli import app

runner = CliRunner()


def test_inspect_shows_every_tensor_and_the_total(mlp, toy_data, tmp_path):
    res = mp.compress(mlp, {"stages": [{"prune": {"sparsity": 0.9}}, {"cluster": {"bits": 3}}]})
    path = tmp_path / "m.mpz"
    size = res.save(path)
    out = runner.invoke(app, ["inspect", str(path)], terminal_width=200)
    assert out.exit_code == 0, out.output
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert name in out.output
    assert f"{size:,} bytes in all" in " ".join(out.output.split())


def test_inspect_refuses_a_damaged_file(tmp_path):
    bad = tmp_path / "bad.mpz"
    bad.write_bytes(b"\x89MPZ\x01garbage")
    out = runner.invoke(app, ["inspect", str(bad)])
    assert out.exit_code != 0 and isinstance(out.exception, mp.FormatError)


@pytest.mark.slow
def test_demo_writes_a_loadable_artifact(tmp_path):
    path = tmp_path / "demo.mpz"
    recipe = tmp_path / "quick.yaml"
    recipe.write_text("stages:\n  - prune: {sparsity: 0.9}\n  - cluster: {bits: 4}\n")
    out = runner.invoke(app, ["demo", "--out", str(path), "--recipe", str(recipe), "--epochs", "2",
                              "--trained", str(tmp_path / "fp32.mpz")], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "outputs bitwise identical: True" in " ".join(out.output.split())
    model = mp.load(path)
    assert model(torch.zeros(1, 784)).shape == (1, 10)
    fp32 = mp.load(tmp_path / "fp32.mpz")  # the trained model, as `compare` and `auto` take it
    assert sum(p.numel() for p in fp32.parameters()) == 266_610 and float((fp32[0].weight == 0).float().mean()) < 0.01


@pytest.mark.parametrize("recipe", ["int8", pytest.param("fast", marks=pytest.mark.slow)])
def test_hugging_face_folder_compresses_loads_and_exports(recipe, tmp_path):
    pytest.importorskip("transformers")
    from test_transformers import bert, word_tokenizer

    folder = tmp_path / "tiny-bert"
    words = list("abcdefghijklmnopqrstuvwxyz") + \
        ["the", "a", "is", "of", "to", "and", "in", "for", "on", "with"]
    word_tokenizer(words).save_pretrained(folder)
    model = bert()
    model.save_pretrained(folder)
    out_path = tmp_path / "out.mpz"
    out = runner.invoke(app, ["compress", str(folder), "--recipe", recipe, "-o", str(out_path)], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "min_cos" in out.output and f"wrote {out_path}" in " ".join(out.output.split())
    loaded = mp.load(out_path)
    assert type(loaded).__name__ == "BertModel"
    if recipe == "fast":  # a layer gone, distilled on the built-in text, int8
        assert len(loaded.encoder.layer) == loaded.config.num_hidden_layers == 1
    onnx_path = tmp_path / "out.onnx"
    out = runner.invoke(app, ["export", str(out_path), "--onnx", str(onnx_path)])
    assert out.exit_code == 0, out.output
    assert onnx_path.stat().st_size > 0


def test_a_users_text_file_calibrates_a_hugging_face_folder(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from test_transformers import bert, word_tokenizer

    from modelpress import cli, data

    folder = tmp_path / "tiny-bert"
    words = list("abcdefghijklmnopqrstuvwxyz") + ["the", "of", "and"]  # whole words: vocabulary noise
    word_tokenizer(words).save_pretrained(folder)
    bert().save_pretrained(folder)
    recipes = ["Whisk the eggs with the sugar until pale, then fold in the flour.",
               "Bake for twenty minutes, until a skewer comes out clean and dry."]
    text = tmp_path / "recipes.txt"
    text.write_text("\n\n".join(recipes[i % 2] + f" Step {i}." for i in range(20)), encoding="utf-8")
    seen = []
    real = cli._text_data
    monkeypatch.setattr(cli, "_text_data",
                        lambda folder, model, texts, noise, unseen: seen.append((texts, noise, unseen))
                        or real(folder, model, texts, noise, unseen))
    out = runner.invoke(app, ["compress", str(folder), "--recipe", "int8", "--text", str(text), "-o",
                              str(tmp_path / "o.mpz")], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert seen == [(data.text_file_paragraphs(text), False, None)] and len(seen[0][0]) == 20 and "min_cos" in out.output
    got = {}
    monkeypatch.setattr(importlib.import_module("modelpress.api"), "compress", lambda model, recipe, **k: got.update(k) or (_ for _ in ()).throw(
        mp.ModelpressError("stop here")))
    out = runner.invoke(app, ["compress", str(folder), "--recipe", "int8", "-o", str(tmp_path / "b.mpz")])
    topics, docstrings = data.builtin_domains()  # without --text: pydoc topics to learn from, docstrings held out
    assert seen[1] == (topics, True, docstrings) and "stop here" in str(out.exception)
    assert len(got["val_data"]) == 4 and sum(len(b["input_ids"]) for b in got["val_data"]) == 128
    assert sum(len(b["input_ids"]) for b in got["train_data"]) == 2 * len(topics)  # and their noisy copy
    text.write_text("too short\n\nto use", encoding="utf-8")
    with pytest.raises(mp.ModelpressError, match="0 paragraph"):
        data.text_file_paragraphs(text)
    text.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(mp.ModelpressError, match="not UTF-8 text"):
        data.text_file_paragraphs(text)


def test_a_decoder_folder_loads_as_the_class_its_config_names(tmp_path):
    """A LLaMA folder compresses as LlamaForCausalLM, LM head included, and the result generates; its
    tokenizer has no pad token (as decoders' often do) and the report measures next-token agreement and
    perplexity on held-out text."""
    transformers = pytest.importorskip("transformers")
    from test_transformers import word_tokenizer

    folder = tmp_path / "tiny-llama"
    words = list("abcdefghijklmnopqrstuvwxyz") + ["the", "of"]
    tokenizer = word_tokenizer(words)
    tokenizer.pad_token, tokenizer.eos_token = None, "[SEP]"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(words) + 5, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    out_path = tmp_path / "out.mpz"
    out = runner.invoke(app, ["compress", str(folder), "--recipe", "int8", "-o", str(out_path)], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "agree 1.0000" in out.output and "ppl" in out.output  # the original's own agreement, then int8's
    loaded = mp.load(out_path)
    assert type(loaded).__name__ == "LlamaForCausalLM" and "lm_head.weight" in loaded.state_dict()
    tokens = loaded.generate(torch.tensor([[2, 5, 6]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 7)


def test_unknown_preset_is_named(mlp, tmp_path):
    out = runner.invoke(app, ["compress", "modelpress.data:lenet_300_100", "--recipe", "int9", "-o",
                              str(tmp_path / "x.mpz")])
    assert out.exit_code != 0  # main() turns this error into "error: ..." and exit status 2
    assert "Unknown preset 'int9'" in str(out.exception) and "w4" in str(out.exception)


def test_a_torchscript_archive_is_refused_with_what_to_pass_instead(mlp, tmp_path):
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(mlp), str(path))
    out = runner.invoke(app, ["compress", str(path), "--recipe", "int8", "-o", str(tmp_path / "o.mpz")],
                        terminal_width=300)
    assert out.exit_code != 0
    assert "TorchScript or torch.save archive" in out.output and "package.module:attr" in out.output
    assert not (tmp_path / "o.mpz").exists()


def test_progress_is_plain_lines_when_the_output_is_a_log(monkeypatch):
    from modelpress import cli

    lines, clock = [], [0.0]
    monkeypatch.setattr(cli.console, "print", lambda text, **kw: lines.append(text))
    monkeypatch.setattr(cli.time, "perf_counter", lambda: clock[0])
    live = cli.Live()
    assert live.plain  # under pytest the output is not a terminal
    for i in range(101):  # a step reporting every 0.5 s
        live("prune 1/3", i / 100)
        clock[0] += 0.5
    assert lines[:2] == ["prune 1/3: 0% (0 s)", "prune 1/3: 10% (5 s)"] and len(lines) == 11  # each tenth
    live("finetune", 0.0)  # 0.5 s after the last line: too soon
    clock[0] += 1.0
    live("finetune", 0.1)
    assert lines[11:] == ["finetune: 10% (52 s)"]
    for _ in range(60):  # a long step that reports no change: a line every 10 s all the same
        clock[0] += 0.5
        live("gptq", 0.5)
    assert lines[12:] == ["gptq: 50% (52 s)", "gptq: 50% (62 s)", "gptq: 50% (72 s)"]


@pytest.mark.parametrize("flags,expect", [([], ("local", None)), (["--ray"], ("ray", None)),
                                          (["--ray-address", "ray://head:10001"], ("ray", "ray://head:10001"))])
def test_ray_options_choose_where_compare_and_auto_run(tmp_path, monkeypatch, flags, expect):
    import importlib

    seen = []

    def stop(*args, **kwargs):
        seen.append((kwargs["executor"], kwargs["ray_address"]))
        raise mp.ModelpressError("stopped here")

    for name in ("compare", "auto"):  # (the package's `mp.compare` is the function: patch the module's)
        monkeypatch.setattr(importlib.import_module(f"modelpress.{name}"), name, stop)
    torch.manual_seed(0)
    mp.compress(torch.nn.Sequential(torch.nn.Linear(784, 10)), "stages:\n  - quantize: {bits: 8}\n").save(
        tmp_path / "m.mpz")
    for cmd in (["compare", str(tmp_path / "m.mpz"), "--recipes", "w4", "-o", str(tmp_path / "c")],
                ["auto", str(tmp_path / "m.mpz"), "--max-mb", "1", "-o", str(tmp_path / "a.mpz")]):
        out = runner.invoke(app, [*cmd, "--data", "mnist-image", *flags])
        assert "stopped here" in str(out.exception), out.output
    assert seen == [expect, expect]
