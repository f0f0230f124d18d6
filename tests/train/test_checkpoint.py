"""Checkpoints: atomic, kept to the last N, refused with a clear error when corrupt or from
another model config; the final folder loads with AutoModelForCausalLM."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import zoo  # noqa: F401  (registers the zoo model type)
from zoo.train import CheckpointError, RunConfigError, Trainer
from zoo.train.checkpoint import latest_checkpoint, list_checkpoints
from zoo.train.config import from_dict
from zoo.train.metrics import read_metrics


def mqar_run(out_dir, steps=4, **model_overrides):
    return from_dict({
        "name": "ckpt", "out_dir": str(out_dir),
        "model": {"config": "attention-tiny", "overrides": model_overrides},
        "data": {"source": "mqar", "vocab_size": 32, "num_kv_pairs": 4},
        "train": {"steps": steps, "batch_size": 4, "seq_len": 32, "eval_interval": 2,
                  "eval_batches": 1, "threads": 1},
        "checkpoint": {"interval": 1, "keep_last": 2},
    }).check()


def fit(run, **kwargs):
    trainer = Trainer(run, progress=False, **kwargs)
    try:
        return trainer, trainer.fit()
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer, summary = fit(mqar_run(out))
    return out, trainer, summary


def test_keeps_the_last_n_and_writes_only_safetensors_and_json(trained):
    out, _, summary = trained
    names = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert names == ["step_000003", "step_000004"]
    assert latest_checkpoint(out / "checkpoints") == summary["checkpoint"]
    files = sorted(p.name for p in summary["checkpoint"].iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "rng.safetensors",
                     "state.json"]
    state = json.loads((summary["checkpoint"] / "state.json").read_text())
    assert state["step"] == 4 and state["train_state"]["samples_seen"] == 16
    assert state["model_config"]["d_model"] == 64


def test_final_folder_loads_with_auto_model(trained):
    out, trainer, summary = trained
    loaded = AutoModelForCausalLM.from_pretrained(summary["final"]).eval()
    ids = torch.randint(0, 32, (2, 32))
    with torch.no_grad():
        expected = trainer.model.eval()(ids, use_cache=False).logits
        assert torch.allclose(loaded(ids, use_cache=False).logits, expected, atol=1e-6)
    assert (out / "loss.png").stat().st_size > 0


def test_a_killed_save_leaves_the_previous_checkpoint(trained, tmp_path):
    out, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    # What a SIGKILL during a save leaves: a temporary folder with half its files.
    half = copy / "checkpoints" / ".step_000005.tmp999"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 10)
    assert latest_checkpoint(copy / "checkpoints").name == "step_000004"
    trainer, summary = fit(mqar_run(copy, steps=5), resume=True)
    assert trainer.resumed_from.name == "step_000004" and summary["step"] == 5
    assert not half.exists()  # the next save cleans it up


def test_corrupt_checkpoint_is_refused_clearly(trained, tmp_path):
    out, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    weights = copy / "checkpoints" / "step_000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = b"\xff" * 100
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="step_000004 is corrupt: model.safetensors does "
                                              "not match the sha256"):
        Trainer(mqar_run(copy), resume=True, progress=False)
    (copy / "checkpoints" / "step_000004" / "state.json").write_text('{"step": 4, "tru')
    with pytest.raises(CheckpointError, match="corrupt: state.json cannot be read"):
        Trainer(mqar_run(copy), resume=True, progress=False)
    # An explicit older checkpoint still resumes.
    trainer = Trainer(mqar_run(copy, steps=5), resume=copy / "checkpoints" / "step_000003",
                      progress=False)
    assert trainer.step == 3
    trainer.close()


def test_checkpoint_from_another_model_config_is_refused(trained, tmp_path):
    out, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    with pytest.raises(CheckpointError, match="another model config; differences: d_model: "
                                              "checkpoint 64, this run 32"):
        Trainer(mqar_run(copy, d_model=32), resume=True, progress=False)


def test_out_dir_holding_a_run_needs_resume_or_overwrite(trained, tmp_path):
    out, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    with pytest.raises(RunConfigError, match="already holds a run"):
        Trainer(mqar_run(copy), progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        Trainer(mqar_run(tmp_path / "empty"), resume=True, progress=False)
    trainer, summary = fit(mqar_run(copy, steps=2), overwrite=True)
    assert [r["kind"] for r in read_metrics(copy)][0] == "start"
    assert [p.name for p in list_checkpoints(copy / "checkpoints")] == ["step_000001",
                                                                        "step_000002"]


def test_one_run_per_out_dir(tmp_path):
    first = Trainer(mqar_run(tmp_path), progress=False)
    try:
        with pytest.raises(RunConfigError, match="in use by another running zoo train"):
            Trainer(mqar_run(tmp_path), overwrite=True, progress=False)
    finally:
        first.close()
