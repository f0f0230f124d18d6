"""Bad input to `zoo info` and `zoo generate` is one line naming the file, folder, option or
limit, with exit code 2, before any work: no traceback, no token generated, no silent default."""

import json
import math
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoo
from zoo.app.cli import main
from zoo.infer import generate


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_named_error(code: int, out: str, err: str, command: str, *names: str) -> None:
    assert code == 2, (out, err)
    assert out == ""  # nothing printed, nothing generated
    assert "Traceback" not in err
    # transformers' own progress bars ("Loading weights: 100%|...") may come before the error
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"zoo {command}: error: ")
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"


@pytest.fixture
def saved(tmp_path, make_model):
    folder = tmp_path / "model"
    make_model("attention-tiny").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", ["info", "generate"])
def test_an_empty_folder_is_named(command, tmp_path, capsys):
    extra = ["--prompt", "hi"] if command == "generate" else []
    _assert_named_error(*_run(capsys, command, str(tmp_path), *extra), command,
                        str(tmp_path), "no config.json")


@pytest.mark.parametrize("command", ["info", "generate"])
def test_a_folder_without_weights_is_named(command, saved, capsys):
    (saved / "model.safetensors").unlink()
    extra = ["--prompt", "hi"] if command == "generate" else []
    _assert_named_error(*_run(capsys, command, str(saved), *extra), command,
                        str(saved), "no weights")


@pytest.mark.parametrize("command", ["info", "generate"])
def test_a_truncated_weights_file_is_named(command, saved, capsys):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    extra = ["--prompt", "hi"] if command == "generate" else []
    _assert_named_error(*_run(capsys, command, str(saved), *extra), command,
                        str(weights), "truncated")


def test_generate_from_a_folder_that_does_not_match_its_config_is_refused(saved, capsys):
    config = json.loads((saved / "config.json").read_text())
    config["mixer"] = {"type": "rwkv6"}
    (saved / "config.json").write_text(json.dumps(config))
    _assert_named_error(*_run(capsys, "generate", str(saved), "--prompt", "hi"), "generate",
                        "do not match its config.json", "missing (model.layers.0.mixer.")


def test_a_config_json_that_is_not_json_is_named(saved, capsys):
    (saved / "config.json").write_text("{not json")
    _assert_named_error(*_run(capsys, "info", str(saved)), "info", "config.json")


def test_device_cuda_without_cuda_is_named(capsys):
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        _assert_named_error(
            *_run(capsys, "generate", "attention-tiny", "--prompt", "hi", "--device", "cuda"),
            "generate", "device 'cuda'", "use device 'cpu'")


def _hyena(max_len: int) -> zoo.ZooForCausalLM:
    config = zoo.load_config("hyena-tiny")
    torch.manual_seed(0)
    return zoo.ZooForCausalLM(zoo.load_config(
        "hyena-tiny", mixer={**config.mixer, "max_len": max_len})).eval()


def test_a_request_past_a_length_limit_is_refused_before_any_token(tmp_path, capsys):
    model = _hyena(max_len=32)
    assert model.sequence_limit() == (32, "layer 0 (Hyena) max_len")
    prompt = list(range(1, 25))  # 24 tokens
    with mock.patch("zoo.infer.generate.prefill") as prefill:
        for stream in (False, True):
            with pytest.raises(ValueError, match=r"24 tokens \+ max_new_tokens=9 is 33 tokens, "
                                                 r"past this model's limit of 32 \(layer 0 "
                                                 r"\(Hyena\) max_len\); lower max_new_tokens "
                                                 r"to at most 8"):
                generate(model, [prompt, [1]], max_new_tokens=9, stream=stream)
        assert not prefill.called
    # up to the limit exactly, it generates
    assert len(generate(model, prompt, max_new_tokens=8).tokens[0]) == 8

    model.save_pretrained(tmp_path)
    _assert_named_error(
        *_run(capsys, "generate", str(tmp_path), "--prompt", "x" * 30, "--max-new-tokens", "3"),
        "generate", "limit of 32", "max_len")


# Generated bad requests: each names what is wrong in one line; none is a traceback, none
# is silently replaced by a default, and nothing is loaded or generated first.
BAD_OPTIONS = st.one_of(
    st.tuples(st.just("--max-new-tokens"), st.integers(max_value=0)),
    st.tuples(st.just("--temperature"), st.one_of(
        st.floats(max_value=-1e-6), st.sampled_from([math.nan, math.inf]))),
    st.tuples(st.just("--top-k"), st.integers(max_value=0)),
    st.tuples(st.just("--top-p"), st.one_of(
        st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
        st.just(math.nan))),
    st.tuples(st.just("--repetition-penalty"), st.one_of(
        st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf, -math.inf]))),
    st.tuples(st.just("--device"), st.sampled_from(
        ["cuda", "cuda:1", "mps", "meta", "gpu", "cpu:x", "tpu:0"])),
)
NAMES = {"--max-new-tokens": "max-new-tokens", "--temperature": "temperature",
         "--top-k": "top_k", "--top-p": "top", "--repetition-penalty": "repetition",
         "--device": "device"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=BAD_OPTIONS)
def test_generated_bad_requests_are_named_errors(bad):
    flag, value = bad
    with mock.patch.object(torch.cuda, "is_available", return_value=False), \
            mock.patch("zoo.app.generate.load_for_generation") as load, \
            mock.patch("sys.stdout") as stdout, mock.patch("sys.stderr") as stderr:
        code = main(["generate", "attention-tiny", "--prompt", "hi", f"{flag}={value}"])
    assert not load.called
    assert code == 2
    assert not stdout.write.called
    message = "".join(call.args[0] for call in stderr.write.call_args_list)
    assert message.count("\n") == 1 and message.startswith("zoo generate: error: "), message
    assert NAMES[flag] in message, message
