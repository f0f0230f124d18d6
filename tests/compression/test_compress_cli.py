"""`zoo compress`: every bad option is a one-line error naming it, and the folder it writes is one
that `zoo generate`, `zoo info` and AutoModelForCausalLM take as they are."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from zoo.app.cli import main
from zoo.compression import QuantizedLinear

BAD = [
    ([], r"give --weights \(int8, int4, q8_0, q4_0, q4_1\), --prune \(magnitude, wanda, "
     r"sparsegpt\) and / or --kv \(float, int8, int4\)"),
    (["--weights", "int3"], r"--weights int3: allowed: int8, int4, q8_0, q4_0, q4_1"),
    (["--weights", "q4_1", "--group-size", "64"], r"--group-size 64: --weights q4_1 stores "
     r"GGUF's blocks of 32"),
    (["--weights", "q8_0", "--method", "gptq"], r"--method gptq: --weights q8_0 is gguf's own"),
    (["--kv", "int2"], r"--kv int2: allowed: float, int8, int4"),
    (["--weights", "int4", "--group-size", "48"], r"--group-size 48: int4 takes 32, 64, 128"),
    (["--weights", "int8", "--group-size", "32"],
     r"--group-size 32: int8 is per output channel; group_size applies to int4"),
    (["--prune", "magnitude", "--group-size", "32"], r"--group-size 32: applies to --weights int4"),
    (["--prune", "obs"], r"--prune obs: allowed: magnitude, wanda, sparsegpt"),
    (["--method", "gptq"], r"--method gptq: applies to --weights"),
    (["--prune", "wanda", "--method", "gptq"], r"--method gptq: applies to --weights"),
    (["--weights", "int4", "--method", "awq"], r"--method awq: allowed: rtn, gptq"),
    (["--prune", "sparsegpt", "--calibration", "0"], r"--calibration 0: must be a positive"),
    (["--prune", "magnitude", "--sparsity", "1.5"], r"--sparsity 1\.5: a fraction must lie in"),
    (["--prune", "magnitude", "--sparsity", "0"], r"--sparsity 0: a fraction must lie in"),
    (["--prune", "magnitude", "--sparsity", "4:4"], r"--sparsity 4:4: N:M keeps N of every M "
     r"inputs, so it needs 0 < N < M"),
    (["--weights", "int8", "--sparsity", "0.5"], r"--sparsity 0\.5: applies with --prune"),
    (["--prune", "wanda", "--calibration", "0"], r"--calibration 0: must be a positive"),
    (["--weights", "int8", "--eval-tokens", "-1"], r"--eval-tokens -1: must be >= 0"),
    # found once the model is loaded
    (["--weights", "int4", "--group-size", "128"], r"--group-size 128: does not divide the input "
     r"width 64 of model\.layers\.0\.mixer\.q_proj"),
    (["--prune", "magnitude", "--sparsity", "1:3"], r"--sparsity 1:3: M=3 does not divide the "
     r"input width 64 of model\.layers\.0\.mixer\.q_proj"),
    (["--weights", "int8", "--skip", "*.nope"], r"--skip \*\.nope: matches no linear layer"),
    (["--prune", "magnitude", "--skip", "*"], r"--prune magnitude: the model has no linear layer "
     r"to prune"),
]


@pytest.mark.parametrize(("options", "message"), BAD,
                         ids=[" ".join(options) or "nothing" for options, _ in BAD])
def test_bad_options_are_one_line_errors_naming_the_option(tmp_path, capsys, options, message):
    out = tmp_path / "out"
    assert main(["compress", "attention-tiny", str(out), *options]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("zoo compress: error: ")
    assert re.search(message, error), error
    assert not out.exists()


def test_int4_on_a_layer_narrower_than_the_group_names_it_and_the_way_out(tmp_path, capsys):
    assert main(["compress", "mamba-tiny", str(tmp_path / "out"), "--weights", "int4"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ("--group-size 32: does not divide the input width 4 of model.layers.0.mixer.dt_proj"
            in error and "(skip '*.dt_proj')" in error)
    assert main(["compress", "mamba-tiny", str(tmp_path / "out"), "--weights", "int4",
                 "--skip", "*.dt_proj"]) == 0


def test_a_folder_that_holds_something_else_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["compress", "attention-tiny", str(tmp_path), "--weights", "int8"]) == 2
    assert "exists and is not empty; name a new folder" in capsys.readouterr().err
    assert main(["compress", "attention-tiny", str(tmp_path), "--weights", "int8",
                 "--overwrite"]) == 2  # --overwrite replaces model folders only
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_compress_then_generate_info_and_from_pretrained(tmp_path, capsys, monkeypatch):
    """Wanda 2:4 then int4 on attention-tiny, calibrated on the default corpus (tokenised into
    a cache under tmp_path), evaluated before and after on its held-out split."""
    import zoo.train.data

    monkeypatch.setattr(zoo.train.data, "default_cache_dir", lambda: tmp_path / "tokens")
    out = tmp_path / "tiny-24-int4"
    assert main(["compress", "attention-tiny", str(out), "--prune", "wanda", "--sparsity", "2:4",
                 "--weights", "int4", "--calibration", "1024", "--eval-tokens", "1024"]) == 0
    printed = capsys.readouterr().out
    assert "pruned 14 linear layers (wanda, 2:4): 50.0% of their weights are zero" in printed
    assert "quantised 15 linear layers to int4 in groups of 32" in printed
    assert "held-out perplexity over 1,022 tokens" in printed

    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.lm_head, QuantizedLinear)
    q_proj = model.model.layers[0].mixer.q_proj.dequantize()
    assert ((q_proj.view(q_proj.shape[0], -1, 4) != 0).sum(-1) <= 2).all()

    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "6"]) == 0
    assert "6 generated" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "6",
                 "--dtype", "bfloat16"]) == 0

    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "bytes per weight (15 linear layers int4 in groups of 32 (rtn), the rest float32)" \
        in info
    assert "a decode step reads" in info

    # --overwrite replaces a model folder
    assert main(["compress", "attention-tiny", str(out), "--weights", "int8",
                 "--overwrite"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).lm_head.qweight.dtype == torch.int8


def test_info_of_a_float_model_says_four_bytes_per_weight(capsys):
    assert main(["info", "attention-tiny"]) == 0
    assert "4.000 bytes per weight (float32)" in capsys.readouterr().out


def test_sparsegpt_then_gptq_on_the_command_line(tmp_path, capsys, monkeypatch):
    """SparseGPT 2:4 then GPTQ int8 on mamba-tiny, both calibrated on the default corpus: the
    pattern survives quantisation, and the layers neither could calibrate (dt_proj, whose
    weight Mamba reads directly) are named."""
    import zoo.train.data

    monkeypatch.setattr(zoo.train.data, "default_cache_dir", lambda: tmp_path / "tokens")
    out = tmp_path / "mamba-sparsegpt-gptq"
    assert main(["compress", "mamba-tiny", str(out), "--prune", "sparsegpt", "--sparsity", "2:4",
                 "--weights", "int8", "--method", "gptq", "--calibration", "512"]) == 0
    printed = capsys.readouterr().out
    assert "pruned 6 linear layers (sparsegpt, 2:4): 50.0% of their weights are zero" in printed
    assert "quantised 9 linear layers to int8 per output channel (gptq)" in printed
    for index in range(2):
        assert f"left dense: model.layers.{index}.mixer.dt_proj" in printed
        assert f"rounded to nearest: model.layers.{index}.mixer.dt_proj" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.quantization["method"] == "gptq"
    in_proj = model.model.layers[0].mixer.in_proj.dequantize()
    assert ((in_proj.view(in_proj.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    assert main(["info", str(out)]) == 0
    assert "int8 per output channel (gptq)" in capsys.readouterr().out


def test_gguf_blocks_and_an_int8_kv_cache_from_the_command_line(tmp_path, capsys):
    """--weights q4_1 stores gguf's own Q4_1 blocks, --kv int8 the KV cache format: the folder
    loads with both, and generates."""
    out = tmp_path / "q4_1-kv8"
    assert main(["compress", "attention-tiny", str(out), "--weights", "q4_1", "--kv",
                 "int8"]) == 0
    printed = capsys.readouterr().out
    assert "KV cache: int8" in printed and "(gguf)" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.quantization["method"] == "gguf" and model.config.kv_cache == "int8"
    assert model.model.layers[0].mixer.kv_cache == "int8"
    assert isinstance(model.model.layers[0].mixer.q_proj, QuantizedLinear)
    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "4"]) == 0


def test_kv_on_a_model_without_attention_names_the_option(tmp_path, capsys):
    assert main(["compress", "mamba-tiny", str(tmp_path / "out"), "--kv", "int8"]) == 2
    assert "--kv int8: the model has no softmax-attention layer" in capsys.readouterr().err
