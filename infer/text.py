"""Text in, text out: a model loaded with its tokenizer, from whatever a person names.

Tokenizers: the model directory's own (transformers' AutoTokenizer) when it has one, the
imported source's for `zoo.from_hf` sources, and a byte-level one (UTF-8 bytes are the ids) for
vocabulary-256 models, which is what zoo's tiny and small configs are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zoo.model import ZooForCausalLM, check_model_folder
from zoo.tokenizer import ByteTokenizer, has_tokenizer_files


def resolve_device(device: str | torch.device) -> torch.device:
    """torch.device(device), or a ValueError naming it when this torch build or this machine
    cannot run on it (where torch itself would fail later, e.g. with an AssertionError)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {str(device)!r} is not a device torch knows ({error})") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, resolved.type, None)
        if backend is None or not hasattr(backend, "is_available"):
            raise ValueError(f"device {str(device)!r}: zoo runs on cpu, cuda or mps")
        available = backend.is_available()
        count = backend.device_count() if available and hasattr(backend, "device_count") else 0
    if not available:
        built = (f"this torch ({torch.__version__}) is built without CUDA"
                 if resolved.type == "cuda" and torch.version.cuda is None
                 else f"no {resolved.type} device is available")
        raise ValueError(f"device {str(device)!r}: {built}; use device 'cpu'")
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"device {str(device)!r}: there are {count} {resolved.type} devices "
                         f"(indices 0..{count - 1})")
    return resolved


def load_for_generation(
    spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[ZooForCausalLM, object, str | None]:
    """(model, tokenizer, note) from a zoo directory, a from_hf source or a config name.

    The note says what the user should know (untrained weights), or is None.
    """
    from zoo.config import load_config
    from zoo.hf_import import is_hf_source

    device = resolve_device(device)  # before any loading
    path, note = Path(spec), None
    if is_hf_source(spec):
        from zoo.hf_import import from_hf

        model = from_hf(spec, dtype=dtype)
        tokenizer = model.tokenizer
    elif path.is_dir():
        check_model_folder(path)  # config.json there, weight files whole
        model = ZooForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = None
        if has_tokenizer_files(path):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        config = load_config(spec)
        model = ZooForCausalLM(config).to(dtype)
        tokenizer = None
        note = (f"{spec} is a config, not a checkpoint: the weights are random (untrained), "
                "so the text is noise")
    if tokenizer is None:
        if model.config.vocab_size != 256:
            raise ValueError(
                f"{spec}: no tokenizer found and vocab_size={model.config.vocab_size} is not "
                "the byte-level 256; save the tokenizer into the model directory"
            )
        tokenizer = ByteTokenizer()
    return model.to(device).eval(), tokenizer, note
