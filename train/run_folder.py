"""A run's out_dir: one run per folder, marked as zoo's, held under a lock while it runs.

`zoo train` and `zoo distill` prepare their folder the same way (`RunFolder.plan`, then
`claim`):

- zoo writes only into a folder that is absent, empty, or one it made. It marks the folders it
  runs in: the lock file `.lock` stays after the run, naming the zoo command and the outputs
  it writes there. A folder made before that mark existed counts as zoo's when it holds run.yaml
  and metrics.jsonl and nothing but zoo's outputs; any other non-empty folder is refused, with
  or without --overwrite, naming what is in it.
- a folder that holds a run is refused unless the run is resumed or overwritten. --overwrite
  deletes zoo's outputs only (metrics, plots, checkpoints/, final/; run.yaml is rewritten):
  files a person put beside them stay.
- --resume continues from the newest intact checkpoint (a damaged newer one is skipped, saying
  so), or starts again from step 0 when the run stopped before its first checkpoint (metrics,
  no checkpoint, no final weights); --resume-from names one checkpoint, which must be intact.
  Either way the run config must agree with the checkpoint's on every field that decides what
  the run computes (`RESUME_MAY_CHANGE` lists the others), before any work starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from zoo.train.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint
from zoo.train.config import RunConfigError
from zoo.train.metrics import METRICS_FILE

LOCK_FILE = ".lock"
RUN_YAML = "run.yaml"
FOLDERS = ("checkpoints", "final")  # zoo's own folders in a run folder, deleted whole
OUTPUTS_LINE = "zoo run folder; outputs:"  # the lock file's second line, then the file names
SHOWN_ENTRIES = 5  # of a refused folder's entries, named in the error

# Run-config fields a resume may change: they decide how the run is executed (device, threads,
# compile, the parallel strategy over full-state checkpoints), logged, evaluated or saved, or
# where caches live, not what it computes. train.steps moves the end, and with it the end of
# the learning-rate cosine. The model section is compared by the fields that decide its
# weights (checkpoint.MODEL_FIELDS) when the checkpoint is loaded. Every other field changed
# on resume is an error: the run would continue as some other run.
RESUME_MAY_CHANGE = frozenset({
    "name", "out_dir", "strategy", "model.config", "model.overrides",
    "train.steps", "train.device", "train.compile", "train.threads", "train.log_interval",
    "train.eval_interval", "train.eval_batches", "checkpoint.interval", "checkpoint.keep_last",
    "data.cache_dir", "distill.cache_dir",
})


@dataclass
class StartPlan:
    """How a run starts in its folder: from `checkpoint` (None: step 0), after clearing an
    earlier run's outputs or not; `state` is the checkpoint's verified state.json; `notes` are
    lines to show the person who started it (a skipped damaged checkpoint, a restart)."""

    checkpoint: Path | None
    clear: bool
    state: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


class RunFolder:
    """`path` as the folder of one run; `outputs` are the files the run writes there beside
    metrics, run.yaml, checkpoints/ and final/; `command` names the tool in errors."""

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
        """Whether an earlier run left results here: metrics, checkpoints, final weights or
        plots (run.yaml and the lock alone are no run)."""
        return any((self.path / name).exists() for name in (*self.own_outputs(), *FOLDERS))

    def own_outputs(self) -> set[str]:
        """The files zoo writes here: this command's, and those of the command that marked the
        folder last (a distillation's folder overwritten by a training run)."""
        mark = self.mark()
        return {*self.outputs, *(mark[1] if mark else ())}

    # -----------------------------------------------------------------------------------------
    # what is in the folder

    def entries(self) -> list[str]:
        """The folder's entries (folders with a trailing /), sorted; [] when it is absent."""
        if not self.path.is_dir():
            if self.path.exists():
                raise RunConfigError(f"out_dir={str(self.path)!r} is a file, not a folder")
            return []
        return sorted(p.name + "/" if p.is_dir() else p.name for p in self.path.iterdir())

    def mark(self) -> tuple[str, list[str]] | None:
        """(command, outputs) of the zoo command that made this folder, from its lock file;
        None when zoo did not mark it."""
        try:
            lines = (self.path / LOCK_FILE).read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        if not lines or not lines[0].startswith("zoo "):
            return None
        outputs = []
        if len(lines) > 1 and lines[1].startswith(OUTPUTS_LINE):
            # only plain file names: the line is read back from disk
            outputs = [name for name in lines[1][len(OUTPUTS_LINE):].split()
                       if re.fullmatch(r"\w[\w.-]*", name)]
        return lines[0], outputs

    def is_zoo_run(self, entries: Sequence[str]) -> bool:
        """Marked by zoo, or made before the mark existed: run.yaml and metrics.jsonl (what every
        run wrote first) and nothing but zoo's outputs."""
        if self.mark() is not None:
            return True
        names = {entry.rstrip("/") for entry in entries}
        own = {*self.outputs, RUN_YAML, LOCK_FILE, *FOLDERS}
        return {RUN_YAML, METRICS_FILE} <= names and names <= own

    # -----------------------------------------------------------------------------------------
    # before the run: where it starts

    def plan(self, resume: bool | str | Path, overwrite: bool,
             run_config: Mapping[str, Any]) -> StartPlan:
        """Where this run starts, or an error naming why it cannot start here. Reads only:
        every rank may call it. `run_config` is the run's config as a dict (to_dict())."""
        where = f"out_dir={str(self.path)!r}"
        if resume and overwrite:
            raise RunConfigError(
                f"--resume and --overwrite contradict each other: --resume continues the run in "
                f"{where}, --overwrite deletes it; pass one"
            )
        entries = self.entries()
        zoo_run = bool(entries) and self.is_zoo_run(entries)
        if resume:
            return self._plan_resume(resume, run_config, entries, zoo_run)
        if not entries:
            return StartPlan(None, clear=False)
        if not zoo_run:
            raise RunConfigError(
                f"{where} is not empty and is not a zoo run folder: it holds "
                f"{_listing(entries)}; zoo writes only into an empty folder or one it made (and "
                "--overwrite clears only those): choose another out_dir"
            )
        if self.holds_run() and not overwrite:
            found = list_checkpoints(self.checkpoints)
            if found:
                raise RunConfigError(
                    f"{where} already holds a run (newest checkpoint {found[-1].name}); pass "
                    "--resume to continue it, --overwrite to start it again, or --set "
                    "out_dir=... for a new folder"
                )
            if self.stopped_before_first_checkpoint():
                raise RunConfigError(
                    f"{where} already holds a run that stopped before its first checkpoint; "
                    "pass --resume to start it again from step 0 (or --overwrite), or --set "
                    "out_dir=... for a new folder"
                )
            raise RunConfigError(
                f"{where} holds an earlier run's results ({_listing(entries)}) and no "
                "checkpoint; pass --overwrite to replace them, or --set out_dir=... for a new "
                "folder"
            )
        return StartPlan(None, clear=True)

    def stopped_before_first_checkpoint(self) -> bool:
        """A run that logged steps but wrote neither a checkpoint nor final weights (killed
        early): restarting it from step 0 loses nothing."""
        return (self.path / METRICS_FILE).exists() and not list_checkpoints(
            self.checkpoints) and not (self.path / "final").exists()

    def _plan_resume(self, resume: bool | str | Path, run_config: Mapping[str, Any],
                     entries: list[str], zoo_run: bool) -> StartPlan:
        where = f"out_dir={str(self.path)!r}"
        notes: list[str] = []
        if isinstance(resume, bool):
            found, state, notes = self._newest_intact()
            if found is None:
                if not zoo_run or not self.holds_run():
                    raise CheckpointError(
                        f"--resume: {where} holds no zoo run to resume (no checkpoint in "
                        f"{self.checkpoints}); run without --resume to start one"
                    )
                if not self.stopped_before_first_checkpoint():
                    raise CheckpointError(
                        f"--resume: {where} holds an earlier run's results "
                        f"({_listing(entries)}) but no checkpoint to continue from; pass "
                        "--overwrite to start again"
                    )
                return StartPlan(None, clear=True, notes=[
                    f"--resume: {where} has no checkpoint (its run stopped before the first); "
                    "starting again from step 0"])
        else:
            found = Path(resume)
            state = verify_checkpoint(found)
        inside = found.resolve().parent == self.checkpoints.resolve()
        if entries and not zoo_run and not inside:
            raise RunConfigError(
                f"{where} is not empty and is not a zoo run folder: it holds "
                f"{_listing(entries)}; resume from {found} into an empty out_dir"
            )
        notes += check_resume_config(found, state, run_config)
        return StartPlan(found, clear=False, state=state, notes=notes)

    def _newest_intact(self) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
        """The newest checkpoint whose files match their hashes, its state, and a note naming
        the damaged newer ones it skipped; an error when every checkpoint is damaged."""
        damaged: list[tuple[str, CheckpointError]] = []
        for path in reversed(list_checkpoints(self.checkpoints)):
            try:
                state = verify_checkpoint(path)
            except CheckpointError as error:
                damaged.append((path.name, error))
                continue
            notes = [f"--resume: skipping damaged {_names(damaged)} ({damaged[0][1]}); resuming "
                     f"from {path.name}, the newest intact checkpoint"] if damaged else []
            return path, state, notes
        if damaged:
            raise CheckpointError(
                f"--resume: every checkpoint in {self.checkpoints} is damaged "
                f"({_names(damaged)}; {damaged[0][1]}); pass --overwrite to start again"
            )
        return None, None, []

    # -----------------------------------------------------------------------------------------
    # the run holds the folder

    def claim(self, run_config: dict[str, Any], *, fresh: bool) -> None:
        """Lock the folder for this process (marking it as zoo's), clear a previous run's
        outputs when `fresh` (an overwrite, or a restart from step 0), write run.yaml. One
        process of a run calls it (rank 0), after `plan`."""
        outputs = self.own_outputs()  # read before the lock rewrites the mark
        self.lock()
        if fresh:
            for name in outputs:
                if (self.path / name).is_file():
                    (self.path / name).unlink()
            for name in FOLDERS:
                shutil.rmtree(self.path / name, ignore_errors=True)
        (self.path / RUN_YAML).write_text(yaml.safe_dump(run_config, sort_keys=False))

    def lock(self) -> None:
        """One run per folder: two writers would interleave checkpoints and metrics. The lock
        dies with the process, SIGKILL included; its file stays, naming the command, as zoo's
        mark on the folder."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        # read-write without truncating: the file names the holder, and marks the folder
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        self._lock = os.fdopen(fd, "r+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lines = self._lock.read().splitlines()
            holder = lines[0].strip() if lines and lines[0].strip() else "zoo process"
            self._lock.close()
            self._lock = None
            raise RunConfigError(
                f"out_dir={str(self.path)!r} is in use by another running {holder}; wait "
                "for it or choose another out_dir"
            ) from None
        self._lock.seek(0)
        self._lock.write(f"{self.command}\n{OUTPUTS_LINE} {' '.join(self.outputs)}\n")
        self._lock.truncate()
        self._lock.flush()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def check_resume_config(path: Path, state: Mapping[str, Any],
                        run_config: Mapping[str, Any]) -> list[str]:
    """Refuse a resume whose run config differs from the checkpoint's in a field outside
    RESUME_MAY_CHANGE (naming each field and both values); return notes on the changes that
    take effect."""
    saved = _fields(state["run_config"])
    current = _fields(json.loads(json.dumps(dict(run_config), default=str)))
    changed = [(name, saved[name], value) for name, value in current.items()
               if name in saved and saved[name] != value]
    refused = [c for c in changed if c[0] not in RESUME_MAY_CHANGE]
    if refused:
        diffs = "; ".join(f"{name}: checkpoint {old!r}, this run {new!r}"
                          for name, old, new in refused)
        raise CheckpointError(
            f"cannot resume from {path}: the run config differs from the one it was written "
            f"with, and a resume cannot honour that ({diffs}); resume with the checkpoint's "
            "values, or start again with --overwrite or in a new out_dir"
        )
    step = int(state["step"])
    steps = current.get("train.steps")
    notes = []
    if isinstance(steps, int) and steps < step:
        raise CheckpointError(
            f"cannot resume from {path}: train.steps={steps} is below its step {step}; set "
            f"train.steps >= {step}"
        )
    if "train.steps" in saved and saved["train.steps"] != steps:
        notes.append(f"resuming with train.steps {saved['train.steps']} -> {steps}: the "
                     f"learning-rate schedule now ends its cosine at step {steps}")
    return notes


def _fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run config's fields by dotted name ("optim.lr"), one level into each section."""
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            out[key] = value
    return out


def _names(damaged: Sequence[tuple[str, CheckpointError]]) -> str:
    return ", ".join(name for name, _ in damaged)


def _listing(entries: Sequence[str]) -> str:
    shown = ", ".join(entries[:SHOWN_ENTRIES])
    more = len(entries) - SHOWN_ENTRIES
    return shown + (f" and {more} more" if more > 0 else "")
