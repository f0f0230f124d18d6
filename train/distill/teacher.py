"""The teacher of a distillation: loaded from whatever a run config names (a zoo run, model
folder or checkpoint, a transformers folder, a GGUF file or a short name), frozen; the
tokenizer it carries, checked against the data's; and sampling from it for sequence-level KD."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from zoo.config import ZooConfig
from zoo.model import ZooForCausalLM
from zoo.tokenizer import has_tokenizer_files
from zoo.train.checkpoint import load_checkpoint, read_state
from zoo.train.config import DataSection, RunConfigError
from zoo.train.data import Tokenizer, default_cache_dir, load_tokenizer

# A probe text for "same tokenizer?" when two tokenizer files differ byte-wise.
PROBE = "def f(x):\n    return {'k': x ** 2}  # naïve — ünïcode ✓\n\tclass A(B): pass\n"


@dataclasses.dataclass
class Teacher:
    model: nn.Module  # a ZooForCausalLM, or any transformers causal LM
    tokenizer: str | None  # a data.tokenizer spec ("byte" or a local directory), or None
    source: str

    @property
    def is_zoo(self) -> bool:
        return isinstance(self.model, ZooForCausalLM)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def n_layers(self) -> int:
        config = self.model.config
        return int(getattr(config, "n_layers", None) or config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        config = self.model.config
        return int(getattr(config, "d_model", None) or config.hidden_size)

    def fingerprint(self) -> str:
        """sha256 over the teacher's weights: the logits cache's key."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:24]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, hidden: bool = False):
        """(logits (B, T, V), hidden_states or None)."""
        out = self.model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        return out.logits, (out.hidden_states if hidden else None)


def save_source_tokenizer(tokenizer: Any, source: str) -> str:
    """The tokenizer of an imported model (e.g. from a GGUF file) saved once where
    data.tokenizer can name it, keyed by its source (a short name, or a hash of the path), so
    every job that tokenizes the corpus for that source shares one token cache."""
    from zoo.hf_import import SHORT_NAMES

    name = source if source in SHORT_NAMES else hashlib.sha256(
        str(Path(source).expanduser().resolve()).encode()).hexdigest()[:16]
    root = default_cache_dir().parent / "tokenizers"
    folder = root / name
    if not (folder / "tokenizer_config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def _zoo_run_tokenizer(run_config: Mapping[str, Any] | None) -> str | None:
    if not run_config:
        return None
    return (run_config.get("data") or {}).get("tokenizer")


def load_teacher(source: str | nn.Module, dtype: str = "float32") -> Teacher:
    """The teacher a run config names (see TeacherSection.source), in eval mode, frozen."""
    torch_dtype = getattr(torch, dtype)
    if isinstance(source, nn.Module):
        model, tokenizer, name = source, None, type(source).__name__
        tokenizer = "byte" if getattr(source.config, "vocab_size", None) == 256 else None
    else:
        name = str(source)
        model, tokenizer = _load_teacher_model(name, torch_dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model=model, tokenizer=tokenizer, source=name)


def _load_teacher_model(source: str, dtype: torch.dtype) -> tuple[nn.Module, str | None]:
    from zoo.hf_import import SHORT_NAMES, from_hf

    path = Path(source).expanduser()
    if source in SHORT_NAMES or path.suffix == ".gguf":
        model = from_hf(source, dtype=dtype)
        spec = None
        if model.tokenizer is not None:
            spec = save_source_tokenizer(model.tokenizer, source)
        return model, spec
    if not path.exists():
        raise RunConfigError(
            f"teacher.source={source!r} is not a local path nor a short name "
            f"({', '.join(sorted(SHORT_NAMES))}); zoo downloads nothing"
        )
    if (path / "final" / "config.json").exists():  # a `zoo train` output folder
        run = yaml.safe_load((path / "run.yaml").read_text()) if (
            path / "run.yaml").exists() else None
        model = ZooForCausalLM.from_pretrained(path / "final", dtype=dtype)
        return model, _zoo_run_tokenizer(run) or _dir_tokenizer(path / "final")
    if (path / "state.json").exists():  # a `zoo train` checkpoint folder
        state = read_state(path)
        config = ZooConfig(**{k: v for k, v in state["model_config"].items()
                              if k in {f.name for f in dataclasses.fields(ZooConfig)}})
        checkpoint = load_checkpoint(path, config)
        model = ZooForCausalLM(config)
        model.load_state_dict(checkpoint.model)
        return model.to(dtype), _zoo_run_tokenizer(checkpoint.run_config)
    config_file = path / "config.json"
    if not config_file.exists():
        raise RunConfigError(
            f"teacher.source={source!r} holds no config.json: not a model directory, a `zoo "
            "train` output folder (final/) or a checkpoint (state.json)"
        )
    if json.loads(config_file.read_text()).get("model_type") == "zoo":
        return ZooForCausalLM.from_pretrained(path, dtype=dtype), _dir_tokenizer(path)
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = _dir_tokenizer(path)
    if hf_model.config.model_type == "llama":
        # zoo's equal-logit copy: its recurrent cache for seq-KD, hooks for linearisation
        return from_hf(hf_model, dtype=dtype), tokenizer
    return hf_model, tokenizer


def _dir_tokenizer(folder: Path) -> str | None:
    return str(folder) if has_tokenizer_files(folder) else None


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    if a.fingerprint == b.fingerprint:
        return True
    return a.vocab_size == b.vocab_size and list(a.encode(PROBE)) == list(b.encode(PROBE))


def resolve_tokenizer(data: DataSection, teacher: Teacher) -> DataSection:
    """data with `tokenizer: teacher` replaced by the teacher's tokenizer; an explicit tokenizer
    must be the teacher's own (same vocabulary and encodings), or the run is refused."""
    spec = data.tokenizer
    if spec == "teacher":
        if teacher.tokenizer is None:
            raise RunConfigError(
                f"data.tokenizer='teacher': the teacher {teacher.source!r} carries no tokenizer "
                "(no tokenizer files beside it); set data.tokenizer to its tokenizer directory"
            )
        return dataclasses.replace(data, tokenizer=teacher.tokenizer)
    if teacher.tokenizer is not None and teacher.tokenizer != spec:
        mine, theirs = load_tokenizer(spec), load_tokenizer(teacher.tokenizer)
        if not same_tokenizer(mine, theirs):
            raise RunConfigError(
                f"data.tokenizer={spec!r} (vocab {mine.vocab_size}) is not the teacher's "
                f"tokenizer {teacher.tokenizer!r} (vocab {theirs.vocab_size}): teacher and "
                "student must share the tokenizer; use data.tokenizer=teacher"
            )
    return data


def check_vocabularies(teacher: Teacher, student: ZooForCausalLM,
                       tokenizer: Tokenizer | None) -> None:
    """Teacher and student logits must cover the same vocabulary, and the data's tokens must be
    ids both have."""
    if teacher.vocab_size != student.config.vocab_size:
        raise RunConfigError(
            f"vocabulary mismatch: the student has vocab_size={student.config.vocab_size} but "
            f"the teacher {teacher.source!r} has {teacher.vocab_size}; teacher and student must "
            "share the tokenizer (set student.overrides.vocab_size="
            f"{teacher.vocab_size}, or linearise the teacher)"
        )
    if tokenizer is not None and tokenizer.vocab_size > teacher.vocab_size:
        raise RunConfigError(
            f"vocabulary mismatch: data.tokenizer has {tokenizer.vocab_size} tokens, more than "
            f"the teacher's vocab_size={teacher.vocab_size}: it is not the teacher's tokenizer"
        )


@torch.no_grad()
def teacher_generate(teacher: Teacher, prompts: torch.Tensor, length: int, *,
                     temperature: float = 1.0, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """Continue prompts (B, P) to (B, length) tokens by sampling from the teacher (greedy at
    temperature 0). Zoo teachers decode through their recurrent cache (one token per step);
    others through transformers' generate()."""
    new = length - prompts.shape[1]
    if new <= 0:
        return prompts[:, :length]
    if not teacher.is_zoo:
        out = teacher.model.generate(
            prompts, max_new_tokens=new, min_new_tokens=new, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_k=0, top_p=1.0,
            pad_token_id=0)
        return out[:, :length]
    model: ZooForCausalLM = teacher.model
    out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
    cache, logits = out.cache, out.logits[:, -1]
    tokens = [prompts]
    for step in range(new):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)
        else:
            token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        if step + 1 < new:
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1]
    return torch.cat(tokens, dim=1)
