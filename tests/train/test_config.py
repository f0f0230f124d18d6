"""Run configs: YAML + --set overrides into dataclasses; bad values name the field."""

from __future__ import annotations

import pytest
import yaml

from zoo.app import cli
from zoo.train import RunConfigError, load_run_config, shipped_runs
from zoo.train.config import apply_overrides, from_dict, read_run_yaml
from zoo.train.distill import load_distill_config


@pytest.mark.parametrize("assignment, message", [
    ("train.batch_size=0", "train.batch_size=0 must be a positive integer"),
    ("strategy=pipeline", "strategy='pipeline' is not one of none, ddp, fsdp"),
    ("train.precision=fp8", "train.precision='fp8' is not one of float32, bfloat16"),
    ("optim.lr=-1", "optim.lr=-1 must be > 0.0"),
    ("optim.lr=fast", "optim.lr='fast' must be a number"),
    ("data.source=wiki", "data.source='wiki' is not one of text, mqar"),
    ("data.val_fraction=0.9", "data.val_fraction=0.9 must be <= 0.5"),
    ("train.compile=maybe", "train.compile='maybe' must be true or false"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be a positive integer"),
    ("optim.grad_accum=3", "train.batch_size=16 must be divisible by optim.grad_accum (3)"),
    ("train.stepz=3", "unknown run-config field 'train.stepz'; allowed here: steps,"),
    ("trainer.steps=3", "unknown run-config field 'trainer'; allowed here: name, out_dir,"),
    ("train=3", "train=3 must be a mapping with fields steps,"),
    ("optim.lr=.nan", "optim.lr=nan must be a finite number"),
    ("optim.lr=.inf", "optim.lr=inf must be a finite number"),
    ("optim.lr='1e-3'", "optim.lr='1e-3' must be a number"),
    ("train.steps=[1", "--set train.steps, line 1, column 3: not valid YAML"),
    ("model.overrides.n_layers=0",
     "model (config 'attention-tiny' with model.overrides): n_layers=0 must be a positive"),
    ("model.overrides.mixer={type: attention, n_heads: 0}",
     "model (config 'attention-tiny' with model.overrides): config.mixer.n_heads=0 must be"),
    ("model.config=no-such-model", "model (config 'no-such-model'): 'no-such-model' is neither"),
])
def test_bad_run_config_names_the_field(assignment, message):
    with pytest.raises(RunConfigError) as error:
        load_run_config(None, [assignment])
    assert message in str(error.value)


def test_set_overrides_nested_fields_and_parses_values():
    run = load_run_config("mqar", ["train.steps=7", "optim.lr=1e-3",
                                   "model.overrides.n_layers=3", "data.paths=[a.py, b]"])
    assert run.train.steps == 7
    assert run.optim.lr == 1e-3  # a number, though YAML 1.1 would read 1e-3 as a string
    assert run.model.config == "attention-tiny" and run.model.overrides == {"n_layers": 3}
    assert run.data.paths == ["a.py", "b"]
    assert run.name == "mqar"


def test_model_shorthand_and_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": "attention-small", "train": {"steps": 3}}))
    run = load_run_config(path, ["model.overrides.d_model=32"])
    assert run.model.config == "attention-small" and run.model.overrides == {"d_model": 32}
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_strategy_none_refuses_several_ranks_and_batch_must_split_over_ranks():
    with pytest.raises(RunConfigError, match="strategy='none' cannot run on 2 ranks"):
        load_run_config(None, world_size=2)
    with pytest.raises(RunConfigError, match=r"x ranks \(3\)"):
        load_run_config(None, ["strategy=ddp"], world_size=3)


def test_shipped_runs_are_valid():
    names = shipped_runs()
    for name in ("demo", "mqar", "selective-copying", "induction-heads"):
        assert name in names
        load_run_config(name)


def test_unknown_run_and_missing_file_are_clear(tmp_path):
    with pytest.raises(RunConfigError, match="neither a YAML file nor a shipped run config"):
        load_run_config("no-such-run")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")


def test_bad_model_override_is_named_by_the_run_config_check(tmp_path):
    run = from_dict({"out_dir": str(tmp_path), "model": {"config": "attention-tiny",
                     "overrides": {"d_model": -4}}, "data": {"source": "mqar"}})
    with pytest.raises(RunConfigError, match="d_model=-4 must be a positive integer"):
        run.check()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "{}\n"])
def test_empty_run_yaml_is_an_error_not_the_default_run(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(RunConfigError, match="run.yaml: the run config is empty"):
        load_run_config(path)


def test_run_yaml_syntax_error_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: x\ntrain: {steps: 3\n")
    with pytest.raises(RunConfigError, match=r"run.yaml, line 3, column 1: not valid YAML"):
        load_run_config(path)


def test_exponent_numbers_are_floats_in_run_yaml_and_its_model_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {config: attention-tiny, overrides: {norm_eps: 1e-6}}\n"
                    "optim: {lr: 3e-4}\n")
    run = load_run_config(path)
    assert run.optim.lr == 3e-4 and run.model.overrides["norm_eps"] == 1e-6


@pytest.mark.parametrize("assignment, message", [
    ("student.linearize.mixer={type: window_linear_attention, window: 0}",
     "student.linearize.mixer.window=0 must be an integer >= 1"),
    ("student.linearize.mixer={type: linear_attention, n_heads: -4}",
     "student.linearize.mixer.n_heads=-4 must be an integer >= 1 or null"),
    ("student.linearize.mixer=nope", "student.linearize.mixer.type='nope' is not registered"),
    ("distill.temperature=.nan", "distill.temperature=nan must be a finite number"),
])
def test_bad_distill_student_is_named_before_any_work(assignment, message):
    with pytest.raises(RunConfigError) as error:
        load_distill_config("smollm2-lolcats", [assignment])
    assert message in str(error.value)


def test_bad_distill_student_config_override_is_named():
    with pytest.raises(RunConfigError, match=r"student \(config 'attention-tiny' with student."
                       r"overrides\): config.mixer.n_heads=0 must be"):
        load_distill_config("smollm2-lolcats", [
            "student.linearize=null", "student.config=attention-tiny",
            "student.overrides.mixer={type: attention, n_heads: 0}",
            "distill.trainable=null"])


def test_shipped_distill_runs_are_valid():
    for name in shipped_runs():
        if "teacher" in read_run_yaml(name):
            load_distill_config(name)


def test_cli_reports_a_bad_field_without_a_traceback(capsys):
    assert cli.main(["train", "mqar", "--set", "train.seq_len=-1"]) == 2
    err = capsys.readouterr().err
    assert "train.seq_len=-1 must be a positive integer" in err and "Traceback" not in err
