"""The attention baseline learns each synthetic task: its held-out loss falls below the loss of
guessing among the possible answers, and its answer accuracy rises well above chance."""

from __future__ import annotations

import math

import pytest

from zoo.train import Trainer
from zoo.train.config import from_dict
from zoo.train.metrics import eval_records

# (data, train settings, number of equally likely answers)
TASKS = {
    "mqar": ({"vocab_size": 32, "num_kv_pairs": 4},
             {"steps": 200, "batch_size": 32, "seq_len": 32}, 16),
    "selective_copying": ({"vocab_size": 16, "num_tokens": 4},
                          {"steps": 200, "batch_size": 32, "seq_len": 32}, 14),
    "induction_heads": ({"vocab_size": 8},
                        {"steps": 500, "batch_size": 64, "seq_len": 16}, 7),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_attention_learns_synthetic_task(task, tmp_path):
    data, train, n_answers = TASKS[task]
    run = from_dict({
        "name": task, "out_dir": str(tmp_path), "model": "attention-tiny",
        "data": {"source": task, **data},
        "optim": {"lr": 1e-2, "warmup_steps": 10},
        "train": {**train, "eval_interval": 100, "eval_batches": 4, "threads": 1},
        "checkpoint": {"interval": 0},
    }).check()
    trainer = Trainer(run, progress=False)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    evals = eval_records(tmp_path)
    first, last = evals[0], evals[-1]
    chance_loss, chance_accuracy = math.log(n_answers), 1 / n_answers
    assert first["step"] == 0 and last["step"] == train["steps"]
    assert last["val_loss"] < first["val_loss"] - 2.0, evals
    assert last["val_loss"] < chance_loss - 0.1, (chance_loss, evals)
    assert last["val_accuracy"] > 2 * chance_accuracy, (chance_accuracy, evals)
    assert summary["val_accuracy"] == last["val_accuracy"]
