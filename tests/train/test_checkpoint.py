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
from zoo.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
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


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_damaged_newest_checkpoint_is_skipped_by_resume_and_refused_by_name(
        trained, tmp_path, capsys):
    out, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    newest, older = copy / "checkpoints" / "step_000004", copy / "checkpoints" / "step_000003"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = b"\xff" * 100
    weights.write_bytes(bytes(data))
    # --resume falls back to the newest intact checkpoint, saying which it skipped and why
    trainer = Trainer(mqar_run(copy), resume=True, progress=False)
    trainer.close()
    assert trainer.step == 3 and trainer.resumed_from == older
    said = capsys.readouterr().err
    assert "skipping damaged step_000004" in said and "resuming from step_000003" in said
    assert "model.safetensors does not match the sha256" in said and said.count("\n") == 1
    # --resume-from of the damaged one is an error naming the folder and the file
    with pytest.raises(CheckpointError, match="step_000004 is corrupt: model.safetensors does "
                                              "not match the sha256"):
        Trainer(mqar_run(copy), resume=newest, progress=False)
    (newest / "state.json").write_text('{"step": 4, "tru')
    with pytest.raises(CheckpointError, match="corrupt: state.json cannot be read"):
        Trainer(mqar_run(copy), resume=newest, progress=False)
    # every checkpoint damaged: nothing to fall back to, and the way out is named
    _truncate(older / "optimizer.safetensors")
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged "
                                              r"\(step_000004, step_000003;.*--overwrite"):
        Trainer(mqar_run(copy), resume=True, progress=False)


def test_a_save_replaces_a_damaged_checkpoint_of_its_step(trained, tmp_path):
    """The issue's case: step 4's weights truncated, the run resumed from step 3 writes step 4
    again; the damaged folder must not survive (a later --resume would fail on it)."""
    out, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    _truncate(copy / "checkpoints" / "step_000004" / "model.safetensors")
    fit(mqar_run(copy), resume=copy / "checkpoints" / "step_000003")
    assert verify_checkpoint(copy / "checkpoints" / "step_000004")["step"] == 4
    assert not list((copy / "checkpoints").glob(".step_*"))  # nothing left aside
    trainer = Trainer(mqar_run(copy, steps=5), resume=True, progress=False)
    trainer.close()
    assert trainer.resumed_from.name == "step_000004"


def _save(out, step, run_config, keep_last=5):
    model = {"w": torch.full((2, 2), float(step))}
    return save_checkpoint(
        out, step, model=model, optimizer={"state": {}, "param_groups": []},
        scheduler={}, train_state={"samples_seen": step}, model_config={"d_model": 2},
        run_config=run_config, keep_last=keep_last)


def test_a_save_keeps_an_intact_checkpoint_of_the_same_state_and_replaces_any_other(tmp_path):
    path = _save(tmp_path, 3, {"train": {"steps": 10}})
    inode = path.stat().st_ino
    assert _save(tmp_path, 3, {"train": {"steps": 10}}).stat().st_ino == inode  # kept
    # the same step of a run with another schedule (train.steps changed on resume): replaced
    _save(tmp_path, 3, {"train": {"steps": 20}})
    assert verify_checkpoint(path)["run_config"] == {"train": {"steps": 20}}


def test_a_save_removes_the_later_checkpoints_of_the_run_it_supersedes(tmp_path):
    """Resumed from step 2 with step 9 damaged on disk and keep_last 1: the step-3 save must
    keep itself, not the damaged step 9 that --resume would otherwise skip forever."""
    for step in (2, 9):
        _save(tmp_path, step, {})
    _truncate(tmp_path / "checkpoints" / "step_000009" / "model.safetensors")
    _save(tmp_path, 3, {}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_000003"]


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
