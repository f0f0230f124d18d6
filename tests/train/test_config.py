"""Run configs: YAML + --set overrides into dataclasses; bad values name the field."""

from __future__ import annotations

import pytest
import yaml

from zoo.app import cli
from zoo.train import RunConfigError, Trainer, load_run_config, shipped_runs
from zoo.train.config import apply_overrides, from_dict


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
])
def test_bad_run_config_names_the_field(assignment, message):
    with pytest.raises(RunConfigError) as error:
        load_run_config(None, [assignment])
    assert message in str(error.value)


def test_set_overrides_nested_fields_and_parses_values():
    run = load_run_config("mqar", ["train.steps=7", "optim.lr=1e-3",
                                   "model.overrides.n_layers=3", "data.paths=[a.py, b]"])
    assert run.train.steps == 7
    assert run.optim.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string
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


def test_bad_model_override_names_the_model_field(tmp_path):
    run = from_dict({"out_dir": str(tmp_path), "model": {"config": "attention-tiny",
                     "overrides": {"d_model": -4}}, "data": {"source": "mqar"}}).check()
    with pytest.raises(RunConfigError, match="d_model=-4 must be a positive integer"):
        Trainer(run, progress=False)


def test_cli_reports_a_bad_field_without_a_traceback(capsys):
    assert cli.main(["train", "mqar", "--set", "train.seq_len=-1"]) == 2
    err = capsys.readouterr().err
    assert "train.seq_len=-1 must be a positive integer" in err and "Traceback" not in err
