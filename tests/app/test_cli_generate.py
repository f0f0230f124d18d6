"""`zoo generate`: a config name (untrained, said so), a saved directory, streaming."""

import pytest
import torch

from zoo.app.cli import main
from zoo.infer import generate
from zoo.infer.text import ByteTokenizer


def test_generate_from_a_config_says_the_weights_are_untrained(capsys):
    assert main(["generate", "attention-tiny", "--prompt", "Hi", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Hi") and "untrained" in err and "4 generated" in err


def test_generate_from_a_saved_directory_prints_the_greedy_text(tmp_path, capsys, make_model):
    model = make_model("rwkv6-tiny")
    model.save_pretrained(tmp_path)
    tokens = generate(model, ByteTokenizer().encode("héllo"), max_new_tokens=6).tokens[0]
    expected = "héllo" + ByteTokenizer().decode(tokens)
    for extra in ([], ["--stream"]):
        assert main(["generate", str(tmp_path), "--prompt", "héllo", "--max-new-tokens", "6",
                     *extra]) == 0
        out, _ = capsys.readouterr()
        assert out.rstrip("\n") == expected.rstrip("\n")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mamba-tiny", "attention-tiny"])  # inductor; native C++ step
def test_generate_compile_compiles_first_and_prints_the_same_text(name, tmp_path, capsys,
                                                                   make_model):
    """--compile compiles on a few steps of the same request before the timed run, so the
    printed decode speed is decoding's; the text is the eager one."""
    make_model(name).save_pretrained(tmp_path)
    command = ["generate", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "8"]
    assert main(command) == 0
    eager_out, eager_err = capsys.readouterr()
    assert "compiled the decode step" not in eager_err
    assert main([*command, "--compile"]) == 0
    out, err = capsys.readouterr()
    assert out == eager_out
    assert "compiled the decode step in" in err and "8 generated" in err


def test_byte_tokenizer_round_trips_utf8():
    text = "naïve 猫"
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text
    assert max(ByteTokenizer().encode(text)) < 256


def test_a_model_without_tokenizer_and_a_big_vocabulary_is_refused(tmp_path, capsys):
    import zoo

    torch.manual_seed(0)
    zoo.ZooForCausalLM(zoo.load_config("attention-tiny", vocab_size=300)).save_pretrained(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "tokenizer" in capsys.readouterr().err
