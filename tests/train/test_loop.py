"""The shared step loop (zoo.train.loop) and run folder (zoo.train.run_folder): when it logs,
evaluates, checkpoints and stops, and one run per folder whoever holds it."""

import signal

import pytest

from zoo.train.config import RunConfigError
from zoo.train.loop import LoopPlan, StopSignals, run_steps
from zoo.train.metrics import MetricsLog, read_metrics
from zoo.train.run_folder import RunFolder


class FakeJob:
    def __init__(self, stop: StopSignals | None = None, stop_at: int | None = None):
        self.step = 0
        self.samples_seen = 0
        self.evals: list[int] = []
        self.saves: list[int] = []
        self.stop, self.stop_at = stop, stop_at

    def train_step(self):
        self.step += 1
        self.samples_seen += 2
        if self.step == self.stop_at:
            self.stop.received = signal.SIGTERM  # as the handler would set it
        return {"loss": float(self.step), "lr": 1e-3}

    def log_eval(self):
        self.evals.append(self.step)
        return {"val_loss": 1.0 / self.step}

    def save(self):
        self.saves.append(self.step)


def _plan(**kw):
    return LoopPlan(**{"name": "t", "steps": 7, "batch_size": 2, "seq_len": 4,
                       "log_interval": 2, "eval_interval": 3, "checkpoint_interval": 2, **kw})


def test_the_loop_logs_evaluates_and_checkpoints_at_its_intervals_before_the_last_step(tmp_path):
    job = FakeJob()
    interrupted, last = run_steps(job, _plan(), MetricsLog(tmp_path), StopSignals(),
                                  progress=False)
    assert interrupted is None and job.step == 7
    assert job.evals == [3, 6] and last == {"val_loss": 1 / 6}
    assert job.saves == [2, 4, 6]  # the caller saves the last step
    train = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 7]
    assert [r["loss"] for r in train] == [1.5, 3.5, 5.5, 7.0]  # averaged over the window
    assert [r["tokens"] for r in train] == [16, 32, 48, 56]


def test_a_stop_signal_ends_the_loop_after_the_current_step(tmp_path):
    stop = StopSignals()
    job = FakeJob(stop, stop_at=3)
    interrupted, _ = run_steps(job, _plan(), MetricsLog(tmp_path), stop, progress=False)
    assert interrupted == "SIGTERM" and job.step == 3


def test_a_stop_received_before_the_loop_takes_no_step(tmp_path):
    """A signal during stage 1 of a distillation stops it before the first KD step."""
    stop = StopSignals()
    stop.received = signal.SIGINT
    job = FakeJob()
    assert run_steps(job, _plan(), MetricsLog(tmp_path), stop, progress=False)[0] == "SIGINT"
    assert job.step == 0
    job.step = 7  # nothing left to do: not an interruption
    assert run_steps(job, _plan(), MetricsLog(tmp_path), stop, progress=False)[0] is None


def test_the_lock_names_the_command_that_holds_the_folder(tmp_path):
    holder = RunFolder(tmp_path, command="zoo distill")
    holder.lock()
    try:
        with pytest.raises(RunConfigError, match="in use by another running zoo distill"):
            RunFolder(tmp_path, command="zoo train").lock()
    finally:
        holder.release()
    again = RunFolder(tmp_path, command="zoo train")
    again.lock()
    again.release()


def test_a_fresh_start_clears_only_the_runs_own_outputs(tmp_path):
    (tmp_path / "checkpoints" / "step_000001").mkdir(parents=True)
    (tmp_path / "final").mkdir()
    (tmp_path / "distill.png").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    folder = RunFolder(tmp_path, outputs=("distill.png",), command="zoo distill")
    folder.claim({"name": "x"}, fresh=True)
    folder.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "notes.txt", "run.yaml"]
