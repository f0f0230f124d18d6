"""Shared settings for the training tests: tiny runs, one thread, a token cache per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokens")


def _text_run(out_dir: Path, cache: Path, **sections) -> dict:
    """A tiny byte-level run on a 20 kB slice of the standard library (about 300 windows of 64
    tokens, so 60 steps of 8 sequences cross an epoch boundary)."""
    run = {
        "name": "test", "out_dir": str(out_dir), "model": "attention-tiny",
        "data": {"source": "text", "max_bytes": 20_000, "cache_dir": str(cache),
                 "val_fraction": 0.2},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "grad_accum": 2},
        "train": {"steps": 20, "batch_size": 8, "seq_len": 64, "eval_interval": 10,
                  "eval_batches": 2, "threads": 1},
        "checkpoint": {"interval": 10, "keep_last": 2},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            run[section] = {**run.get(section, {}), **values}
        else:
            run[section] = values
    return run


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def python_m(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _run_cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(python_m("zoo.train", *args), env=subprocess_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def text_run(token_cache):
    """text_run(out_dir, **sections) -> a run-config dict (sections update the defaults)."""
    return lambda out_dir, **sections: _text_run(out_dir, token_cache, **sections)


@pytest.fixture
def run_cli():
    """run_cli([args]) runs `python -m zoo.train args` in a subprocess (one thread)."""
    return _run_cli


@pytest.fixture
def spawn():
    """spawn(argv) starts a subprocess with the test environment; returns the Popen."""
    def start(argv: list[str], log: Path) -> subprocess.Popen:
        return subprocess.Popen(argv, env=subprocess_env(), cwd=REPO, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT)
    return start
