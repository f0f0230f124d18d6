"""Run folders: zoo writes only into a folder it made (or an empty one), --overwrite clears only
zoo's outputs, a run stopped before its first checkpoint gets out with --resume, and a resume
refuses the config changes it cannot honour before any work."""

from __future__ import annotations

import shutil

import pytest

from zoo.app import cli
from zoo.train import CheckpointError, RunConfigError, Trainer
from zoo.train.config import from_dict
from zoo.train.metrics import read_metrics, train_losses
from zoo.train.run_folder import RESUME_MAY_CHANGE, RunFolder


def mqar(out_dir, steps=4, **sections):
    config = {
        "name": "folder", "out_dir": str(out_dir), "model": "attention-tiny",
        "data": {"source": "mqar", "vocab_size": 32, "num_kv_pairs": 4},
        "train": {"steps": steps, "batch_size": 4, "seq_len": 32, "eval_interval": 0,
                  "eval_batches": 1, "threads": 1},
        "checkpoint": {"interval": 2, "keep_last": 2},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return from_dict(config).check()


def fit(run, **kwargs):
    trainer = Trainer(run, progress=False, **kwargs)
    try:
        return trainer, trainer.fit()
    finally:
        trainer.close()


def mqar_args(out_dir) -> list[str]:
    sets = [f"out_dir={out_dir}", "model=attention-tiny", "data.source=mqar",
            "data.vocab_size=32", "data.num_kv_pairs=4", "train.steps=2", "train.batch_size=4",
            "train.seq_len=32", "train.eval_batches=1", "train.threads=1"]
    return [arg for s in sets for arg in ("--set", s)] + ["--no-progress"]


def user_folder(tmp_path):
    """The issue's folder: a person's files, named like two of zoo's outputs."""
    folder = tmp_path / "userdir"
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "notes.txt").write_text("mine")
    (folder / "loss.png").write_bytes(b"my plot")
    return folder


def test_a_folder_zoo_did_not_make_is_refused_with_or_without_overwrite(tmp_path, capsys):
    folder = user_folder(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(RunConfigError, match=r"is not empty and is not a zoo run folder: it "
                                                 r"holds final/, loss.png; .*another out_dir"):
            Trainer(mqar(folder), overwrite=overwrite, progress=False)
    argv = ["train", "demo", *mqar_args(folder)]
    assert cli.main(argv) == 2 and cli.main([*argv, "--overwrite"]) == 2
    assert "userdir' is not empty and is not a zoo run folder" in capsys.readouterr().err
    assert (folder / "final" / "notes.txt").read_text() == "mine"
    assert (folder / "loss.png").read_bytes() == b"my plot"
    assert sorted(p.name for p in folder.iterdir()) == ["final", "loss.png"]  # nothing added


def test_overwrite_clears_only_zoos_outputs_of_a_folder_zoo_made(tmp_path):
    fit(mqar(tmp_path / "run"))
    out = tmp_path / "run"
    assert RunFolder(out).mark() == ("zoo train", ["metrics.jsonl", "loss.png"])
    (out / "notes.txt").write_text("mine")  # a person's file beside the run's
    with pytest.raises(RunConfigError, match=r"already holds a run \(newest checkpoint "
                                             r"step_000004\); pass --resume"):
        Trainer(mqar(out), progress=False)
    fit(mqar(out, steps=1), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert [r["kind"] for r in read_metrics(out)][0] == "start"
    assert sorted(train_losses(out)) == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]


def test_a_distillation_folder_overwritten_by_a_training_run_loses_the_distillation_outputs(
        tmp_path):
    """--overwrite clears the outputs of the command that made the folder, named in its mark."""
    folder = RunFolder(tmp_path, outputs=("distill.png", "summary.json"), command="zoo distill")
    folder.claim({"name": "d"}, fresh=True)
    folder.release()
    for name in ("metrics.jsonl", "distill.png", "summary.json"):
        (tmp_path / name).write_text("{}")
    fit(mqar(tmp_path, steps=1), overwrite=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".lock", "checkpoints", "final", "loss.png", "metrics.jsonl", "run.yaml"]


def test_a_run_folder_made_before_the_mark_resumes_and_is_overwritten(tmp_path):
    """Folders written before zoo marked its runs (no zoo lock file) still resume; --overwrite
    clears one only when nothing but zoo's outputs is in it."""
    out = tmp_path / "old"
    fit(mqar(out))
    (out / ".lock").unlink()
    trainer, summary = fit(mqar(out, steps=5), resume=True)
    assert trainer.resumed_from.name == "step_000004" and summary["step"] == 5
    assert RunFolder(out).mark()[0] == "zoo train"  # marked now
    (out / ".lock").unlink()
    fit(mqar(out, steps=1), overwrite=True)
    assert sorted(train_losses(out)) == [1]
    (out / ".lock").unlink()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunConfigError, match="not a zoo run folder: it holds checkpoints/"):
        Trainer(mqar(out), overwrite=True, progress=False)
    # a resume reads only the checkpoints, so a person's file beside them does not stop it
    trainer, _ = fit(mqar(out, steps=2), resume=True)
    assert trainer.resumed_from.name == "step_000001"


def killed_before_the_first_checkpoint(out):
    trainer = Trainer(mqar(out, checkpoint={"interval": 100}), progress=False)
    step = trainer.train_step

    def step_then_die():
        if trainer.step == 2:
            raise KeyboardInterrupt  # a kill: no checkpoint, two steps in metrics.jsonl
        return step()

    trainer.train_step = step_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
    finally:
        trainer.close()


def test_resume_before_the_first_checkpoint_starts_again_from_step_zero(tmp_path, capsys):
    out = tmp_path / "run"
    killed_before_the_first_checkpoint(out)
    assert sorted(train_losses(out)) == [1, 2] and not (out / "checkpoints").exists()
    # without --resume the run is refused, and the message names the way that now works
    with pytest.raises(RunConfigError, match="stopped before its first checkpoint; pass "
                                             "--resume to start it again from step 0"):
        Trainer(mqar(out), progress=False)
    trainer, summary = fit(mqar(out), resume=True)
    assert trainer.resumed_from is None and summary["step"] == 4
    assert "has no checkpoint (its run stopped before the first); starting again from step " \
           "0" in capsys.readouterr().err
    records = read_metrics(out)
    assert records[0]["kind"] == "start" and "stopped before the first" in records[0]["notes"][0]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]  # once each
    # --resume on a folder that holds no run still refuses, saying how to start one
    with pytest.raises(CheckpointError, match="holds no zoo run to resume .*run without "
                                              "--resume to start one"):
        Trainer(mqar(tmp_path / "empty"), resume=True, progress=False)


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    with pytest.raises(RunConfigError, match="--resume and --overwrite contradict"):
        Trainer(mqar(tmp_path), resume=True, overwrite=True, progress=False)
    assert cli.main(["train", "demo", *mqar_args(tmp_path), "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite contradict" in capsys.readouterr().err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished")
    fit(mqar(out))
    return out


def test_final_weights_without_checkpoints_need_overwrite_not_a_restart(finished, tmp_path):
    """A finished run whose checkpoints were deleted keeps its final weights: neither a fresh
    start nor --resume (which restarts only runs stopped before any result) deletes them."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(RunConfigError, match=r"holds an earlier run's results \(.*final/.*\) "
                                             "and no checkpoint; pass --overwrite"):
        Trainer(mqar(out), progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint to continue from; pass "
                                              "--overwrite"):
        Trainer(mqar(out), resume=True, progress=False)
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("changed,field,old,new", [
    ({"optim": {"lr": 1e-3}}, "optim.lr", "0.003", "0.001"),
    ({"train": {"batch_size": 8}}, "train.batch_size", "4", "8"),
    ({"train": {"seed": 1}}, "train.seed", "0", "1"),
    ({"train": {"precision": "bfloat16"}}, "train.precision", "'float32'", "'bfloat16'"),
    ({"data": {"num_kv_pairs": 2}}, "data.num_kv_pairs", "4", "2"),
])
def test_resume_refuses_a_config_change_it_cannot_honour_before_any_work(
        finished, tmp_path, changed, field, old, new):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    expected = rf"cannot resume from .*step_000004: .*\({field}: checkpoint {old}, this run {new}\)"
    with pytest.raises(CheckpointError, match=expected + "; .*--overwrite"):
        Trainer(mqar(out, steps=6, **changed), resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_resume_takes_the_changes_it_can_honour(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    changed = mqar(out, steps=6, train={"log_interval": 2, "eval_interval": 1},
                   checkpoint={"interval": 1, "keep_last": 3})
    trainer, summary = fit(changed, resume=True)
    assert trainer.resumed_from.name == "step_000004" and summary["step"] == 6
    assert "train.steps 4 -> 6: the learning-rate schedule now ends its cosine at step 6" in (
        capsys.readouterr().err)
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1, 2, 3, 4, 6]
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "eval"] == [4, 5, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_000004", "step_000005", "step_000006"]
    with pytest.raises(CheckpointError, match="train.steps=3 is below its step 6"):
        Trainer(mqar(out, steps=3), resume=True, progress=False)
    assert {"train.steps", "checkpoint.interval", "train.device"} <= RESUME_MAY_CHANGE
    assert not {"optim.lr", "train.seed", "data.paths", "distill.temperature"} & RESUME_MAY_CHANGE
