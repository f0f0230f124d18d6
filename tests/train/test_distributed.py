"""torchrun on the CPU (gloo, 2 processes): DDP and FSDP2 runs match a 1-process run of the
same global batch, step by step; the checkpoint they write resumes in one process."""

from __future__ import annotations

import sys

import pytest
import yaml

from zoo.train import Trainer
from zoo.train.checkpoint import list_checkpoints
from zoo.train.config import from_dict
from zoo.train.metrics import eval_records, read_metrics, train_losses

STEPS = 12


def torchrun(run_yaml, strategy: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "zoo.train", str(run_yaml), "--set", f"strategy={strategy}",
            "--no-progress", *extra]


def one_process(config: dict) -> None:
    trainer = Trainer(from_dict(config).check(), progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(strategy, tmp_path, text_run, spawn):
    # grad_accum 2 x 2 ranks x 2 sequences = the global batch of 8.
    config = text_run(tmp_path / "one", train={"steps": STEPS, "eval_interval": 6},
                      checkpoint={"interval": 6, "keep_last": 2})
    one_process(config)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({**config, "out_dir": str(tmp_path / "two")}))
    log = tmp_path / "torchrun.log"
    process = spawn(torchrun(run_yaml, strategy), log)
    assert process.wait(300) == 0, log.read_text()[-4000:]

    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(two) == list(range(1, STEPS + 1))
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=2e-5, abs=1e-6), (step, one, two)
    for a, b in zip(eval_records(tmp_path / "one"), eval_records(tmp_path / "two"), strict=True):
        assert a["step"] == b["step"] and b["val_loss"] == pytest.approx(a["val_loss"], rel=2e-5)
    start = [r for r in read_metrics(tmp_path / "two") if r["kind"] == "start"]
    assert start[0]["world_size"] == 2  # rank 0 alone writes the metrics

    # The checkpoint holds full state dicts: DDP's resumes in one process, FSDP's under torchrun
    # again; both continue the run exactly.
    assert [p.name for p in list_checkpoints(tmp_path / "two" / "checkpoints")] == [
        "step_000006", "step_000012"]
    middle = tmp_path / "two" / "checkpoints" / "step_000006"
    if strategy == "ddp":
        trainer = Trainer(from_dict(dict(config, out_dir=str(tmp_path / "resumed"))).check(),
                          progress=False, resume=middle)
        try:
            trainer.fit()
        finally:
            trainer.close()
    else:
        log = tmp_path / "resume.log"
        process = spawn(torchrun(run_yaml, strategy, "--set", f"out_dir={tmp_path / 'resumed'}",
                                 "--resume-from", str(middle)), log)
        assert process.wait(300) == 0, log.read_text()[-4000:]
    after = train_losses(tmp_path / "resumed")
    assert sorted(after) == list(range(7, STEPS + 1))
    for step in after:
        assert after[step] == pytest.approx(one[step], rel=2e-5, abs=1e-6), step
