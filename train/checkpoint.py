"""Checkpoints that survive a kill: safetensors and JSON only, written aside and renamed.

A checkpoint is a folder `<out>/checkpoints/step_000100/`:

    model.safetensors      the full (unsharded) model state dict
    optimizer.safetensors  the optimizer's per-parameter tensors, keyed "<param fqn>/<name>"
    rng.safetensors        torch's CPU (and CUDA) generator states
    state.json             written last: step, data position, scheduler, optimizer param
                           groups, python / numpy RNG, the model and run configs, and the
                           sha256 of every file above

Nothing is ever unpickled: tensors go through safetensors, everything else through JSON. The
folder is written under a temporary name and renamed, so a kill at any moment leaves the
previous checkpoint whole; a checkpoint whose files do not match their recorded hashes, or that
was written for another model config, is refused with an error that says which. A checkpoint is
verified when it is loaded and when a save finds a folder of its step already there (left by an
earlier run of this folder): an intact one of the same run state is kept, anything else is
replaced atomically; checkpoints of later steps than a save belong to the future that a resume
from an earlier one rewrote, and are removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = 1
STEP_DIR = re.compile(r"^step_(\d+)$")
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
STATE_KEYS = ("step", "train_state", "scheduler", "optimizer", "rng", "model_config",
              "run_config", "sha256")
# The ZooConfig fields that decide the weights' shapes and meaning; a checkpoint whose values
# differ belongs to another model.
MODEL_FIELDS = (
    "vocab_size", "d_model", "n_layers", "mixer", "ffn", "layers", "norm", "norm_eps",
    "embed_norm", "tie_word_embeddings",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, incomplete, or from another model config."""


@dataclasses.dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # {"state": {fqn: {name: tensor}}, "param_groups": [...]}
    scheduler: dict[str, Any]
    train_state: dict[str, Any]  # samples_seen, tokens_seen, ...
    rng: dict[str, Any]
    model_config: dict[str, Any]
    run_config: dict[str, Any]


def model_signature(config: Any) -> dict[str, Any]:
    """The fields of a ZooConfig (or its dict) that a checkpoint must agree on, as JSON data."""
    data = config if isinstance(config, dict) else config.to_dict()
    return json.loads(json.dumps({k: data.get(k) for k in MODEL_FIELDS}))


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `<out>/checkpoints`, oldest first (temporaries are skipped)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder's name says (step_000300 -> 300)."""
    match = STEP_DIR.match(path.name)
    if match is None:
        raise CheckpointError(f"checkpoint folder {path} is not named step_<number>")
    return int(match.group(1))


# ---------------------------------------------------------------------------------------------
# RNG


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of the python, numpy and torch generators."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    json_part = {
        "python": [version, list(state), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return json_part, tensors


def restore_rng(rng: dict[str, Any]) -> None:
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["tensors"]["torch"])
    cuda = [rng["tensors"][k] for k in sorted(rng["tensors"]) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------
# Optimizer state <-> tensors + JSON


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """A (full, FQN-keyed) optimizer state dict -> safetensors tensors and a JSON part."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, entries in state["state"].items():
        for name, value in entries.items():
            if "/" in name:
                raise CheckpointError(f"optimizer state name {name!r} contains '/'")
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}/{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(fqn, {})[name] = value
    return tensors, {"param_groups": _jsonable(state["param_groups"]), "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        fqn, _, name = key.rpartition("/")
        state.setdefault(fqn, {})[name] = value
    for fqn, entries in meta["scalars"].items():
        state.setdefault(fqn, {}).update(entries)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


# ---------------------------------------------------------------------------------------------
# Save


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    out_dir: Path, step: int, *, model: dict[str, torch.Tensor], optimizer: dict[str, Any],
    scheduler: dict[str, Any], train_state: dict[str, Any], model_config: Any,
    run_config: dict[str, Any], keep_last: int,
) -> Path:
    """Write `<out>/checkpoints/step_<step>` atomically, then delete the checkpoints of later
    steps (an earlier run's, superseded by this one) and all but the newest `keep_last`. An
    intact folder of this step holding the same run state is kept as it is; a damaged one, or
    one of another run config, is replaced. `model` and `optimizer` are full (gathered) state
    dicts.
    """
    root = out_dir / "checkpoints"
    final = checkpoint_dir(out_dir, step)
    run_config, train_state = _as_json(run_config), _as_json(train_state)
    if final.exists() and _holds(final, step, run_config, train_state):
        return final  # saved already: a signal right after an interval save, or an exact resume
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".step_*.tmp*"), *root.glob(".step_*.old*")]:  # a killed save's
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    tmp.mkdir()
    # Tied weights share storage, which safetensors refuses; a copy each is fine on disk.
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in model.items()}
    save_file(weights, tmp / "model.safetensors")
    optim_tensors, optim_meta = split_optimizer_state(optimizer)
    save_file(optim_tensors, tmp / "optimizer.safetensors")
    rng_json, rng_tensors = capture_rng()
    save_file(rng_tensors, tmp / "rng.safetensors")
    state = {
        "format": FORMAT,
        "step": step,
        "train_state": train_state,
        "scheduler": _jsonable(scheduler),
        "optimizer": optim_meta,
        "rng": rng_json,
        "model_config": json.loads(model_config.to_json_string())
        if hasattr(model_config, "to_json_string") else model_config,
        "run_config": run_config,
        "sha256": {name: _sha256(tmp / name) for name in TENSOR_FILES},
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for name in (*TENSOR_FILES, "state.json"):
        _fsync(tmp / name)
    _fsync(tmp)
    if final.exists():  # damaged, or another run state's: this save replaces it
        aside = root / f".{final.name}.old{os.getpid()}"
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(root)
    kept = []
    for path in list_checkpoints(root):
        if checkpoint_step(path) > step:  # the future of an earlier run, which this one rewrites
            shutil.rmtree(path, ignore_errors=True)
        else:
            kept.append(path)
    for old in kept[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _as_json(value: Any) -> Any:
    """`value` as it reads back from state.json (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(_jsonable(value), default=str))


def _holds(path: Path, step: int, run_config: Any, train_state: Any) -> bool:
    """Whether the checkpoint at `path` is intact and holds this step of this run config (so an
    exact continuation wrote the same bytes); a damaged one, or one of another config (say
    train.steps changed, and the schedule with it), is to be replaced."""
    try:
        state = verify_checkpoint(path)
    except CheckpointError:
        return False
    return (state["step"] == step and state["run_config"] == run_config
            and state["train_state"] == train_state)


# ---------------------------------------------------------------------------------------------
# Load


def read_state(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint folder, or a CheckpointError saying what is wrong."""
    state_path = path / "state.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: state.json is missing") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: state.json cannot be read ({error})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: state.json is not a zoo checkpoint of format {FORMAT}"
        )
    return state


def check_model_config(path: Path, state: dict[str, Any], model_config: Any) -> None:
    saved = model_signature(state["model_config"])
    current = model_signature(model_config)
    diffs = [f"{k}: checkpoint {saved[k]!r}, this run {current[k]!r}"
             for k in MODEL_FIELDS if saved[k] != current[k]]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written for another model config; differences: "
            + "; ".join(diffs)
        )


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint folder whose every file matches the sha256 recorded there;
    otherwise a CheckpointError naming the folder and the first file that does not."""
    state = read_state(path)
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: state.json lacks {missing}")
    recorded = state["sha256"]
    if not isinstance(recorded, dict) or set(recorded) != set(TENSOR_FILES):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: state.json's sha256 must name {list(TENSOR_FILES)}, "
            f"it names {sorted(recorded) if isinstance(recorded, dict) else recorded!r}"
        )
    if STEP_DIR.match(path.name) and checkpoint_step(path) != state["step"]:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its state.json says step {state['step']!r}"
        )
    for name in TENSOR_FILES:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if _sha256(file) != recorded[name]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} does not match the sha256 recorded in "
                "state.json (truncated or overwritten)"
            )
    return state


def load_checkpoint(path: Path, model_config: Any) -> Checkpoint:
    """Read and verify a checkpoint folder for a model of `model_config`."""
    state = verify_checkpoint(path)
    check_model_config(path, state, model_config)
    tensors = {}
    for name in TENSOR_FILES:
        file = path / name
        try:
            tensors[name] = load_file(file)
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name}: {error}") from None
    rng = dict(state["rng"], tensors=tensors["rng.safetensors"])
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        model=tensors["model.safetensors"],
        optimizer=join_optimizer_state(tensors["optimizer.safetensors"], state["optimizer"]),
        scheduler=state["scheduler"],
        train_state=state["train_state"],
        rng=rng,
        model_config=state["model_config"],
        run_config=state["run_config"],
    )


def check_model_tensors(path: Path, saved: dict[str, torch.Tensor],
                        expected: dict[str, torch.Tensor]) -> None:
    """The checkpoint's tensors match the model's names and shapes exactly."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, tensor in expected.items():
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, the model "
                f"expects {tuple(tensor.shape)}"
            )


def save_final(model_cls: type, config: Any, state_dict: dict[str, torch.Tensor],
               folder: Path) -> Path:
    """A `save_pretrained` folder of the trained weights (AutoModelForCausalLM loads it),
    written aside and renamed like a checkpoint.
    """
    model = model_cls(config)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()})
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its one-shard bar would break the trainer's output
    try:
        model.save_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    old = folder.with_name(f".{folder.name}.old{os.getpid()}")
    if folder.exists():
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder
