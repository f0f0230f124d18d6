"""A run's out_dir: one run per folder, held under a lock while it runs.

`zoo train` and `zoo distill` prepare their folder the same way: a folder that already holds a
run is refused unless the run is resumed (from its newest checkpoint, or one named) or
overwritten (its metrics, plots, checkpoints and final weights deleted first); the run's config
is written beside them as run.yaml.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from zoo.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from zoo.train.config import RunConfigError
from zoo.train.metrics import METRICS_FILE


class RunFolder:
    """`path` as the folder of one run; `outputs` are the files a fresh start deletes (beside
    metrics, checkpoints/ and final/), `command` names the tool in errors."""

    def __init__(self, path: str | Path, *, outputs: Sequence[str] = (),
                 command: str = "zoo train"):
        self.path = Path(path)
        self.outputs = (METRICS_FILE, *outputs)
        self.command = command
        self._lock: IO[str] | None = None

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def holds_run(self) -> bool:
        return (self.path / METRICS_FILE).exists() or bool(list_checkpoints(self.checkpoints))

    def resume_point(self, resume: bool | str | Path, overwrite: bool) -> Path | None:
        """The checkpoint to continue from (None: a fresh start); refuses a folder that holds a
        run when neither resume nor overwrite is asked. Reads only: every rank may call it."""
        if resume:
            found = Path(resume) if not isinstance(resume, bool) else latest_checkpoint(
                self.checkpoints)
            if found is None:
                raise CheckpointError(
                    f"--resume: no checkpoint in {self.checkpoints} to resume from; run "
                    "without --resume to start"
                )
            return found
        if self.holds_run() and not overwrite:
            raise RunConfigError(
                f"out_dir={str(self.path)!r} already holds a run ({METRICS_FILE} or "
                "checkpoints); pass --resume to continue it, --overwrite to start again, or "
                "--set out_dir=... for a new folder"
            )
        return None

    def claim(self, run_config: dict[str, Any], *, fresh: bool) -> None:
        """Lock the folder for this process, clear a previous run's outputs when `fresh` (an
        overwrite), write run.yaml. One process of a run calls it (rank 0)."""
        self.lock()
        if fresh:
            for name in self.outputs:
                (self.path / name).unlink(missing_ok=True)
            for name in ("checkpoints", "final"):
                shutil.rmtree(self.path / name, ignore_errors=True)
        (self.path / "run.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))

    def lock(self) -> None:
        """One run per folder: two writers would interleave checkpoints and metrics. The lock
        dies with the process, SIGKILL included."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / ".lock", "a+")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "zoo process"  # what the holder wrote
            self._lock.close()
            self._lock = None
            raise RunConfigError(
                f"out_dir={str(self.path)!r} is in use by another running {holder}; wait "
                "for it or choose another out_dir"
            ) from None
        self._lock.truncate(0)
        self._lock.write(self.command)
        self._lock.flush()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
