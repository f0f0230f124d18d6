"""Exact resume: a run SIGKILLed mid-way, resumed, then stopped by SIGTERM (which saves a
checkpoint) and resumed again logs the same losses as the same run uninterrupted."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest
import yaml

from zoo.train import Trainer
from zoo.train.checkpoint import list_checkpoints
from zoo.train.config import from_dict
from zoo.train.metrics import eval_records, read_metrics, train_losses


def wait_for_step(process, metrics, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run exited (code {process.returncode}) before step {step}")
        if metrics.exists() and any(r.get("kind") == "train" and r["step"] >= step
                                    for r in read_metrics(metrics.parent)):
            return
        time.sleep(0.02)
    pytest.fail(f"no step {step} within {timeout} s")


@pytest.mark.slow
def test_resume_after_sigkill_and_sigterm_logs_same_losses(tmp_path, text_run, spawn):
    steps = 60
    # 60 steps x 8 sequences over ~300 windows: the data order crosses an epoch boundary.
    config = text_run(tmp_path / "reference", train={"steps": steps, "eval_interval": 15},
                      checkpoint={"interval": 10, "keep_last": 2})
    reference = Trainer(from_dict(config).check(), progress=False)
    try:
        reference.fit()
    finally:
        reference.close()
    assert reference.dataset.num_train * 1 < steps * 8  # more than one epoch

    out = tmp_path / "interrupted"
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({**config, "out_dir": str(out)}))
    metrics = out / "metrics.jsonl"
    argv = [sys.executable, "-m", "zoo.train", str(run_yaml), "--no-progress"]

    # 1. SIGKILL after step 25: the newest checkpoint is step 20 (or 10 if 20 was mid-write).
    first = spawn(argv, tmp_path / "first.log")
    wait_for_step(first, metrics, 25)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    saved = [p.name for p in list_checkpoints(out / "checkpoints")]
    assert saved and saved[-1] in ("step_000020", "step_000030"), saved
    killed_at = max(train_losses(out))

    # 2. Resume; SIGTERM after step 43 saves a checkpoint of the step it stops at.
    second = spawn([*argv, "--resume"], tmp_path / "second.log")
    wait_for_step(second, metrics, 43)
    second.send_signal(signal.SIGTERM)
    assert second.wait(60) == 128 + signal.SIGTERM, (tmp_path / "second.log").read_text()
    stop = [r for r in read_metrics(out) if r["kind"] == "stop"]
    assert stop and stop[-1]["signal"] == "SIGTERM" and 43 <= stop[-1]["step"] < steps
    assert f"step_{stop[-1]['step']:06d}" in [p.name for p in list_checkpoints(out / "checkpoints")]

    # 3. Resume to the end.
    third = spawn([*argv, "--resume"], tmp_path / "third.log")
    assert third.wait(180) == 0, (tmp_path / "third.log").read_text()

    expected, resumed = train_losses(tmp_path / "reference"), train_losses(out)
    assert sorted(resumed) == list(range(1, steps + 1)) and killed_at >= 25
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step
    assert [(r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in eval_records(
        tmp_path / "reference")] == [(r["step"], r["val_loss"]) for r in eval_records(out)]
    events = [r["kind"] for r in read_metrics(out) if r["kind"] in ("resume", "stop", "end")]
    assert events == ["resume", "stop", "resume", "end"], events
    state = json.loads((out / "checkpoints" / f"step_{steps:06d}" / "state.json").read_text())
    assert state["train_state"]["samples_seen"] == steps * 8


def test_cli_resume_gets_out_of_a_damaged_checkpoint_and_refuses_a_changed_lr(tmp_path, capsys):
    """The issue's sequence through `zoo train`: step 6's weights truncated, resumed from step
    3, the run writes step 6 again (not the damaged folder left in place), so the next --resume
    works; a changed optim.lr on resume is an error naming it, not a warning then ignored."""
    from zoo.app import cli

    out = tmp_path / "run"
    sets = [f"out_dir={out}", "model=attention-tiny", "data.source=mqar", "data.vocab_size=32",
            "data.num_kv_pairs=4", "train.steps=6", "train.batch_size=4", "train.seq_len=32",
            "train.eval_interval=0", "train.eval_batches=1", "train.threads=1",
            "checkpoint.interval=3", "checkpoint.keep_last=3"]
    argv = ["train", "demo", "--no-progress", *[a for s in sets for a in ("--set", s)]]
    assert cli.main(argv) == 0
    damaged = out / "checkpoints" / "step_000006" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    capsys.readouterr()
    assert cli.main([*argv, "--resume"]) == 0  # falls back to step 3, saying so
    assert "skipping damaged step_000006" in capsys.readouterr().err
    damaged.write_bytes(damaged.read_bytes()[:1000])
    assert cli.main([*argv, "--resume-from", str(out / "checkpoints" / "step_000006")]) == 2
    assert "step_000006 is corrupt: model.safetensors" in capsys.readouterr().err
    assert cli.main([*argv, "--resume-from", str(out / "checkpoints" / "step_000003")]) == 0
    assert cli.main([*argv, "--resume"]) == 0
    assert "skipping" not in capsys.readouterr().err
    resumes = [r["path"] for r in read_metrics(out) if r["kind"] == "resume"]
    assert resumes[-1] == str(out / "checkpoints" / "step_000006")
    assert cli.main([*argv, "--resume", "--set", "optim.lr=1e-4"]) == 2
    error = capsys.readouterr().err
    assert "optim.lr: checkpoint 0.003, this run 0.0001" in error and error.count("\n") == 1
