"""Bad configs, generated: a shipped model config or run config with one field or one mixer/FFN
option replaced by a bad value (negative, zero, out of range, a bool, the wrong type, NaN or
infinity, an unknown key, an empty spec) is refused by the config checkers and by the CLI with
one line naming the field (exit code 2, no traceback); a value in range is either held exactly
as given or refused the same way (a combination the mixer cannot build), never replaced by a
default."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoo.app import cli
from zoo.config import ConfigError, ZooConfig, load_config, read_yaml, shipped_configs
from zoo.layers import FFNS, MIXERS
from zoo.layers.registry import POSITIVE, SIZE, Bounds, OptionRule, option_rules
from zoo.train import RunConfigError, load_run_config
from zoo.train.config import RunConfig
from zoo.train.distill import load_distill_config
from zoo.train.distill.config import DistillRunConfig

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# letters only, so that no generated string reads back from YAML as a number or a bool
WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8).filter(
    lambda w: w not in ("y", "n", "yes", "no", "on", "off", "true", "false", "null", "nan",
                        "inf"))

TOP_LEVEL_RULES = {
    "vocab_size": OptionRule(frozenset({"int"}), SIZE),
    "d_model": OptionRule(frozenset({"int"}), SIZE),
    "n_layers": OptionRule(frozenset({"int"}), SIZE),
    "norm": OptionRule(frozenset({"str"}), choices=("rms", "layer")),
    "norm_eps": OptionRule(frozenset({"float"}), POSITIVE),
    "initializer_range": OptionRule(frozenset({"float"}), POSITIVE),
    "embed_norm": OptionRule(frozenset({"bool"})),
    "tie_embeddings": OptionRule(frozenset({"bool"})),
}


# ---------------------------------------------------------------------------------------------
# values a rule refuses, and values it admits


def _numbers_outside(bounds: Bounds, integers: bool) -> st.SearchStrategy:
    outside = [st.just(math.nan)]
    if not bounds.infinite:
        outside += [st.just(math.inf), st.just(-math.inf)]
    if bounds.low is not None:
        outside.append(
            st.integers(-10**6, math.floor(bounds.low) - (0 if bounds.low_open else 1))
            if integers else st.floats(-1e6, bounds.low, exclude_max=not bounds.low_open))
    if bounds.high is not None:
        outside.append(st.floats(bounds.high, 1e6, exclude_min=not bounds.high_open))
    return st.one_of(outside)


def refused_by(rule: OptionRule) -> st.SearchStrategy:
    """Values `rule` must refuse."""
    kinds = rule.kinds
    bad = [st.just([[1]]), st.just({"a": 1})]
    if "bool" not in kinds:
        bad.append(st.booleans())
    if "none" not in kinds:
        bad.append(st.none())
    if "str" not in kinds:
        bad.append(WORDS)
    elif rule.choices:
        bad.append(WORDS.filter(lambda w: w not in rule.choices))
    numeric = kinds & {"int", "float"}
    if not numeric:
        bad += [st.integers(-3, 3), st.floats(-2.5, 2.5)]
    elif rule.bounds is not None:
        bad.append(_numbers_outside(rule.bounds, integers="float" not in kinds))
    if "int" in kinds and "float" not in kinds:  # a float, even a whole one, is not an int
        bad += [st.integers(1, 64).map(float), st.just(2.5)]
    if "pair" in kinds:
        bad += [st.just([1.0]), st.just([1.0, 2.0, 3.0]), st.just([4.0, 1.0]),
                st.just(["a", "b"]), st.just([-1.0, math.nan])]
    else:
        bad.append(st.just([1, 2]))
    return st.one_of(bad)


def admitted_by(rule: OptionRule) -> st.SearchStrategy:
    """Values in `rule`'s range (which a mixer may still refuse in combination)."""
    good = []
    if "none" in rule.kinds:
        good.append(st.none())
    if "bool" in rule.kinds:
        good.append(st.booleans())
    good += [st.just(choice) for choice in rule.choices]
    b = rule.bounds
    if b is not None:
        low = b.low if b.low is not None else -10.0
        high = b.high if b.high is not None else low + 64
        if "int" in rule.kinds:
            good.append(st.integers(math.ceil(low), math.floor(high)).filter(b.admits))
        elif "float" in rule.kinds:
            good.append(st.floats(low, high, exclude_min=b.low_open,
                                  exclude_max=b.high_open).filter(b.admits))
    return st.one_of(good)


# ---------------------------------------------------------------------------------------------
# model configs


def _shipped(name: str) -> dict:
    return read_yaml(name, "zoo.configs", "config")


@st.composite
def bad_model_configs(draw) -> tuple[dict, str]:
    """(a shipped config's fields with one of them made bad, a text its error must contain)."""
    data = _shipped(draw(st.sampled_from(shipped_configs())))
    where = draw(st.sampled_from(["top", "mixer", "ffn", "unknown option", "spec"]))
    if where == "ffn" and not data.get("ffn"):
        where = "mixer"
    if where == "top":
        field = draw(st.sampled_from(sorted(TOP_LEVEL_RULES)))
        data[field] = draw(refused_by(TOP_LEVEL_RULES[field]))
        return data, f"{field}="
    part = "ffn" if where == "ffn" or (where != "mixer" and data.get("ffn") and draw(
        st.booleans())) else "mixer"
    registry = FFNS if part == "ffn" else MIXERS
    spec = dict(data[part]) if isinstance(data[part], dict) else {"type": data[part]}
    if where == "spec":
        data[part] = draw(st.sampled_from([{}, 3, [spec], {"type": None}, {"type": "nope"}]))
        return data, f"config.{part}"
    rules = option_rules(registry[spec["type"]])
    if where == "unknown option":
        option = draw(WORDS.filter(lambda w: w not in rules and w != "type"))
        spec[option] = 1
        data[part] = spec
        return data, f"config.{part}: {part} {spec['type']!r} has no option {option!r}"
    option = draw(st.sampled_from(sorted(rules)))
    spec[option] = draw(refused_by(rules[option]))
    data[part] = spec
    return data, f"config.{part}.{option}="


@SETTINGS
@given(bad_model_configs())
def test_bad_model_config_is_refused_naming_the_field(case):
    data, named = case
    with pytest.raises(ConfigError) as error:
        ZooConfig(**data)
    message = str(error.value)
    assert named in message and "\n" not in message


@SETTINGS
@given(bad_model_configs())
def test_cli_info_on_a_bad_model_yaml_says_one_line_naming_the_field(case):
    data, named = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.yaml"
        path.write_text(yaml.safe_dump(data))
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(["info", str(path)])
    err = stderr.getvalue()
    assert code == 2, f"accepted: {data}"
    assert err.startswith("zoo info: error: ") and err.count("\n") == 1, err
    assert named in err and "Traceback" not in err


@st.composite
def in_range_options(draw) -> tuple[dict, str, str, object]:
    """(a shipped config's fields, "mixer" or "ffn", an option, a value in its range)."""
    data = _shipped(draw(st.sampled_from(shipped_configs())))
    part = draw(st.sampled_from(["mixer", "ffn"] if data.get("ffn") else ["mixer"]))
    registry = FFNS if part == "ffn" else MIXERS
    spec = dict(data[part]) if isinstance(data[part], dict) else {"type": data[part]}
    rules = option_rules(registry[spec["type"]])
    option = draw(st.sampled_from(sorted(rules)))
    if "pair" in rules[option].kinds:
        low = draw(st.floats(0.5, 8.0))
        value = [low, low + draw(st.floats(0.5, 8.0))]
    else:
        value = draw(admitted_by(rules[option]))
    spec[option] = value
    data[part] = spec
    return data, part, option, value


@SETTINGS
@given(in_range_options())
def test_an_option_in_range_is_held_exactly_or_refused_naming_the_spec(case):
    data, part, option, value = case
    try:
        config = ZooConfig(**data)
    except ConfigError as error:  # a combination this mixer cannot build, e.g. n_heads=7
        message = str(error)
        assert re.match(rf"config\.{part} \(layer \d+\): ", message), message
        assert "\n" not in message
        return
    held = getattr(config, part)[option]
    assert held == value and type(held) is type(value), f"{option}={value!r} became {held!r}"


# ---------------------------------------------------------------------------------------------
# run configs and --set


def _section_fields(config_class: type) -> list[tuple[str, dataclasses.Field]]:
    """(dotted name, field) of every scalar field of a run config's sections."""
    found = []
    for section in dataclasses.fields(config_class):
        default = section.default_factory() if callable(section.default_factory) else None
        if dataclasses.is_dataclass(default):
            found += [(f"{section.name}.{f.name}", f) for f in dataclasses.fields(default)]
        else:
            found.append((section.name, section))
    return found


# Every scalar field of a run config refuses these: no int or float field takes a negative
# value, a bool, NaN or a word; a str field takes no number, list or empty string.
BAD_BY_TYPE = {
    "int": st.one_of(st.integers(-10**6, -1), st.booleans(), st.just(2.5), WORDS,
                     st.just([1])),
    "float": st.one_of(st.floats(-1e6, -1e-3), st.just(math.nan), st.just(math.inf),
                       st.booleans(), WORDS, st.just([1.0])),
    "bool": st.one_of(st.integers(0, 3), WORDS, st.just(1.5)),
    "str": st.one_of(st.integers(), st.just(""), st.just([1]), st.just({"a": 1})),
}


def _yaml_text(value: object) -> str:
    """The --set text YAML reads back as `value`."""
    return yaml.safe_dump([value], default_flow_style=True).strip()[1:-1]


@st.composite
def bad_set_options(draw, config_class: type) -> tuple[str, str]:
    """(a --set assignment with a bad value, the dotted field its error must name)."""
    fields = [(name, f) for name, f in _section_fields(config_class)
              if f.type.split(" | ")[0] in BAD_BY_TYPE]
    name, field = draw(st.sampled_from(fields))
    value = draw(BAD_BY_TYPE[field.type.split(" | ")[0]])
    return f"{name}={_yaml_text(value)}", name


@SETTINGS
@given(bad_set_options(RunConfig), st.sampled_from(["mqar", "demo"]))
def test_bad_set_option_is_refused_naming_the_field(case, run_name):
    assignment, field = case
    with pytest.raises(RunConfigError) as error:
        load_run_config(run_name, [assignment])
    message = str(error.value)
    assert field in message and "\n" not in message


@SETTINGS
@given(bad_set_options(DistillRunConfig))
def test_bad_distill_set_option_is_refused_naming_the_field(case):
    assignment, field = case
    with pytest.raises(RunConfigError) as error:
        load_distill_config("smollm2-lolcats", [assignment])
    assert field in str(error.value) and "\n" not in str(error.value)


@st.composite
def bad_model_overrides(draw) -> tuple[str, str]:
    """(a --set model.overrides.* assignment with a bad value, the text its error must hold)."""
    field = draw(st.sampled_from(sorted(TOP_LEVEL_RULES)))
    value = draw(refused_by(TOP_LEVEL_RULES[field]))
    return f"model.overrides.{field}={_yaml_text(value)}", f"{field}="


class _TrainerMustNotStart:
    def __init__(self, *args, **kwargs):
        raise AssertionError("the run config was accepted and a Trainer was built")


@SETTINGS
@given(st.one_of(bad_set_options(RunConfig), bad_model_overrides()))
def test_cli_train_refuses_a_bad_set_before_any_work(case):
    assignment, named = case
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("zoo.train.Trainer", _TrainerMustNotStart)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(["train", "mqar", "--set", assignment])
    err = stderr.getvalue()
    assert code == 2 and err.startswith("zoo train: error: ") and err.count("\n") == 1, err
    assert named in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# explicit cases


@pytest.mark.parametrize("text, named", [
    ("vocab_size: 256\nd_model: 64\nn_layers: 2\nmixer: {type: attention, n_heads: -4}\n",
     "config.mixer.n_heads=-4 must be an integer >= 1 or null (mixer 'attention')"),
    ("vocab_size: 256\nd_model: [64\n", "model.yaml, line 3, column 1: not valid YAML: "
     "expected ',' or ']', but got '<stream end>' (while parsing a flow sequence from line 2, "
     "column 10)"),
    ("", "model.yaml: the config is empty"),
    ("vocab_size: 256\nvocab_size: 512\n", "key 'vocab_size' is given twice (lines 1 and 2)"),
])
def test_cli_info_names_the_field_or_the_file(tmp_path, capsys, text, named):
    path = tmp_path / "model.yaml"
    path.write_text(text)
    assert cli.main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_train_names_a_set_value_that_is_not_yaml(capsys):
    assert cli.main(["train", "mqar", "--set", "train.steps=[1"]) == 2
    err = capsys.readouterr().err
    assert "--set train.steps, line 1, column 3: not valid YAML" in err
    assert err.count("\n") == 1


def test_norm_eps_in_exponent_form_is_a_number_in_model_and_run_configs(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("vocab_size: 256\nd_model: 64\nn_layers: 2\nnorm_eps: 1e-6\n"
                    "mixer: {type: mamba, dt_min: 1e-4, dt_max: 1e-1}\nffn: null\n")
    config = load_config(path)
    assert config.norm_eps == 1e-6 and config.mixer["dt_min"] == 1e-4
    run = load_run_config("mqar", ["model.overrides.norm_eps=1e-6", "optim.eps=1e-9"])
    assert run.model.overrides["norm_eps"] == 1e-6 and run.optim.eps == 1e-9


@pytest.mark.parametrize("text, named", [
    ("", "run.yaml: the run config is empty"),
    ("name: x\ntrain: {steps: 3\n", "run.yaml, line 3, column 1: not valid YAML"),
    ("model: {config: attention-tiny, overrides: {mixer: {type: mamba, d_state: 0}}}\n",
     "config.mixer.d_state=0 must be an integer >= 1 (mixer 'mamba')"),
])
def test_cli_train_names_the_run_file_or_its_field(tmp_path, capsys, monkeypatch, text, named):
    monkeypatch.setattr("zoo.train.Trainer", _TrainerMustNotStart)
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1 and "Traceback" not in err


def test_every_shipped_config_is_held_exactly_as_written():
    for name in shipped_configs():
        data = _shipped(name)
        config = ZooConfig(**data)
        for field, value in data.items():
            held = getattr(config, "tie_word_embeddings" if field == "tie_embeddings" else field)
            if field in ("mixer", "ffn") and isinstance(value, str):
                value = {"type": value}
            assert held == value, f"{name}: {field}={value!r} became {held!r}"
