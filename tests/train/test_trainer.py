"""The training loop's parts: schedule, accumulation, bf16 autocast, MoE logging, every shipped
tiny config, and the CLI's --plot."""

from __future__ import annotations

import math

import pytest
import torch

import zoo
from zoo.app import cli
from zoo.train import Trainer
from zoo.train.config import from_dict
from zoo.train.loop import warmup_cosine
from zoo.train.metrics import read_metrics, train_losses


def mqar(out_dir, steps=3, model="attention-tiny", **sections):
    config = {
        "name": "t", "out_dir": str(out_dir), "model": model,
        "data": {"source": "mqar", "vocab_size": 32, "num_kv_pairs": 4},
        "train": {"steps": steps, "batch_size": 8, "seq_len": 32, "eval_interval": 0,
                  "eval_batches": 1, "threads": 1},
        "checkpoint": {"interval": 0},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return from_dict(config).check()


def fit(run):
    trainer = Trainer(run, progress=False)
    try:
        return trainer, trainer.fit()
    finally:
        trainer.close()


def test_warmup_then_cosine():
    f = lambda s: warmup_cosine(s, warmup=10, total=110, min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == 1.0
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    _, one = fit(mqar(tmp_path / "a", steps=4))
    _, two = fit(mqar(tmp_path / "b", steps=4, optim={"grad_accum": 4}))
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)


def test_bf16_autocast_on_the_cpu(tmp_path):
    trainer, summary = fit(mqar(tmp_path, steps=6, train={"precision": "bfloat16"},
                                optim={"lr": 1e-2, "warmup_steps": 1}))
    losses = train_losses(tmp_path)
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[6] < losses[1]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 masters
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = trainer.model(torch.zeros(1, 4, dtype=torch.long), use_cache=False).logits
    assert logits.dtype == torch.bfloat16


def test_moe_aux_loss_and_expert_stats_are_logged_apart(tmp_path):
    fit(mqar(tmp_path, steps=2, model="moe-tiny"))
    records = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(records) == 2
    for r in records:
        assert r["aux_loss"] > 0 and math.isfinite(r["loss"])
        (layer,) = r["moe"].values()  # moe-tiny: one MoE layer
        assert {"tokens_per_expert", "load_balancing_loss", "z_loss"} <= set(layer)
        assert isinstance(layer["tokens_per_expert"], list)


TINY = [name for name in zoo.shipped_configs() if name.endswith("-tiny")]


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_every_tiny_config_trains_and_resumes(name, tmp_path):
    trainer, summary = fit(mqar(tmp_path, steps=2, model=name, checkpoint={"interval": 1}))
    assert math.isfinite(summary["val_loss"]) and summary["final"].is_dir()
    resumed = Trainer(mqar(tmp_path, steps=3, model=name, checkpoint={"interval": 1}),
                      resume=True, progress=False)
    try:
        assert resumed.step == 2
        resumed.fit()
    finally:
        resumed.close()
    assert sorted(train_losses(tmp_path)) == [1, 2, 3]


def test_cli_plot_redraws_the_loss_curves(tmp_path, capsys):
    fit(mqar(tmp_path, steps=2))
    (tmp_path / "loss.png").unlink()
    assert cli.main(["train", "--plot", str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert "loss.png" in capsys.readouterr().out
    assert cli.main(["train", "--plot", str(tmp_path / "nothing")]) == 2


def test_ctrl_c_saves_a_checkpoint_and_stops(tmp_path):
    import os
    import signal
    import threading
    import time

    trainer = Trainer(mqar(tmp_path, steps=400), progress=False)

    def interrupt():
        while trainer.step < 3:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a shell's background job
    threading.Thread(target=interrupt, daemon=True).start()
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    assert summary["interrupted"] == "SIGINT" and 3 <= summary["step"] < 400
    assert summary["checkpoint"].name == f"step_{summary['step']:06d}"
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    resumed = Trainer(mqar(tmp_path, steps=summary["step"] + 1), resume=True, progress=False)
    try:
        assert resumed.fit()["step"] == summary["step"] + 1
    finally:
        resumed.close()
